package check

import (
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

func TestDecide(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	pass := Result{OK: true, Output: "200 OK"}
	fail := Result{OK: false, Output: "connect: connection refused"}
	hist := func(rs ...Result) History {
		h := History{Started: t0}
		for _, r := range rs {
			h = h.Add(r)
		}
		return h
	}
	tests := []struct {
		name       string
		h          History
		grace      time.Duration
		now        time.Time
		wantStatus string
		wantOutput string
	}{
		{"no result yet", hist(), 0, at(time.Hour), api.CheckWarning, OutputWaiting},
		{"no result yet, in grace", hist(), time.Minute, at(time.Second), api.CheckWarning, OutputWaiting},
		{"pass", hist(pass), 0, at(time.Second), api.CheckPassing, "200 OK"},
		{"pass in grace", hist(pass), time.Minute, at(time.Second), api.CheckPassing, "200 OK"},
		{"fail, no grace", hist(fail), 0, at(time.Second), api.CheckCritical, fail.Output},
		{"fail in grace", hist(fail), 10 * time.Second, at(9 * time.Second), api.CheckWarning, fail.Output},
		{"fail, grace just over", hist(fail), 10 * time.Second, at(10 * time.Second), api.CheckCritical, fail.Output},
		{"fail after grace", hist(fail, fail), 10 * time.Second, at(time.Minute), api.CheckCritical, fail.Output},
		{"fail after a pass, in grace", hist(pass, fail), time.Minute, at(time.Second), api.CheckCritical, fail.Output},
		{"recovered", hist(pass, fail, pass), 0, at(time.Minute), api.CheckPassing, "200 OK"},
		{"fail, pass, fail, after grace", hist(fail, pass, fail), time.Second, at(time.Minute), api.CheckCritical, fail.Output},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, output := Decide(tt.h, tt.grace, tt.now)
			if status != tt.wantStatus || output != tt.wantOutput {
				t.Errorf("Decide = %s %q, want %s %q", status, output, tt.wantStatus, tt.wantOutput)
			}
		})
	}
}

func TestHistoryAdd(t *testing.T) {
	h := History{}.Add(Result{OK: true}).Add(Result{OK: false, Output: "x"})
	if h.Runs != 2 || !h.EverPassed || h.Last.Output != "x" {
		t.Errorf("history %+v", h)
	}
}

func TestNextRun(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	s := time.Second
	for _, tt := range []struct {
		now  time.Duration
		want time.Duration
	}{
		{-s, 0},            // not yet at the first run
		{0, s},             // just ran the first
		{s / 2, s},         // a quick probe
		{s, 2 * s},         // on the dot: the next one
		{3*s + s/2, 4 * s}, // a slow probe skips the runs it overlapped
		{10*s + time.Nanosecond, 11 * s},
	} {
		if got := nextRun(t0, s, t0.Add(tt.now)); !got.Equal(t0.Add(tt.want)) {
			t.Errorf("nextRun at +%s = +%s, want +%s", tt.now, got.Sub(t0), tt.want)
		}
	}
}
