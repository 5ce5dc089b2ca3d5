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

// TestTouchesOf: a fault's touches are the live edges' failed attempts on
// what it killed, from the fault to the next; the requests on it are those
// of them sent at or after the fault (a request sent before it, still
// failing over after it, is not one), each counted once, at its client's
// sending time — or, unknown to the clients, at its attempt's.
func TestTouchesOf(t *testing.T) {
	f0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return f0.Add(time.Duration(ms) * time.Millisecond) }
	f := &fault{at: f0, machines: map[string]bool{"dead": true}}
	sent := map[string]time.Time{"before": at(-40), "r1": at(10), "r2": at(60)}
	failed := []failedAttempt{
		{at: at(-5), edge: "iad-1", machine: "dead", request: "early"},          // before the fault
		{at: at(150), edge: "iad-1", machine: "dead", request: "before"},        // sent before it
		{at: at(120), edge: "iad-1", machine: "dead", request: "r1"},            // on it
		{at: at(121), edge: "iad-1", machine: "dead", request: "r1"},            // the same request again
		{at: at(170), edge: "iad-1", machine: "alive", request: "r2"},           // on a live machine
		{at: at(90), edge: "ams-1", machine: "dead", request: "r2"},             // a dead edge's
		{at: at(75), edge: "iad-1", machine: "dead", request: "not a client's"}, // unknown: at its attempt
		{at: at(5000), edge: "iad-1", machine: "dead", request: "r2"},           // the next fault's
	}
	tf := touchesOf(failed, sent, f, at(1000), map[string]bool{"ams-1": true})
	ms := time.Millisecond
	if len(tf.attempts) != 4 || tf.first != 75*ms || tf.last != 150*ms || tf.onIt != 2 || tf.lastOnIt != 75*ms {
		t.Errorf("touches %d, first %v, last %v, on it %d, the last sent %v; want 4, 75ms, 150ms, 2, 75ms",
			len(tf.attempts), tf.first, tf.last, tf.onIt, tf.lastOnIt)
	}
}
