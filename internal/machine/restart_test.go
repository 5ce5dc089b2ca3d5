package machine

import (
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestNewRestartPolicy(t *testing.T) {
	p, err := NewRestartPolicy("", 0)
	if err != nil || p.Policy != PolicyOnFailure || p.MaxRetries != DefaultMaxRetries {
		t.Errorf("default = %+v, %v", p, err)
	}
	if p, _ := NewRestartPolicy("always", 3); p.MaxRetries != 3 {
		t.Errorf("max retries not kept: %+v", p)
	}
	if _, err := NewRestartPolicy("sometimes", 0); err == nil {
		t.Error("accepted unknown policy")
	}
}

func TestBackoffDelay(t *testing.T) {
	b := Backoff{Base: 100 * time.Millisecond, Max: time.Second}
	want := []time.Duration{0, 100, 200, 400, 800, 1000, 1000}
	for n, w := range want {
		if got := b.Delay(n); got != w*time.Millisecond {
			t.Errorf("Delay(%d) = %v, want %v", n, got, w*time.Millisecond)
		}
	}
	if got := b.Delay(1000); got != time.Second {
		t.Errorf("Delay(1000) = %v (overflow?)", got)
	}
	if got := (Backoff{}).Delay(3); got != 0 {
		t.Errorf("zero backoff = %v", got)
	}
}

func TestDecide(t *testing.T) {
	b := Backoff{Base: 100 * time.Millisecond, Max: time.Second, Window: time.Minute}
	short := func(failed bool) ExitInfo {
		return ExitInfo{Failed: failed, StartedAt: t0, At: t0.Add(time.Second)}
	}
	long := ExitInfo{Failed: true, StartedAt: t0, At: t0.Add(2 * time.Minute)}
	requested := ExitInfo{Failed: true, RequestedStop: true, StartedAt: t0, At: t0.Add(time.Second)}
	tests := []struct {
		name   string
		policy RestartPolicy
		exit   ExitInfo
		count  int
		want   Decision
	}{
		{"no: failure stays stopped", RestartPolicy{PolicyNo, 10}, short(true), 0, Decision{Next: Stopped}},
		{"no: clean exit", RestartPolicy{PolicyNo, 10}, short(false), 0, Decision{Next: Stopped}},
		{"on-failure: clean exit stops", RestartPolicy{PolicyOnFailure, 10}, short(false), 4, Decision{Next: Stopped}},
		{"on-failure: first failure", RestartPolicy{PolicyOnFailure, 10}, short(true), 0, Decision{Next: Restarting, Delay: 100 * time.Millisecond, Count: 1}},
		{"on-failure: third failure backs off", RestartPolicy{PolicyOnFailure, 10}, short(true), 2, Decision{Next: Restarting, Delay: 400 * time.Millisecond, Count: 3}},
		{"on-failure: last retry", RestartPolicy{PolicyOnFailure, 3}, short(true), 2, Decision{Next: Restarting, Delay: 400 * time.Millisecond, Count: 3}},
		{"on-failure: budget spent", RestartPolicy{PolicyOnFailure, 3}, short(true), 3, Decision{Next: Failed, Count: 3}},
		{"on-failure: zero max means default", RestartPolicy{PolicyOnFailure, 0}, short(true), 9, Decision{Next: Restarting, Delay: time.Second, Count: 10}},
		{"on-failure: default budget spent", RestartPolicy{PolicyOnFailure, 0}, short(true), 10, Decision{Next: Failed, Count: 10}},
		{"on-failure: long run resets count", RestartPolicy{PolicyOnFailure, 3}, long, 3, Decision{Next: Restarting, Delay: 100 * time.Millisecond, Count: 1}},
		{"always: clean exit restarts", RestartPolicy{PolicyAlways, 1}, short(false), 0, Decision{Next: Restarting, Delay: 100 * time.Millisecond, Count: 1}},
		{"always: never gives up", RestartPolicy{PolicyAlways, 1}, short(true), 50, Decision{Next: Restarting, Delay: time.Second, Count: 51}},
		{"requested stop never restarts", RestartPolicy{PolicyAlways, 10}, requested, 5, Decision{Next: Stopped}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.policy.Decide(tt.exit, tt.count, b)
			if got != tt.want {
				t.Errorf("Decide = %+v, want %+v", got, tt.want)
			}
			if err := Transition(Started, got.Next); err != nil {
				t.Errorf("decision leads to illegal move: %v", err)
			}
		})
	}
}

// TestCrashLoopEndsAfterMaxRetries replays a crash loop through Decide and
// the state machine until the policy gives up.
func TestCrashLoopEndsAfterMaxRetries(t *testing.T) {
	p, _ := NewRestartPolicy(PolicyOnFailure, 0)
	state, count, now := Started, 0, t0
	restarts := 0
	for i := 0; i < 100 && state != Failed; i++ {
		d := p.Decide(ExitInfo{Failed: true, StartedAt: now, At: now.Add(10 * time.Millisecond)}, count, DefaultBackoff)
		if err := Transition(state, d.Next); err != nil {
			t.Fatal(err)
		}
		state, count = d.Next, d.Count
		if state == Restarting {
			restarts++
			now = now.Add(10*time.Millisecond + d.Delay)
			for _, s := range []State{Starting, Started} {
				if err := Transition(state, s); err != nil {
					t.Fatal(err)
				}
				state = s
			}
		}
	}
	if state != Failed || restarts != DefaultMaxRetries {
		t.Errorf("ended %s after %d restarts, want failed after %d", state, restarts, DefaultMaxRetries)
	}
}
