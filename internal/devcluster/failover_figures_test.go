package devcluster

import (
	"net/http"
	"testing"
	"time"
)

// TestServedElsewhere: the time until every request is served elsewhere
// is when the first request after the last one on the fault (failed, or
// answered by what it killed) was sent; requests before the fault do not
// count; none after the last on the fault means never.
func TestServedElsewhere(t *testing.T) {
	f := time.Unix(1000, 0)
	at := func(ms int) time.Time { return f.Add(time.Duration(ms) * time.Millisecond) }
	ok := func(ms int, region string) Sample {
		return Sample{Sent: at(ms), Done: at(ms + 10), Status: http.StatusOK, Region: region}
	}
	bad := func(ms int) Sample {
		return Sample{Sent: at(ms), Done: at(ms + 10), Err: "refused", Cause: "connection refused"}
	}
	dead := func(s Sample) bool { return s.Region == "ams" }
	for _, tc := range []struct {
		name            string
		ss              []Sample
		last, elsewhere int
		any, ok         bool
	}{
		{"nothing on the fault", []Sample{ok(-5, "ams"), ok(3, "iad"), ok(8, "iad")}, 0, 3, false, true},
		{"answered by the dead region", []Sample{ok(-5, "ams"), ok(2, "ams"), ok(40, "ams"), ok(60, "iad"), ok(80, "iad")}, 40, 60, true, true},
		{"a failure after", []Sample{ok(2, "ams"), ok(60, "iad"), bad(70), ok(90, "iad")}, 70, 90, true, true},
		{"never elsewhere", []Sample{ok(2, "iad"), bad(70)}, 70, 0, true, false},
		{"no request after the fault", []Sample{ok(-2, "ams")}, 0, 0, false, false},
	} {
		last, elsewhere, any, got := ServedElsewhere(tc.ss, f, dead)
		if last != time.Duration(tc.last)*time.Millisecond || elsewhere != time.Duration(tc.elsewhere)*time.Millisecond || any != tc.any || got != tc.ok {
			t.Errorf("%s: last %v, elsewhere %v, any %v, ok %v; want %dms, %dms, %v, %v",
				tc.name, last, elsewhere, any, got, tc.last, tc.elsewhere, tc.any, tc.ok)
		}
	}
}

// TestLatencyPhases: before is the second before the fault (answered
// before it), during the second after, after the rest; a request answered
// at or after end counts for none.
func TestLatencyPhases(t *testing.T) {
	f := time.Unix(1000, 0)
	s := func(sentMS, tookMS int) Sample {
		sent := f.Add(time.Duration(sentMS) * time.Millisecond)
		return Sample{Sent: sent, Done: sent.Add(time.Duration(tookMS) * time.Millisecond), Status: http.StatusOK}
	}
	ss := []Sample{
		s(-2000, 1),              // too early
		s(-500, 10), s(-400, 20), // before
		s(-5, 100),             // in flight at the fault: none
		s(100, 30), s(900, 40), // during
		s(1500, 50),  // after
		s(4900, 500), // answered after end: none
	}
	ph := LatencyPhases(ss, f, f.Add(5*time.Second))
	ms := time.Millisecond
	want := Phases{Before: [2]time.Duration{20 * ms, 20 * ms}, During: [2]time.Duration{40 * ms, 40 * ms},
		After: [2]time.Duration{50 * ms, 50 * ms}, NBefore: 2, NDuring: 2, NAfter: 1}
	if ph != want {
		t.Errorf("phases %+v, want %+v", ph, want)
	}
}
