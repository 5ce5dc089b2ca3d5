package proxy

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Probes of silent hosts, off the request path (see breaker.go). When a
// host's breaker would be half-open, the proxy sends the host's backhaul a
// probe of its own: a new connection (never a pooled one, which may be the
// very connection that went silent) carrying a token-checked request
// (hdrProbe) that the far proxy answers at once with 204, before anything
// else. The probe has the budgets a request has: the connect budget (250 ms
// plus three measured round trips) and then the acknowledgement budget
// (50 ms plus two). Its success closes the host's breaker, so requests go
// to the host again; its failure opens it for twice as long (250 ms
// doubling to 10 s, as for any breaker). At most one probe per host is out
// at a time, and at most maxProbes in all. A host the cluster declares dead
// is not probed: the route table sends it nothing anyway; it is looked at
// again every breakerBase, and probed once it is alive or suspect again.
// One goroutine schedules the probes, one more runs each probe; Close stops
// them and waits for them.

// hdrProbe on a backhaul request asks the far proxy only whether it is
// there; its answer carries it back with probeOK.
const (
	hdrProbe = "Flame-Proxy-Probe"
	probeOK  = "ok"
)

const (
	// maxProbes bounds the probes out at once.
	maxProbes = 32
	// probePoll is the longest the scheduler sleeps while a host's breaker
	// is open: the breakers' clock is Config.Now, which need not be the
	// timers' (a test moves it by hand).
	probePoll = 50 * time.Millisecond
)

// prober schedules the probes of hosts whose breakers are open.
type prober struct {
	wake chan struct{} // a host's breaker opened
}

func newProber() *prober { return &prober{wake: make(chan struct{}, 1)} }

// kick has the scheduler look at the breakers again.
func (pr *prober) kick() {
	select {
	case pr.wake <- struct{}{}:
	default:
	}
}

// startProbes runs the scheduler until ctx ends; p.wg waits for it.
func (p *Proxy) startProbes(ctx context.Context) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.runProbes(ctx)
	}()
}

// runProbes starts each probe that is due, and sleeps until the next one
// is (at most probePoll while any host's breaker is open).
func (p *Proxy) runProbes(ctx context.Context) {
	running := map[string]bool{}
	done := make(chan string, maxProbes) // never blocks: at most maxProbes run
	var wg sync.WaitGroup
	defer wg.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var due, sus []string
	for {
		now := p.cfg.Now()
		var next time.Time
		due, next = p.strikes.dueProbes(now, maxProbes-len(running), running, due[:0])
		st := p.state.Load()
		for _, host := range due {
			h, known := st.hosts[host]
			addr := st.backhaul[host]
			switch {
			case !known:
				p.strikes.forgetHost(host) // gone from the cluster: nothing routes there
			case h.Status == route.HostDown || addr == "":
				p.strikes.postpone(host, now.Add(breakerBase))
			default:
				running[host] = true
				wg.Add(1)
				go func() {
					defer wg.Done()
					err := p.probeHost(ctx, host, addr, h.RTT)
					if ctx.Err() == nil {
						p.strikes.probed(host, err == nil)
						if err == nil {
							p.suspicion.heard(host)
						}
						p.log.Debug("host probed", "host", host, "err", err)
					}
					done <- host
				}()
			}
		}
		// Suspect hosts (suspect.go), probed once each: the answer clears
		// the suspicion, silence is the verdict.
		sus = p.suspicion.dueProbes(maxProbes-len(running), running, p.waiters.waiting, sus[:0])
		for _, host := range sus {
			if p.strikes.hostOpen(host) {
				continue // its breaker's probe tells (and clears the suspicion)
			}
			h, known := st.hosts[host]
			addr := st.backhaul[host]
			if !known || h.Status == route.HostDown || addr == "" {
				p.suspicion.heard(host) // the route table sends it nothing anyway
				continue
			}
			running[host] = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := p.probeHost(ctx, host, addr, h.RTT)
				if ctx.Err() == nil {
					if err != nil {
						p.foundSilent(host)
					}
					p.suspicion.heard(host)
					p.log.Debug("suspect host probed", "host", host, "err", err)
				}
				done <- host
			}()
		}
		var tick <-chan time.Time
		if !next.IsZero() || len(running) > 0 || p.suspicion.pending() {
			wait := probePoll
			if !next.IsZero() {
				wait = min(max(next.Sub(now), time.Millisecond), probePoll)
			}
			timer.Reset(wait)
			tick = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-p.probes.wake:
		case host := <-done:
			delete(running, host)
		case <-tick:
		}
		timer.Stop()
	}
}

// probeHost asks the far proxy of host, at addr, whether it is there, with the
// budgets of a request to it.
func (p *Proxy) probeHost(ctx context.Context, host, addr string, rtt time.Duration) error {
	tg := &route.Target{Host: host, RTT: rtt}
	connect := p.connectBudget(tg)
	ctx, cancel := context.WithTimeout(ctx, connect+p.ackBudget(tg))
	defer cancel()
	req, err := http.NewRequestWithContext(context.WithValue(ctx, connectBudgetKey{}, connect), http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return fmt.Errorf("probe host %s: %w", host, err)
	}
	req.Header.Set(hdrToken, p.cfg.Token)
	req.Header.Set(hdrProbe, "1")
	resp, err := p.toProbe.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("probe host %s: %w", host, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get(hdrProbe) != probeOK {
		return fmt.Errorf("probe host %s: answered %s", host, resp.Status)
	}
	return nil
}

// probeTransport dials a new connection for every probe.
func (p *Proxy) probeTransport() *http.Transport {
	tr := p.transport(p.dialHost, 1, 0)
	tr.DisableKeepAlives = true
	return tr
}

// serveProbe answers a probe (its token already checked) at once.
func serveProbe(w http.ResponseWriter) {
	w.Header().Set(hdrProbe, probeOK)
	w.WriteHeader(http.StatusNoContent)
}

// hostsOf indexes the hosts of a snapshot by id.
func hostsOf(hs []route.Host) map[string]route.Host {
	m := make(map[string]route.Host, len(hs))
	for _, h := range hs {
		m[h.ID] = h
	}
	return m
}

// The breakers' side of the probes.

// dueProbes appends to out at most limit hosts whose probe is due (and
// not running), marking each as probed; next is the earliest time another
// open host breaker's probe falls due (zero: none).
func (s *breakers) dueProbes(now time.Time, limit int, running map[string]bool, out []string) (_ []string, next time.Time) {
	if s.entries.Load() == 0 {
		return out, next
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for host, b := range s.host {
		switch {
		case !b.synthetic || b.trips == 0 || running[host]:
		case b.probeDue(now) && len(out) < limit:
			b.probeAt = now
			out = append(out, host)
		case b.probeDue(now):
			next = now // no room now: the next round
		case b.probeAt.IsZero() && (next.IsZero() || b.until.Before(next)):
			next = b.until
		}
	}
	return out, next
}

// probed records the outcome of a host's probe: a success closes its
// breaker, a failure opens it again for twice as long (unless a failed
// request did already).
func (s *breakers) probed(host string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.host[host]
	if b == nil {
		return // closed meanwhile: a request got through
	}
	if ok {
		delete(s.host, host)
		s.entries.Add(-1)
		return
	}
	b.fail(s.now(), weightConnect)
	b.probeAt = time.Time{}
}

// postpone puts a host's probe off until then, the backoff unchanged: the
// cluster declares the host dead.
func (s *breakers) postpone(host string, then time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.host[host]; b != nil {
		b.probeAt, b.until = time.Time{}, then
	}
}

// forgetHost drops a host's breaker: the host left the cluster.
func (s *breakers) forgetHost(host string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, found := s.host[host]; found {
		delete(s.host, host)
		s.entries.Add(-1)
	}
}
