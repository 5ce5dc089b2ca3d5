package cluster

import (
	"fmt"
	"testing"
)

// storeSize is what c holds: owners and machines in all.
func storeSize(c *Cluster) (owners, machines int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, o := range c.store.owners {
		machines += len(o.machines)
	}
	if machines != c.store.total {
		panic(fmt.Sprintf("store counts %d machines, holds %d", c.store.total, machines))
	}
	return len(c.store.owners), machines
}

// TestOwnerFloodBounded: a rogue sender making up owners — by deltas, by
// full records in one message, by deltas waiting for a base that never
// comes — grows no member past its bounds on owners and machines; at the
// bounds, a real member's facts still get in, in place of made-up ones.
func TestOwnerFloodBounded(t *testing.T) {
	const maxOwners, maxTotal = 50, 400
	c := idle(t, "victim", func(cfg *Config) { cfg.MaxOwners, cfg.MaxStoredMachines, cfg.MaxMachines = maxOwners, maxTotal, 100 })
	know(c, "real", "ams")

	// Deltas from nothing, one made-up owner each.
	for i := range 500 {
		owner := fmt.Sprintf("rogue-d%04d", i)
		c.receive(encodeDelta(&delta{Owner: owner, Version: 1, Upserts: machines(owner+"-", "app", "ams", 3)}), false)
	}
	// Full records, many owners in one message.
	var batch []*fullFacts
	for i := range 500 {
		owner := fmt.Sprintf("rogue-f%04d", i)
		batch = append(batch, &fullFacts{Owner: owner, Version: 1, Machines: machines(owner+"-", "app", "ams", 2)})
	}
	c.receive(encodeFull(batch), false)
	// Deltas ahead of their base: they wait, under an owner.
	for i := range 500 {
		owner := fmt.Sprintf("rogue-w%04d", i)
		c.receive(encodeDelta(&delta{Owner: owner, Base: 5, Version: 6, Upserts: machines(owner+"-", "app", "ams", 1)}), false)
	}
	owners, ms := storeSize(c)
	if owners > maxOwners || ms > maxTotal {
		t.Fatalf("after the flood: %d owners, %d machines; bounds %d, %d", owners, ms, maxOwners, maxTotal)
	}
	if c.Stats().Dropped == 0 {
		t.Error("nothing of the flood was counted as dropped")
	}
	t.Logf("after the flood: %d owners, %d machines", owners, ms)

	// A member's facts take the place of made-up ones, machines too.
	c.receive(encodeDelta(&delta{Owner: "real", Version: 1, Upserts: machines("real-", "app", "ams", 100)}), false)
	if got := factsOf(c, "real"); got == "<none>" {
		t.Fatal("a member's facts were refused at the bound")
	}
	owners, ms = storeSize(c)
	if owners > maxOwners || ms > maxTotal {
		t.Fatalf("after the member: %d owners, %d machines; bounds %d, %d", owners, ms, maxOwners, maxTotal)
	}
	// And a made-up owner still cannot push a member out.
	c.receive(encodeDelta(&delta{Owner: "rogue-late", Version: 1, Upserts: machines("late-", "app", "ams", 100)}), false)
	if got := factsOf(c, "real"); got == "<none>" {
		t.Fatal("a made-up owner pushed a member's facts out")
	}
	if owners, ms = storeSize(c); owners > maxOwners || ms > maxTotal {
		t.Fatalf("after a late rogue: %d owners, %d machines; bounds %d, %d", owners, ms, maxOwners, maxTotal)
	}
}

// TestStoreBoundsCount: the store's machine count follows every change.
func TestStoreBoundsCount(t *testing.T) {
	s := newStore("self", 100)
	s.bound(3, 10, nil)
	if r := s.applyFull(&fullFacts{Owner: "a", Version: 1, Machines: machines("a", "x", "ams", 6)}); r != resultApplied {
		t.Fatal(r)
	}
	if r := s.applyFull(&fullFacts{Owner: "b", Version: 1, Machines: machines("b", "x", "ams", 5)}); r != resultInvalid {
		t.Fatalf("over the machines bound: %v", r)
	}
	if r := s.applyDelta(&delta{Owner: "a", Base: 1, Version: 2, Upserts: machines("a", "x", "ams", 8)[6:], Removes: []string{"a0000"}}, 0); r != resultApplied {
		t.Fatal(r)
	}
	if s.total != 7 {
		t.Fatalf("total %d, want 7", s.total)
	}
	s.applyFull(&fullFacts{Owner: "b", Version: 1, Machines: machines("b", "x", "ams", 3)})
	if r := s.applyDelta(&delta{Owner: "c", Version: 1}, 0); r != resultApplied {
		t.Fatal(r)
	}
	if r := s.applyDelta(&delta{Owner: "d", Version: 1}, 0); r != resultInvalid {
		t.Fatalf("over the owners bound: %v", r)
	}
	s.remove("a")
	if s.total != 3 || len(s.owners) != 2 {
		t.Fatalf("after remove: %d machines, %d owners", s.total, len(s.owners))
	}
}
