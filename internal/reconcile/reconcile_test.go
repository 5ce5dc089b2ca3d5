package reconcile

import (
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/place"
)

var update = flag.Bool("update", false, "rewrite the golden output in testdata")

// t0 is the origin of a script's times: "5m" is five minutes after it.
var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// script is the state a testdata script builds up, command by command.
type script struct {
	now      time.Time
	group    Group
	room     map[string]int
	machines map[string]Machine
	policy   Policy
}

// TestScripts runs the scenarios of testdata/*.txt. A scenario is a list of
// commands, each followed by "----" and the output it must give, blocks
// separated by a blank line:
//
//	group ams=2 iad=1 standbys=1 spill guest=1/256
//	policy lost-after=30s backoff=10s max=10m
//	room ams=3 iad=0
//	m <id> <slot> <up|down|unknown> <state|-> [created=<offset>] [standby]
//	rm <id>
//	fail <region> <machine> <cause…>     (what the control plane records)
//	placed <id>                           (the control plane placed it
//	                                       started: its run is recorded)
//	decide <offset>                       (plans a pass at t0+offset, keeps
//	                                       the plan's backoff and pending)
//
// Run with -update to rewrite the outputs, then review the diff.
func TestScripts(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.txt"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			got := run(t, string(b))
			if *update {
				if err := os.WriteFile(f, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got != string(b) {
				t.Errorf("%s: output differs (run with -update after review):\n%s", f, diffLines(string(b), got))
			}
		})
	}
}

// run executes a script and returns it with each command's output
// replaced by what the command gives now.
func run(t *testing.T, text string) string {
	s := &script{now: t0, room: map[string]int{}, machines: map[string]Machine{},
		group:  Group{Regions: map[string]int{}, Guest: place.Resources{CPUs: 1, MemoryMB: 256}},
		policy: Policy{LostAfter: 30 * time.Second, BackoffBase: 10 * time.Second, BackoffMax: 10 * time.Minute}}
	var out strings.Builder
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	for i := 0; i < len(lines); i++ {
		line := lines[i]
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			out.WriteString(line + "\n")
			continue
		}
		out.WriteString(line + "\n")
		// Skip the recorded output, up to a blank line.
		if i+1 >= len(lines) || lines[i+1] != "----" {
			t.Fatalf("line %d: %q: no ---- after the command", i+1, line)
		}
		i++
		for i+1 < len(lines) && strings.TrimSpace(lines[i+1]) != "" {
			i++
		}
		out.WriteString("----\n")
		res, err := s.do(line)
		if err != nil {
			t.Fatalf("line %d: %q: %v", i+1, line, err)
		}
		out.WriteString(res)
	}
	return out.String()
}

func offset(s string) (time.Time, error) {
	d, err := time.ParseDuration(s)
	return t0.Add(d), err
}

func (s *script) do(line string) (string, error) {
	f := strings.Fields(line)
	switch f[0] {
	case "group":
		g := Group{Regions: map[string]int{}, Guest: s.group.Guest, Backoff: s.group.Backoff, Pending: s.group.Pending,
			Started: s.group.Started}
		for _, a := range f[1:] {
			k, v, _ := strings.Cut(a, "=")
			switch k {
			case "standbys":
				g.Standbys, _ = strconv.Atoi(v)
			case "spill":
				g.Spill = true
			case "guest":
				c, m, _ := strings.Cut(v, "/")
				g.Guest.CPUs, _ = strconv.Atoi(c)
				g.Guest.MemoryMB, _ = strconv.Atoi(m)
			default:
				n, err := strconv.Atoi(v)
				if err != nil {
					return "", fmt.Errorf("region count %q: %w", a, err)
				}
				g.Regions[k] = n
			}
		}
		s.group = g
		return "", nil
	case "policy":
		for _, a := range f[1:] {
			k, v, _ := strings.Cut(a, "=")
			d, err := time.ParseDuration(v)
			if err != nil {
				return "", err
			}
			switch k {
			case "lost-after":
				s.policy.LostAfter = d
			case "backoff":
				s.policy.BackoffBase = d
			case "max":
				s.policy.BackoffMax = d
			default:
				return "", fmt.Errorf("unknown policy %q", k)
			}
		}
		return "", nil
	case "room":
		s.room = map[string]int{}
		for _, a := range f[1:] {
			k, v, _ := strings.Cut(a, "=")
			n, err := strconv.Atoi(v)
			if err != nil {
				return "", err
			}
			s.room[k] = n
		}
		return "", nil
	case "m":
		if len(f) < 5 {
			return "", fmt.Errorf("m <id> <slot> <host> <state> [created=…] [standby]")
		}
		m := Machine{ID: f[1], Slot: f[2], Created: t0}
		switch f[3] {
		case "up":
			m.Host = HostUp
		case "down":
			m.Host = HostDown
		case "unknown":
			m.Host = HostUnknown
		default:
			return "", fmt.Errorf("host status %q", f[3])
		}
		if f[4] != "-" {
			st, err := machine.ParseState(f[4])
			if err != nil {
				return "", err
			}
			m.State = st
		}
		for _, a := range f[5:] {
			k, v, _ := strings.Cut(a, "=")
			switch k {
			case "created":
				var err error
				if m.Created, err = offset(v); err != nil {
					return "", err
				}
			case "standby":
				m.Standby = true
			default:
				return "", fmt.Errorf("unknown machine field %q", k)
			}
		}
		s.machines[m.ID] = m
		return "", nil
	case "placed":
		if s.group.Started == nil {
			s.group.Started = map[string]Run{}
		}
		s.group.Started[f[1]] = Run{At: s.now}
		return "", nil
	case "rm":
		delete(s.machines, f[1])
		return "", nil
	case "fail":
		if len(f) < 4 {
			return "", fmt.Errorf("fail <region> <machine> <cause>")
		}
		if s.group.Backoff == nil {
			s.group.Backoff = map[string]Backoff{}
		}
		s.group.Backoff[f[1]] = s.group.Backoff[f[1]].Failed(s.now, f[2], strings.Join(f[3:], " "), s.policy)
		return s.backoffs(), nil
	case "decide":
		if len(f) != 2 {
			return "", fmt.Errorf("decide <offset>")
		}
		var err error
		if s.now, err = offset(f[1]); err != nil {
			return "", err
		}
		in := Input{Group: s.group, Room: s.room, Now: s.now, Policy: s.policy}
		for _, id := range slices.Sorted(maps.Keys(s.machines)) {
			in.Machines = append(in.Machines, s.machines[id])
		}
		p := Decide(in)
		var b strings.Builder
		for _, a := range p.Actions {
			b.WriteString(a.String() + "\n")
		}
		s.group.Backoff, s.group.Pending, s.group.Started = p.Backoff, p.Pending, p.Started
		for _, r := range slices.Sorted(maps.Keys(p.Pending)) {
			fmt.Fprintf(&b, "pending %s: %s\n", r, p.Pending[r])
		}
		b.WriteString(s.backoffs())
		if len(p.Started) > 0 {
			var runs []string
			for _, id := range slices.Sorted(maps.Keys(p.Started)) {
				x := p.Started[id]
				r := fmt.Sprintf("%s@%s", id, x.At.Sub(t0))
				if x.Seen {
					r += " seen"
				}
				runs = append(runs, r)
			}
			fmt.Fprintf(&b, "runs: %s\n", strings.Join(runs, ", "))
		}
		in.Group = s.group
		st := Status(in)
		for _, r := range slices.Sorted(maps.Keys(st)) {
			x := st[r]
			fmt.Fprintf(&b, "status %s: started=%d stopped=%d failed=%d pending=%d standby=%d\n",
				r, x.Started, x.Stopped, x.Failed, x.Pending, x.Standby)
		}
		return b.String(), nil
	}
	return "", fmt.Errorf("unknown command %q", f[0])
}

func (s *script) backoffs() string {
	var b strings.Builder
	for _, r := range slices.Sorted(maps.Keys(s.group.Backoff)) {
		x := s.group.Backoff[r]
		fmt.Fprintf(&b, "backoff %s: failures=%d until=%s machine=%s error=%s\n",
			r, x.Failures, x.Until.Sub(t0), x.Machine, x.LastError)
	}
	return b.String()
}

// diffLines shows the lines of want and got that differ, by position.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := range max(len(w), len(g)) {
		var x, y string
		if i < len(w) {
			x = w[i]
		}
		if i < len(g) {
			y = g[i]
		}
		if x != y {
			fmt.Fprintf(&b, "line %d:\n  want %q\n   got %q\n", i+1, x, y)
		}
	}
	return b.String()
}

// TestBackoffDoubles: each failure doubles the wait, up to the maximum.
func TestBackoffDoubles(t *testing.T) {
	p := Policy{BackoffBase: time.Second, BackoffMax: 10 * time.Second}
	var b Backoff
	var got []time.Duration
	for range 6 {
		b = b.Failed(t0, "m", "boom", p)
		got = append(got, b.Until.Sub(t0))
	}
	want := []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second}
	if !slices.Equal(got, want) {
		t.Fatalf("waits %v, want %v", got, want)
	}
}

// TestNeverSpillsUnasked: whatever the room elsewhere, a group that does not
// opt in places only in its declared regions, and never more than fits.
func TestNeverSpillsUnasked(t *testing.T) {
	for _, room := range []int{0, 1, 7, 500} {
		in := Input{Group: Group{Regions: map[string]int{"ams": 200}, Standbys: 1}, Now: t0,
			Room:   map[string]int{"ams": room, "iad": 1000, "syd": 1000},
			Policy: Policy{LostAfter: time.Minute, BackoffBase: time.Second, BackoffMax: time.Minute}}
		p := Decide(in)
		places := 0
		for _, a := range p.Actions {
			if a.Kind != Place {
				continue
			}
			places++
			if !slices.Equal(a.Regions, []string{"ams"}) {
				t.Fatalf("room %d: placed in %v", room, a.Regions)
			}
		}
		if places != min(room, 201) {
			t.Errorf("room %d: %d places", room, places)
		}
		if room < 200 && !strings.Contains(p.Pending["ams"], "no room") {
			t.Errorf("room %d: pending reason %q", room, p.Pending["ams"])
		}
	}
}
