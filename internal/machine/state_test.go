package machine

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestTransitionMatrix checks every (from, to) pair against the reviewed
// list in testdata/transitions.golden: each state and the states it may
// move to; every other pair must be refused with a TransitionError.
func TestTransitionMatrix(t *testing.T) {
	var b strings.Builder
	for _, from := range States() {
		var allowed []string
		for _, to := range States() {
			err := Transition(from, to)
			if err == nil {
				allowed = append(allowed, string(to))
				continue
			}
			// Every refusal is a *TransitionError naming both states.
			var te *TransitionError
			if !errors.As(err, &te) || !errors.Is(err, ErrIllegalTransition) {
				t.Fatalf("%s→%s: error %T is not a TransitionError", from, to, err)
			}
			if !strings.Contains(err.Error(), string(from)) || !strings.Contains(err.Error(), string(to)) {
				t.Errorf("%s→%s: error %q does not name both states", from, to, err)
			}
		}
		fmt.Fprintf(&b, "%-13s (%s) → %s\n", from, from.Kind(), strings.Join(allowed, " "))
	}
	golden := filepath.Join("testdata", "transitions.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got := b.String(); got != string(want) {
		t.Errorf("transition matrix changed (run with -update after review):\n got:\n%s\nwant:\n%s", got, want)
	}
}

func TestKinds(t *testing.T) {
	seen := map[Kind]int{}
	for _, s := range States() {
		if !s.Valid() {
			t.Fatalf("%s not valid", s)
		}
		seen[s.Kind()]++
		if s.Kind() == Terminal && len(Next(s)) != 0 {
			t.Errorf("terminal %s has exits %v", s, Next(s))
		}
		if s.Kind() != Terminal && len(Next(s)) == 0 {
			t.Errorf("non-terminal %s has no exit", s)
		}
	}
	if seen[Persistent] != 5 || seen[Transient] != 9 || seen[Terminal] != 2 {
		t.Errorf("kind counts = %v, want 5 persistent, 9 transient, 2 terminal", seen)
	}
	if State("bogus").Valid() || State("bogus").Kind() != 0 {
		t.Error("unknown state counted as valid")
	}
	if _, err := ParseState("bogus"); err == nil {
		t.Error("ParseState accepted bogus")
	}
	if s, err := ParseState("started"); err != nil || s != Started {
		t.Errorf("ParseState(started) = %v, %v", s, err)
	}
}

// TestEveryStateCanBeDestroyed: whatever happens, a machine can always be
// torn down, and every transient state leads somewhere that rests.
func TestEveryStateCanBeDestroyed(t *testing.T) {
	for _, s := range States() {
		if s.Kind() == Terminal {
			continue
		}
		if !reaches(s, Destroyed) && !reaches(s, Replaced) {
			t.Errorf("%s cannot reach destroyed or replaced", s)
		}
		if s != Replacing && s.Kind() != Terminal && !reaches(s, Destroyed) {
			t.Errorf("%s cannot be destroyed", s)
		}
	}
}

func reaches(from, to State) bool {
	seen := map[State]bool{from: true}
	queue := []State{from}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		for _, n := range Next(s) {
			if n == to {
				return true
			}
			if !seen[n] {
				seen[n] = true
				queue = append(queue, n)
			}
		}
	}
	return false
}

// TestLifecycles walks the paths the agent takes, step by step.
func TestLifecycles(t *testing.T) {
	paths := map[string][]State{
		"create and start":       {Creating, Starting, Started},
		"create skip_launch":     {Creating, Created, Starting, Started},
		"image missing":          {Creating, LaunchFailed, Failed, Destroying, Destroyed},
		"stop and start":         {Started, Stopping, Stopped, Starting, Started},
		"crash, restart":         {Started, Restarting, Starting, Started},
		"crash loop gives up":    {Started, Restarting, Starting, Started, Failed},
		"clean exit":             {Started, Stopped},
		"user restart":           {Started, Restarting, Starting, Started},
		"stop during backoff":    {Restarting, Stopped},
		"new version of running": {Updating, Starting, Started},
		"old version":            {Started, Replacing, Replaced},
		"force destroy":          {Started, Destroying, Destroyed},
		"start fails":            {Starting, Failed, Starting, Started},
		"suspend and resume":     {Started, Suspending, Suspended, Starting, Started},
	}
	for name, p := range paths {
		for i := 1; i < len(p); i++ {
			if err := Transition(p[i-1], p[i]); err != nil {
				t.Errorf("%s: step %d: %v", name, i, err)
			}
		}
	}
	illegal := [][2]State{{Stopped, Started}, {Created, Started}, {Destroyed, Starting}, {Replaced, Started},
		{Started, Started}, {Started, Created}, {Stopping, Started}, {"bogus", Started}, {Started, "bogus"}}
	for _, p := range illegal {
		if err := Transition(p[0], p[1]); err == nil {
			t.Errorf("%s→%s allowed", p[0], p[1])
		}
	}
	if got := Transition(Destroyed, Starting).Error(); !strings.Contains(got, "terminal") {
		t.Errorf("terminal error %q does not say terminal", got)
	}
}
