package proxy

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// When one attempt finds a host silent (its breaker opens: breaker.go),
// the other attempts waiting on that host need not each wait out their
// own budget: those that have not heard from the host yet (a connect, a
// request not acknowledged once), and those that have heard nothing for
// longer than a healthy host leaves them waiting — a round trip plus
// ackInterval — are given up at once, as silent too, and go to their next
// candidate. Only attempts that may go there are concerned: connects
// (nothing was sent), and requests waiting for acknowledgements (ack.go:
// idempotent, their bodies kept, another candidate left). An attempt still
// hearing acknowledgements keeps waiting, so one connection gone silent
// on its own does not take a host's long requests with it.

// The fast path's connects to another host wait among the attempts on it
// too (net/http's path waits for its connect inside the attempt's wait):
// a connect given up sent nothing.

// dialWaiting dials tg's host, given up with the host when it is found
// silent.
func (p *Proxy) dialWaiting(tg *route.Target) DialFunc {
	host, quiet, rtt := tg.Host, p.quietFor(tg.RTT, p.connectBudget(tg)), tg.RTT
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		silent := &silentError{host: host, found: true}
		w := p.waiters.wait(host, quiet, func() { cancel(silent) })
		// A connect is answered in a round trip (suspect.go).
		start := time.Now()
		sus := p.suspectTimer(host, p.words.allowance(host, rtt), "a connect to it heard nothing for a round trip")
		c, err := p.cfg.Dial(ctx, network, addr)
		if sus != nil {
			sus.Stop()
		}
		if err == nil {
			p.words.sample(host, time.Since(start)) // a connect is answered in a round trip
			p.suspicion.heard(host)
		}
		p.waiters.stop(w)
		if err != nil && context.Cause(ctx) == error(silent) {
			return nil, silent
		}
		if err != nil {
			return nil, err
		}
		// Over mutual TLS, the handshake: the host answered, so it is
		// not silent whatever the handshake's CPU takes.
		return p.secureHop(ctx, c, host)
	}
}

// hostWaiters are the attempts waiting on each host.
type hostWaiters struct {
	mu sync.Mutex
	m  map[string]map[*hostWaiter]struct{}
}

// hostWaiter is one attempt waiting on a host.
type hostWaiter struct {
	host  string
	quiet time.Duration // heard nothing that long: given up with the host
	heard atomic.Int64  // when the host was last heard from (unix ns)
	acked atomic.Bool   // the host was heard from at all
	// giveUp ends the attempt as silent; it runs under mu, and never once
	// the attempt stopped waiting (done).
	mu     sync.Mutex
	done   bool
	giveUp func()
}

// wait registers an attempt on host that giveUp ends; it must be stopped.
func (s *hostWaiters) wait(host string, quiet time.Duration, giveUp func()) *hostWaiter {
	w := &hostWaiter{host: host, quiet: quiet, giveUp: giveUp}
	w.heard.Store(time.Now().UnixNano())
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]map[*hostWaiter]struct{}{}
	}
	set := s.m[host]
	if set == nil {
		set = map[*hostWaiter]struct{}{}
		s.m[host] = set
	}
	set[w] = struct{}{}
	return w
}

// hear records a word from the host (an acknowledgement).
func (w *hostWaiter) hear() {
	w.heard.Store(time.Now().UnixNano())
	w.acked.Store(true)
}

// stop ends the wait; once it returns, giveUp does not run.
func (s *hostWaiters) stop(w *hostWaiter) {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if set := s.m[w.host]; set != nil {
		delete(set, w)
		if len(set) == 0 {
			delete(s.m, w.host)
		}
	}
}

// waiting reports whether an attempt waits on host.
func (s *hostWaiters) waiting(host string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m[host]) > 0
}

// silent gives up the attempts on host that heard nothing from it for
// longer than their quiet, and returns how many.
func (s *hostWaiters) silent(host string) int {
	now := time.Now().UnixNano()
	var quiet []*hostWaiter
	s.mu.Lock()
	for w := range s.m[host] {
		if !w.acked.Load() || time.Duration(now-w.heard.Load()) > w.quiet {
			quiet = append(quiet, w)
		}
	}
	s.mu.Unlock()
	for _, w := range quiet {
		w.mu.Lock()
		if !w.done {
			w.giveUp()
		}
		w.mu.Unlock()
	}
	return len(quiet)
}

// quietFor is how long a healthy host leaves an attempt on tg without a
// word: a round trip for the first acknowledgement, ackInterval between
// the next; with the round trip unknown, the whole budget.
func (p *Proxy) quietFor(rtt time.Duration, budget time.Duration) time.Duration {
	if rtt <= 0 {
		return budget
	}
	return min(rtt+ackInterval, budget)
}
