package cluster

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/pki"
)

// testPKI is a cluster's CA and the identities it issued.
type testPKI struct {
	t  testing.TB
	ca *pki.CA
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	ca, err := pki.NewCA("flame test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, ca: ca}
}

// trust enrolls host id: a key and a certificate of the CA naming it.
func (p *testPKI) trust(id string) *Trust {
	p.t.Helper()
	key, err := pki.NewKey()
	if err != nil {
		p.t.Fatal(err)
	}
	cert, err := p.ca.Issue(pki.RoleHost, id, &key.PublicKey, time.Now(), pki.HostValidity)
	if err != nil {
		p.t.Fatal(err)
	}
	return &Trust{Key: key, Cert: cert.Raw, CA: p.ca.Cert}
}

var testGossipKey = bytes.Repeat([]byte{7}, 32)

// keyed gives a member the cluster's gossip key and an enrolled identity.
func keyed(p *testPKI, mod func(*Config)) func(*Config) {
	return func(c *Config) {
		fastTimings(c)
		c.GossipKeys = [][]byte{testGossipKey}
		c.Trust = p.trust(c.HostID)
		if mod != nil {
			mod(c)
		}
	}
}

// TestRogueWithoutKeyCannotJoinNorRead: a member without the cluster's
// gossip key cannot join, is never seen as a host, and learns nothing of
// what the cluster gossips, although the hosts publish while it knocks.
func TestRogueWithoutKeyCannotJoinNorRead(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		p := newTestPKI(t)
		sim := newSim(t, netsim.Config{Seed: 11})
		a := sim.add("a", "ams", keyed(p, nil))
		b := sim.add("b", "ams", keyed(p, nil))
		for _, c := range []*Cluster{a, b} {
			if !c.Encrypted() {
				t.Fatalf("%s gossips in clear", c.cfg.HostID)
			}
			if err := c.Publish(HostFacts{Machines: machines(c.cfg.HostID+"-", "web", "ams", 2)}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "a and b to agree", func() bool { return converged([]*Cluster{a, b}, StatusAlive) })

		// The rogue, with the CA's certificate even, but no key.
		if _, err := sim.net.AddHost("rogue"); err != nil {
			t.Fatal(err)
		}
		tr, err := sim.net.Transport("rogue", 7946)
		if err != nil {
			t.Fatal(err)
		}
		cfg := Config{HostID: "rogue", Region: "ams", Transport: tr, Logger: testLogger(t, slog.LevelError),
			Capacity: Resources{CPUs: 512, MemoryMB: 1 << 20}}
		fastTimings(&cfg)
		rogue, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := rogue.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rogue.Close() })
		if n, err := rogue.Join([]string{sim.addrs["a"], sim.addrs["b"]}); err == nil || n != 0 {
			t.Fatalf("the rogue joined %d hosts (err %v)", n, err)
		}
		// b knocks at the rogue too (as a host told its address would),
		// and the hosts keep gossiping.
		if _, err := b.Join([]string{tr.Addr()}); err == nil {
			t.Fatal("b joined the rogue")
		}
		for i := range 5 {
			if err := a.Publish(HostFacts{Machines: machines("a-", "web", "ams", 2+i)}); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second)
		}
		for _, c := range []*Cluster{a, b} {
			if c.Snapshot().Host("rogue") != nil {
				t.Errorf("%s sees the rogue as a host", c.cfg.HostID)
			}
		}
		if hs := rogue.Snapshot().Hosts(); len(hs) != 1 || rogue.Snapshot().Machine("a-0000") != nil {
			t.Errorf("the rogue learned of %d hosts", len(hs))
		}
		if st := rogue.Stats(); st.Applied != 0 {
			t.Errorf("the rogue applied %d records", st.Applied)
		}
		if _, recv, _, _ := sim.net.Stats("rogue"); recv == 0 {
			t.Error("nothing reached the rogue: the test proves nothing")
		}
	})
}

// TestForgedRecordsIgnored: a host with the gossip key (and its own
// enrollment, or none) forges another host's facts — a machine "payments"
// at its own address — and death verdicts about a live host; every host
// ignores them, and the forged machine never appears in any view.
func TestForgedRecordsIgnored(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		p := newTestPKI(t)
		sim := newSim(t, netsim.Config{Seed: 12})
		var good []*Cluster
		for _, id := range []string{"a", "b", "c"} {
			good = append(good, sim.add(id, "ams", keyed(p, nil)))
		}
		// evil is enrolled (a host of the cluster gone bad); mallory has
		// the key but no enrollment.
		evil := sim.add("evil", "ams", keyed(p, nil))
		mallory := sim.add("mallory", "ams", func(c *Config) {
			fastTimings(c)
			c.GossipKeys = [][]byte{testGossipKey}
		})
		for _, c := range good {
			if err := c.Publish(HostFacts{Machines: machines(c.cfg.HostID+"-", "web", "ams", 1)}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the good hosts to agree", func() bool {
			for _, c := range good {
				if len(c.Snapshot().AppMachines("web")) != 3 {
					return false
				}
			}
			return true
		})

		payments := machine("payments", "payments", "ams")
		payments.PrivateIP = "fdaa:0:1::66"
		now := uint64(time.Now().UnixNano())
		// Facts claimed for a, unsigned, signed by evil's key, and signed
		// by mallory's own key; a full record for a under evil's
		// certificate; a full record under a certificate from another CA.
		otherPKI := newTestPKI(t)
		outsider := otherPKI.trust("a")
		forge := func(key *ecdsa.PrivateKey, owner string, version uint64) []byte {
			body := encodeDeltaParts(owner, 0, version, Resources{}, 0, [][]byte{encodeMachine(&payments)}, nil,
				signState(key, stateHash(owner, version, Resources{}, 0, [][]byte{encodeMachine(&payments)})))
			return signed(key, body)
		}
		mkey, _ := pki.NewKey()
		evil.mu.Lock()
		ekey, ecert := evil.trust.key, evil.trust.cert
		evil.mu.Unlock()
		forged := [][]byte{
			forge(nil, "a", now+1),
			forge(ekey, "a", now+2),
			forge(mkey, "a", now+3),
			forge(outsider.Key, "a", now+4),
			forge(mkey, "ghost", now+5), // an owner that is no host
		}
		full := func(key *ecdsa.PrivateKey, cert []byte, version uint64) []byte {
			f := &fullFacts{Owner: "a", Version: version, Machines: []Machine{payments}, Cert: cert}
			f.StateSig = signState(key, fullStateHash(f))
			return encodeFull([]*fullFacts{f})
		}
		forged = append(forged, full(ekey, ecert, now+6), full(outsider.Key, outsider.Cert, now+7), full(nil, nil, now+8))
		// Death verdicts about b: unsigned from mallory, from mallory
		// claiming to be c, signed by evil but claiming c.
		verdicts := [][]byte{
			encodeVerdict(&verdict{From: "mallory", Host: "b", Dead: true, At: now}),
			signed(mkey, verdictBody(&verdict{From: "mallory", Host: "b", Dead: true, At: now})),
			signed(mkey, verdictBody(&verdict{From: "c", Host: "b", Dead: true, At: now})),
			signed(ekey, verdictBody(&verdict{From: "c", Host: "b", Dead: true, At: now})),
			signed(ekey, verdictBody(&verdict{From: "a", Host: "b", Dead: true, At: now})),
		}
		before := make([]uint64, len(good))
		for i, c := range good {
			before[i] = c.Stats().Dropped + c.Stats().Unverified
		}
		// Watch every good host's view through the attack: a forgery
		// believed even for a moment fails the test.
		var seen sync.Map
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for _, c := range good {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					case <-time.After(5 * time.Millisecond):
					}
					s := c.Snapshot()
					if s.Machine("payments") != nil {
						seen.Store(c.cfg.HostID+" held payments", true)
					}
					if h := s.Host("b"); h == nil || h.Status != StatusAlive {
						seen.Store(c.cfg.HostID+" held b down", true)
					}
				}
			}()
		}
		for round := range 10 {
			for _, attacker := range []*Cluster{evil, mallory} {
				for _, msg := range append(append([][]byte{}, forged...), verdicts...) {
					attacker.enqueue(msg)
					for _, id := range []string{"a", "b", "c"} {
						attacker.mu.Lock()
						node := attacker.members[id].node
						attacker.mu.Unlock()
						if round%2 == 0 {
							attacker.ml.SendBestEffort(&node, msg)
						} else {
							attacker.ml.SendReliable(&node, msg)
						}
					}
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(5 * time.Second)
		close(stop)
		wg.Wait()
		seen.Range(func(k, _ any) bool {
			t.Errorf("during the attack %s", k)
			return true
		})
		for i, c := range good {
			s := c.Snapshot()
			if s.Machine("payments") != nil || len(s.AppMachines("payments")) != 0 {
				t.Errorf("%s holds the forged machine payments", c.cfg.HostID)
			}
			if s.Host("ghost") != nil {
				t.Errorf("%s holds facts of a made-up owner", c.cfg.HostID)
			}
			if h := s.Host("b"); h == nil || h.Status != StatusAlive {
				t.Errorf("%s: b is %v after forged verdicts", c.cfg.HostID, h)
			}
			if len(s.AppMachines("web")) != 3 {
				t.Errorf("%s lost the real machines: %d", c.cfg.HostID, len(s.AppMachines("web")))
			}
			if st := c.Stats(); st.Dropped+st.Unverified == before[i] {
				t.Errorf("%s refused nothing: the forgeries never arrived", c.cfg.HostID)
			}
		}
		// evil speaks for itself and is believed; mallory, not enrolled,
		// is not, whatever it publishes.
		if err := evil.Publish(HostFacts{Machines: machines("evil-", "web", "ams", 1)}); err != nil {
			t.Fatal(err)
		}
		if err := mallory.Publish(HostFacts{Machines: machines("mallory-", "web", "ams", 1)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "evil's own machine everywhere", func() bool {
			for _, c := range good {
				if c.Snapshot().Machine("evil-0000") == nil {
					return false
				}
			}
			return true
		})
		time.Sleep(3 * time.Second)
		for _, c := range good {
			if c.Snapshot().Machine("mallory-0000") != nil {
				t.Errorf("%s took the facts of a host that never enrolled", c.cfg.HostID)
			}
		}
	})
}

// TestRevokedHostRefused: once a host's certificate is revoked, the facts
// held of it are dropped and its records, old or new, are refused.
func TestRevokedHostRefused(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		p := newTestPKI(t)
		sim := newSim(t, netsim.Config{Seed: 13})
		var good []*Cluster
		for _, id := range []string{"a", "b"} {
			good = append(good, sim.add(id, "ams", keyed(p, nil)))
		}
		bad := sim.add("bad", "ams", keyed(p, nil))
		if err := bad.Publish(HostFacts{Machines: machines("bad-", "web", "ams", 1)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "bad's machine everywhere", func() bool {
			return good[0].Snapshot().Machine("bad-0000") != nil && good[1].Snapshot().Machine("bad-0000") != nil
		})
		bad.mu.Lock()
		serial := pki.Serial(mustParse(t, bad.trust.cert))
		bad.mu.Unlock()
		for _, c := range good {
			c.Revoke(serial)
		}
		waitFor(t, 5*time.Second, "bad's facts dropped", func() bool {
			return good[0].Snapshot().Machine("bad-0000") == nil && good[1].Snapshot().Machine("bad-0000") == nil
		})
		for i := range 5 {
			if err := bad.Publish(HostFacts{Machines: machines("bad-", "web", "ams", 2+i)}); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second)
		}
		time.Sleep(6 * time.Second) // an anti-entropy round or more
		for _, c := range good {
			if s := c.Snapshot(); s.Machine("bad-0000") != nil || s.Machine("bad-0003") != nil {
				t.Errorf("%s took a revoked host's facts", c.cfg.HostID)
			}
		}
	})
}

func mustParse(t testing.TB, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// BenchmarkRecordSignVerify is what a signature costs per record: the
// owner signing a delta (its bytes and the state it leads to) and a
// receiver checking it, for a load-only delta (what hosts gossip most) and
// one of three machines; a receiver checking an owner's full facts of
// fifty machines (anti-entropy), with its certificate held; and, to compare,
// one bare P-256 signature and verification. Besides the
// wall time (which a busy machine inflates) each reports the process's CPU
// time per operation (cpu-µs/op).
func BenchmarkRecordSignVerify(b *testing.B) {
	p := newTestPKI(b)
	tr := p.trust("h1")
	owner := &Cluster{cfg: Config{HostID: "h1", Now: time.Now, MaxMachines: maxMachines}, trust: mustTrust(b, tr),
		pub: publisher{reset: true, machines: map[string][]byte{}}}
	pub := &tr.Key.PublicKey
	ms := machines("m", "web", "ams", 3)
	var load float64
	for _, c := range []struct {
		name string
		ms   []Machine
	}{{"delta=load", nil}, {"delta=3machines", ms}} {
		b.Run(c.name+"/sign", func(b *testing.B) {
			owner.diffLocked(ms, Resources{}, 0)
			defer cpuPerOp(b)()
			for b.Loop() {
				load++
				up := ms // the same machines: a load-only delta
				if c.ms != nil {
					up = slices.Clone(ms)
					up[0].Load = int(load) % 100
				}
				if ds := owner.diffLocked(up, Resources{}, load); len(ds) != 1 {
					b.Fatalf("%d deltas", len(ds))
				}
			}
		})
		b.Run(c.name+"/verify", func(b *testing.B) {
			owner.diffLocked(ms, Resources{}, load) // the state the delta starts from
			load++
			up := slices.Clone(ms)
			if c.ms != nil {
				up[0].Load = int(load) % 100
			}
			d := owner.diffLocked(up, Resources{}, load)[0]
			defer cpuPerOp(b)()
			for b.Loop() {
				if !verify(pub, d.signed, d.Sig) {
					b.Fatal("does not verify")
				}
			}
			b.ReportMetric(float64(len(d.encoded)), "bytes/record")
			b.ReportMetric(float64(len(d.encoded)-len(d.signed)+len(d.StateSig)+1), "signature-bytes/record")
		})
	}
	b.Run("p256/sign", func(b *testing.B) {
		h := make([]byte, 32)
		defer cpuPerOp(b)()
		for b.Loop() {
			signState(tr.Key, h)
		}
	})
	b.Run("p256/verify", func(b *testing.B) {
		h := make([]byte, 32)
		sig := signState(tr.Key, h)
		defer cpuPerOp(b)()
		for b.Loop() {
			if !verifyState(pub, h, sig) {
				b.Fatal("does not verify")
			}
		}
	})
	b.Run("full=50machines/verify", func(b *testing.B) {
		f := &fullFacts{Owner: "h1", Version: 7, Machines: machines("f", "web", "ams", 50), Cert: tr.Cert}
		f.StateSig = signState(tr.Key, fullStateHash(f))
		ts := mustTrust(b, tr)
		now := time.Now()
		defer cpuPerOp(b)()
		for b.Loop() {
			pc, err := ts.checkCert(f.Cert, "h1", now)
			if err != nil || !verifyState(pc.pub, fullStateHash(f), f.StateSig) {
				b.Fatal("does not verify", err)
			}
		}
	})
	b.Run("certificate/verify", func(b *testing.B) {
		ts := mustTrust(b, tr)
		now := time.Now()
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := ts.checkCert(append([]byte(nil), tr.Cert...), "h1", now); err != nil {
				b.Fatal(err)
			}
			ts.certs = map[string]*peerCert{}
		}
	})
}

func mustTrust(b testing.TB, t *Trust) *trustState {
	ts, err := newTrustState(t)
	if err != nil {
		b.Fatal(err)
	}
	return ts
}

// TestBindRefusesEveryInterface: memberlist's own transport binds to the
// address given; every interface only with BindAny.
func TestBindRefusesEveryInterface(t *testing.T) {
	for _, c := range []struct {
		addr string
		any  bool
		ok   bool
	}{{"", false, false}, {"0.0.0.0", false, false}, {"::", false, false}, {"127.0.0.1", false, true}, {"0.0.0.0", true, true}} {
		m, err := New(Config{HostID: "h1", Region: "ams", BindAddr: c.addr, BindAny: c.any, NoRegionDetector: true})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Start(context.Background())
		if (err == nil) != c.ok {
			t.Errorf("bind %q (any %v): %v", c.addr, c.any, err)
		}
		if err == nil {
			m.Close()
		}
	}
}

// cpuPerOp reports, when the returned func runs, the process's CPU time
// (user and system) per operation since cpuPerOp was called.
func cpuPerOp(b *testing.B) func() {
	start := cpuTime()
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64((cpuTime()-start).Microseconds())/float64(b.N), "cpu-µs/op")
		}
	}
}
