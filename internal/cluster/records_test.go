package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/hashicorp/memberlist"
)

// idle returns a member that is never started: records are fed to it by
// hand, as memberlist would hand them over.
func idle(t testing.TB, id string, mod func(*Config)) *Cluster {
	t.Helper()
	cfg := Config{HostID: id, Region: "ams", Logger: testLogger(t, slog.LevelError)}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// published publishes facts on an idle member and returns the deltas it
// would gossip.
func published(t testing.TB, c *Cluster, f HostFacts) [][]byte {
	t.Helper()
	if err := c.Publish(f); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, b := range c.queue.GetBroadcasts(0, 1<<30) {
		out = append(out, bytes.Clone(b))
	}
	c.queue.Reset()
	return out
}

// know makes the receiver know owner as a live member.
func know(c *Cluster, owner, region string) {
	c.memberUp(&memberlist.Node{Name: owner, Addr: []byte{10, 0, 0, 1}, Port: 7946,
		Meta: encodeMeta(&hostMeta{Region: region, Capacity: Resources{CPUs: 2, MemoryMB: 1024}})})
}

func factsOf(c *Cluster, owner string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.store.full(owner)
	if f == nil {
		return "<none>"
	}
	return fmt.Sprintf("%+v", *f)
}

// TestDuplicatesAndReordering feeds one owner's deltas to another member in
// shuffled orders with duplicates and stale repeats: it always ends with
// exactly the owner's facts.
func TestDuplicatesAndReordering(t *testing.T) {
	p := idle(t, "p", nil)
	var msgs [][]byte
	ms := machines("m", "web", "ams", 30) // 30 machines: several deltas per publish
	for step := range 8 {
		switch step % 4 {
		case 1:
			ms[step].Checks[0].Status = CheckCritical
		case 2:
			ms = ms[1:]
		case 3:
			ms = append(ms, machine(fmt.Sprintf("n%d", step), "api", "ams"))
		}
		msgs = append(msgs, published(t, p, HostFacts{Machines: ms, Load: float64(step) / 10, Free: Resources{CPUs: step}})...)
	}
	if len(msgs) < 10 {
		t.Fatalf("only %d deltas", len(msgs))
	}
	want := factsOf(p, "p")
	for seed := range uint64(50) {
		r := idle(t, "r", nil)
		know(r, "p", "ams")
		rng := rand.New(rand.NewPCG(seed, 1))
		feed := append([][]byte{}, msgs...)
		for range len(msgs) / 2 { // duplicates
			feed = append(feed, msgs[rng.IntN(len(msgs))])
		}
		rng.Shuffle(len(feed), func(i, j int) { feed[i], feed[j] = feed[j], feed[i] })
		d := &delegate{r}
		for _, b := range feed {
			d.NotifyMsg(b)
		}
		if got := factsOf(r, "p"); got != want {
			t.Fatalf("seed %d: receiver holds\n%s\nwant\n%s", seed, got, want)
		}
		// Stale: an old full record and old deltas change nothing.
		old := &fullFacts{Owner: "p", Version: 1, Machines: machines("z", "old", "ams", 1)}
		d.NotifyMsg(encodeFull([]*fullFacts{old}))
		d.NotifyMsg(msgs[0])
		if got := factsOf(r, "p"); got != want {
			t.Fatalf("seed %d: stale records changed the facts", seed)
		}
		st := r.Stats()
		if st.Dropped != 0 || st.Stale == 0 {
			t.Fatalf("seed %d: stats %+v", seed, st)
		}
		s := r.build()
		if h := s.Host("p"); h == nil || len(h.Machines) != len(ms) || h.Load != 0.7 {
			t.Fatalf("seed %d: snapshot host %+v", seed, h)
		}
	}
}

// TestFullFactsAndOwnRecords: a newer full record replaces an owner's facts
// whatever deltas came before; a record about the receiver itself is never
// applied, and one newer than its own makes it republish above it.
func TestFullFactsAndOwnRecords(t *testing.T) {
	r := idle(t, "r", nil)
	d := &delegate{r}
	know(r, "p", "ams")
	now := uint64(time.Now().UnixNano())
	d.NotifyMsg(encodeFull([]*fullFacts{{Owner: "p", Version: now, Machines: machines("a", "web", "ams", 3)}}))
	d.NotifyMsg(encodeFull([]*fullFacts{{Owner: "p", Version: now + 5, Machines: machines("b", "web", "ams", 1)}}))
	if s := r.build(); len(s.AppMachines("web")) != 1 || s.Machine("b0000") == nil {
		t.Fatalf("after newer full record: %v", view(s))
	}
	// A delta ahead of its base waits, then one full record makes it apply.
	d.NotifyMsg(encodeDelta(&delta{Owner: "p", Base: now + 6, Version: now + 7, Upserts: machines("c", "web", "ams", 1)}))
	if s := r.build(); s.Machine("c0000") != nil {
		t.Fatal("delta applied over a gap")
	}
	d.NotifyMsg(encodeFull([]*fullFacts{{Owner: "p", Version: now + 6, Machines: machines("b", "web", "ams", 1)}}))
	if s := r.build(); s.Machine("c0000") == nil || s.Host("p").Version != now+7 {
		t.Fatalf("waiting delta not applied after the full record: %v", view(s))
	}

	if err := r.Publish(HostFacts{Machines: machines("r", "own", "ams", 2)}); err != nil {
		t.Fatal(err)
	}
	r.queue.Reset()
	mine := r.build().Host("r").Version
	d.NotifyMsg(encodeFull([]*fullFacts{{Owner: "r", Version: mine + 100, Machines: machines("x", "forged", "ams", 1)}}))
	s := r.build()
	if len(s.AppMachines("forged")) != 0 || len(s.AppMachines("own")) != 2 {
		t.Fatalf("record about the receiver applied: %v", view(s))
	}
	if v := s.Host("r").Version; v <= mine+100 {
		t.Fatalf("own version %d not moved past %d", v, mine+100)
	}
	if r.queue.NumQueued() == 0 {
		t.Fatal("no republish queued")
	}
}

// TestHostileRecords: malformed or hostile records are dropped and counted;
// the facts already held, and later good records, are unaffected.
func TestHostileRecords(t *testing.T) {
	r := idle(t, "r", func(c *Config) { c.MaxMachines = 50 })
	d := &delegate{r}
	know(r, "p", "ams")
	know(r, "q", "fra")
	p := idle(t, "p", nil)
	for _, b := range published(t, p, HostFacts{Machines: machines("p", "web", "ams", 3)}) {
		d.NotifyMsg(b)
	}
	good := factsOf(r, "p")
	now := uint64(time.Now().UnixNano())
	bad := func(mod func(*Machine)) []byte {
		m := machine("evil", "web", "ams")
		mod(&m)
		return encodeDelta(&delta{Owner: "p", Base: 0, Version: now + 1, Upserts: []Machine{m}})
	}
	valid := encodeDelta(&delta{Owner: "q", Version: now, Upserts: machines("q", "api", "fra", 1)})
	hugeCount := append([]byte{wireFormat, kindFull}, 0xff, 0xff, 0x03) // 65535 owners, no bytes
	for _, tc := range []struct {
		name string
		msg  []byte
	}{
		{"empty", nil},
		{"garbage", []byte("\x00\x01garbage")},
		{"unknown format", append([]byte{9}, valid[1:]...)},
		{"unknown kind", []byte{wireFormat, 99}},
		{"truncated", valid[:len(valid)-3]},
		{"trailing bytes", append(bytes.Clone(valid), 0)},
		{"count beyond message", hugeCount},
		{"bad state", bad(func(m *Machine) { m.State = "exploding" })},
		{"bad machine id", bad(func(m *Machine) { m.ID = "../../etc" })},
		{"bad app", bad(func(m *Machine) { m.App = "" })},
		{"bad private ip", bad(func(m *Machine) { m.PrivateIP = "300.1.1.1" })},
		{"bad protocol", bad(func(m *Machine) { m.Services[0].Protocol = "icmp" })},
		{"port zero", bad(func(m *Machine) { m.Services[0].InternalPort = 0 })},
		{"soft over hard", bad(func(m *Machine) { m.Services[0].Concurrency.SoftLimit = 99 })},
		{"bad check status", bad(func(m *Machine) { m.Checks[0].Status = "fine" })},
		{"invalid utf-8 output", bad(func(m *Machine) { m.Checks[0].Output = "\xff\xfe" })},
		{"machine load over the max", bad(func(m *Machine) { m.Load = MaxLoad + 1 })},
		{"machine load huge varint", hugeMachineLoad(now)},
		{"owner bad", encodeDelta(&delta{Owner: "", Version: now})},
		{"version far ahead", encodeDelta(&delta{Owner: "p", Version: now + uint64(48*time.Hour)})},
		{"version max", encodeDelta(&delta{Owner: "p", Version: math.MaxUint64})},
		{"base not before version", encodeDelta(&delta{Owner: "p", Base: now + 2, Version: now + 2})},
		{"load NaN", encodeDelta(&delta{Owner: "p", Version: now + 1, Load: math.NaN()})},
		{"load negative", encodeDelta(&delta{Owner: "p", Version: now + 1, Load: -1})},
		{"duplicate machine", encodeDelta(&delta{Owner: "p", Version: now + 1, Upserts: []Machine{machine("dup", "web", "ams"), machine("dup", "web", "ams")}})},
		{"over the machine limit", encodeDelta(&delta{Owner: "p", Version: now + 1, Upserts: machines("many", "web", "ams", 51)})},
		{"removed id bad", encodeDelta(&delta{Owner: "p", Base: 1, Version: now + 1, Removes: []string{"a b"}})},
		{"digest from nobody", encodeDigest(&digest{From: "", All: true})},
	} {
		before := r.Stats().Dropped
		d.NotifyMsg(tc.msg)
		if r.Stats().Dropped != before+1 {
			t.Errorf("%s: not dropped (stats %+v)", tc.name, r.Stats())
		}
		if got := factsOf(r, "p"); got != good {
			t.Fatalf("%s: changed p's facts:\n%s", tc.name, got)
		}
	}
	// A full record with one bad owner among good ones: only the bad is lost.
	bundle := encodeFull([]*fullFacts{
		{Owner: "q", Version: now, Machines: machines("q", "api", "fra", 2)},
		{Owner: "p", Version: now + 9, Machines: []Machine{{ID: "x", App: "web", Region: "ams", State: "on fire"}}},
	})
	d.NotifyMsg(bundle)
	if got := factsOf(r, "p"); got != good {
		t.Fatalf("bad owner in a bundle changed p: %s", got)
	}
	if s := r.build(); len(s.AppMachines("api")) != 2 {
		t.Fatalf("good owner in the bundle not applied: %v", view(s))
	}
	// Invalid advertised facts hide the host, and nothing else.
	r.memberUp(&memberlist.Node{Name: "z", Addr: []byte{10, 0, 0, 9}, Meta: []byte("\x01\xff\xff")})
	if s := r.build(); s.Host("z") != nil || s.Host("p") == nil {
		t.Fatalf("host with invalid meta: %v", view(s))
	}
}

// hugeMachineLoad is a delta whose one machine says 2^63 requests in flight.
func hugeMachineLoad(now uint64) []byte {
	m := machine("evil", "web", "ams")
	b := encodeDelta(&delta{Owner: "p", Base: 0, Version: now + 1, Upserts: []Machine{m}})
	// The machine's load is the delta's last field: a zero varint.
	return append(b[:len(b)-1], 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f)
}

// TestMachineLoad: a machine's load travels in its record, each change as a
// new version, and a load no service limit could use is refused on publish
// and on receipt.
func TestMachineLoad(t *testing.T) {
	r := idle(t, "r", nil)
	d := &delegate{r}
	know(r, "p", "ams")
	p := idle(t, "p", nil)
	ms := machines("p", "web", "ams", 2)
	for _, load := range []int{7, 0, MaxLoad, 3} {
		ms[1].Load = load
		deltas := published(t, p, HostFacts{Machines: ms})
		if len(deltas) != 1 {
			t.Fatalf("load %d: %d deltas, want 1", load, len(deltas))
		}
		for _, b := range deltas {
			d.NotifyMsg(b)
		}
		m := r.build().Machine("p0001")
		if m == nil || m.Load != load || r.build().Machine("p0000").Load != 0 {
			t.Fatalf("load %d: receiver holds %+v", load, m)
		}
	}
	if got := published(t, p, HostFacts{Machines: ms}); len(got) != 0 {
		t.Fatalf("an unchanged load was published again: %d deltas", len(got))
	}
	for _, load := range []int{-1, MaxLoad + 1} {
		bad := machines("p", "web", "ams", 2)
		bad[1].Load = load
		var rej *RejectedError
		if err := p.Publish(HostFacts{Machines: bad}); !errors.As(err, &rej) || rej.Machines["p0001"] == nil {
			t.Fatalf("load %d published: %v", load, err)
		}
	}
}

// TestHostileHostOverNetwork: one host sends garbage to everyone, directly
// and by gossip; the others drop it and keep agreeing.
func TestHostileHostOverNetwork(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 7})
		var cs []*Cluster
		for _, id := range []string{"a", "b", "c", "evil"} {
			cs = append(cs, sim.add(id, "ams", fastTimings))
		}
		evil := cs[3]
		waitFor(t, 10*time.Second, "four members, known to evil too", func() bool {
			if len(cs[0].Snapshot().Hosts()) != 4 {
				return false
			}
			evil.mu.Lock()
			defer evil.mu.Unlock()
			return evil.members["a"] != nil && evil.members["b"] != nil && evil.members["c"] != nil
		})
		junk := encodeDelta(&delta{Owner: "a", Version: uint64(time.Now().UnixNano()),
			Upserts: []Machine{{ID: "x", App: "web", Region: "ams", State: "started", Services: []Service{{Protocol: "tcp", InternalPort: 99999}}}}})
		for i := range 20 {
			evil.enqueue(junk)
			evil.enqueue([]byte{wireFormat, kindDelta, 0xff})
			for _, id := range []string{"a", "b", "c"} {
				evil.mu.Lock()
				node := evil.members[id].node
				evil.mu.Unlock()
				evil.ml.SendBestEffort(&node, []byte(fmt.Sprintf("junk %d", i)))
			}
		}
		for _, c := range cs[:3] {
			if err := c.Publish(HostFacts{Machines: machines(c.cfg.HostID, "web", "ams", 2)}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the good hosts to agree", func() bool {
			return converged(cs, StatusAlive) && len(cs[0].Snapshot().AppMachines("web")) == 6
		})
		for _, c := range cs[:3] {
			if c.Stats().Dropped == 0 {
				t.Errorf("%s dropped nothing", c.cfg.HostID)
			}
			if c.Snapshot().Machine("x") != nil {
				t.Errorf("%s took the hostile machine", c.cfg.HostID)
			}
		}
	})
}

// FuzzDecodeRecord: no input makes the decoder or validation panic or
// allocate beyond the input's size, and what decodes re-encodes to the same
// value.
func FuzzDecodeRecord(f *testing.F) {
	now := uint64(time.Now().UnixNano())
	f.Add(encodeDelta(&delta{Owner: "p", Base: 1, Version: now, Upserts: machines("m", "web", "ams", 2), Removes: []string{"old"}}))
	f.Add(encodeFull([]*fullFacts{{Owner: "p", Version: now, Free: Resources{CPUs: 1, MemoryMB: 2}, Load: 0.5, Machines: machines("m", "web", "ams", 1)}}))
	f.Add(encodeDigest(&digest{From: "p", All: true, Entries: []digestEntry{{"q", 7}}}))
	f.Add([]byte{wireFormat, kindFull, 0xff, 0xff, 0x03})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeMessage(b)
		if err != nil {
			return
		}
		var again []byte
		switch m := v.(type) {
		case *delta:
			_ = validateDelta(m, time.Now(), maxMachines)
			again = encodeDelta(m)
		case []*fullFacts:
			for _, ff := range m {
				_ = validateFull(ff, time.Now(), maxMachines)
			}
			again = encodeFull(m)
		case *digest:
			_ = validateDigest(m)
			again = encodeDigest(m)
		}
		v2, err := decodeMessage(again)
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if d, ok := v.(*delta); ok {
			d.encoded = nil
			v2.(*delta).encoded = nil
		}
		if !reflect.DeepEqual(v, v2) && fmt.Sprint(v) != fmt.Sprint(v2) {
			t.Fatalf("round trip changed the record:\n%#v\n%#v", v, v2)
		}
	})
}

func FuzzDecodeMeta(f *testing.F) {
	f.Add(encodeMeta(&hostMeta{Region: "ams", Capacity: Resources{CPUs: 4, MemoryMB: 8192}, Addrs: map[string]string{"api": "10.0.0.1:4280"}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMeta(b)
		if err != nil {
			return
		}
		_ = validateMeta(m)
		if m2, err := decodeMeta(encodeMeta(m)); err != nil || m2.Region != m.Region || len(m2.Addrs) != len(m.Addrs) {
			t.Fatalf("round trip: %v %+v %+v", err, m, m2)
		}
	})
}

// TestExchangeGoesBothWays: a host answering a whole digest sends the
// sender the facts it lacks and asks it for those it holds newer; an
// answer to a partial digest, or to memberlist's push/pull (already
// two-way), asks for nothing.
func TestExchangeGoesBothWays(t *testing.T) {
	r := idle(t, "r", nil)
	know(r, "p", "ams")
	know(r, "q", "ams")
	now := uint64(time.Now().UnixNano())
	(&delegate{r}).NotifyMsg(encodeFull([]*fullFacts{
		{Owner: "p", Version: now + 5, Machines: machines("a", "web", "ams", 1)},
		{Owner: "q", Version: now + 1, Machines: machines("b", "web", "ams", 1)},
	}))
	r.started.Store(true) // sends queue up unsent: the loop is not running
	sent := func() (facts []string, asked []digestEntry) {
		for {
			select {
			case task := <-r.sends:
				if task.to != "s" {
					t.Fatalf("sent to %s", task.to)
				}
				switch m, _ := decodeMessage(task.msg); m := m.(type) {
				case []*fullFacts:
					for _, f := range m {
						facts = append(facts, fmt.Sprintf("%s@%d", f.Owner, f.Version-now))
					}
				case *digest:
					if m.From != "r" || m.All {
						t.Fatalf("asked with %+v", m)
					}
					asked = append(asked, m.Entries...)
				default:
					t.Fatalf("sent %T", m)
				}
			default:
				return facts, asked
			}
		}
	}
	d := &digest{From: "s", All: true, Entries: []digestEntry{{"p", now + 3}, {"q", now + 4}, {"x", now + 9}, {"r", now + 9}}}
	r.answer(d, true)
	facts, asked := sent()
	if want := []string{"p@5"}; !reflect.DeepEqual(facts, want) {
		t.Errorf("sent facts %v, want %v", facts, want)
	}
	// q is newer there, x unknown here; r is the receiver itself, whose
	// facts no one else may hold newer.
	if want := []digestEntry{{"q", now + 1}, {"x", 0}}; !reflect.DeepEqual(asked, want) {
		t.Errorf("asked for %v, want %v", asked, want)
	}
	r.answer(d, false)
	if _, asked := sent(); len(asked) != 0 {
		t.Errorf("push/pull answer asked for %v", asked)
	}
	d.All = false
	r.answer(d, true)
	if _, asked := sent(); len(asked) != 0 {
		t.Errorf("answer to a partial digest asked for %v", asked)
	}
}
