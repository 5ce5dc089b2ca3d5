package proxy

import (
	"cmp"
	"context"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Heartbeats of the edge's region-mates. An edge sends most of its
// requests to its own host and region; a region-mate it sends little to
// may have died long before a request meets it, and that request then
// waits (suspect.go, ack.go) where it could have gone elsewhere at once.
// So an edge asks the hosts of its own region whether they are there,
// every HeartbeatInterval (25 ms by default), with the probe the far proxy
// answers at once (probe.go), on the pooled backhaul connections requests
// use. A heartbeat unanswered one round trip plus the suspicion slack
// after it was sent makes the host suspect (suspect.go) — deprioritised,
// then probed with a request's budgets for the verdict — and any answer
// clears the suspicion: a host that was only slow is back in its place a
// heartbeat later. How long a heartbeat may take is learnt from the host's
// words (suspect.go: hostWords), heartbeats' answers among them. Only hosts with a measured round trip are watched, the
// nearest maxHeartbeats of them, one heartbeat out per host at a time; the
// hosts of other regions are watched by the requests sent there. A region
// of n edges sends each of its hosts n heartbeats every interval: the
// interval is the price of knowing.

// DefaultHeartbeatInterval is how often an edge asks each region-mate
// whether it is there.
const DefaultHeartbeatInterval = 25 * time.Millisecond

// maxHeartbeats bounds the region-mates an edge watches.
const maxHeartbeats = 16

// startHeartbeats watches the region-mates of an edge until ctx ends.
func (p *Proxy) startHeartbeats(ctx context.Context) {
	if p.cfg.Edge == nil || p.cfg.HeartbeatInterval < 0 {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.runHeartbeats(ctx)
	}()
}

func (p *Proxy) runHeartbeats(ctx context.Context) {
	tick := time.NewTicker(p.cfg.HeartbeatInterval)
	defer tick.Stop()
	var mu sync.Mutex
	out := map[string]bool{} // hosts with a heartbeat out
	var wg sync.WaitGroup
	defer wg.Wait()
	var mates []route.Host
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st := p.state.Load()
		mates = regionMates(st, p.cfg.HostID, p.cfg.Region, mates[:0])
		mu.Lock()
		for _, h := range mates {
			if out[h.ID] {
				continue
			}
			out[h.ID] = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.heartbeat(ctx, h, st.backhaul[h.ID], p.words.allowance(h.ID, h.RTT))
				mu.Lock()
				delete(out, h.ID)
				mu.Unlock()
			}()
		}
		mu.Unlock()
	}
}

// regionMates appends to out the hosts of region, other than self, that
// are not down, have a backhaul address and a measured round trip: the
// nearest maxHeartbeats of them.
func regionMates(st *state, self, region string, out []route.Host) []route.Host {
	for id, h := range st.hosts {
		if id != self && h.Region == region && h.Status != route.HostDown && h.RTT > 0 && st.backhaul[id] != "" {
			out = append(out, h)
		}
	}
	slices.SortFunc(out, func(a, b route.Host) int { return cmp.Or(cmp.Compare(a.RTT, b.RTT), cmp.Compare(a.ID, b.ID)) })
	return out[:min(len(out), maxHeartbeats)]
}

// heartbeat asks h's proxy, at addr, whether it is there: an answer clears
// a suspicion of it (and teaches how long its words take), no answer within
// allow makes it suspect.
func (p *Proxy) heartbeat(ctx context.Context, h route.Host, addr string, allow time.Duration) {
	tg := &route.Target{Host: h.ID, RTT: h.RTT}
	ctx, cancel := context.WithTimeout(ctx, p.connectBudget(tg)+p.ackBudget(tg))
	defer cancel()
	sus := p.suspectTimer(h.ID, allow, "a heartbeat heard nothing for a round trip")
	defer func() {
		if sus != nil {
			sus.Stop()
		}
	}()
	req, err := http.NewRequestWithContext(context.WithValue(ctx, connectBudgetKey{}, p.connectBudget(tg)), http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return
	}
	req.Header.Set(hdrToken, p.cfg.Token)
	req.Header.Set(hdrProbe, "1")
	start := time.Now()
	resp, err := p.toHosts.RoundTrip(req)
	if err != nil {
		return // the suspicion's probe gives the verdict
	}
	took := time.Since(start)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get(hdrProbe) != probeOK {
		return
	}
	if sus != nil {
		sus.Stop()
	}
	p.words.sample(h.ID, took)
	p.suspicion.heard(h.ID)
}
