package proxy

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// A host that dies with connections open to it goes silent: a request sent
// on a pooled backhaul connection is written without error and is then
// never answered, and no connect timeout applies, since nothing connects;
// a request the host had taken when it died is never answered either. So
// the far proxy acknowledges every backhaul request at once, with an
// interim 102 (Processing) written before it does anything else, and again
// every ackInterval until the machine starts its answer. The edge gives a
// request that may be sent again (idempotent, its body kept, another
// candidate left) AckTimeout plus two measured round trips to the host for
// the first acknowledgement, and ackInterval more for each next one; when
// one does not come the host is taken as silent: its breaker opens as for
// a host whose connect timed out, and the request goes to its next
// candidate. The
// machine may take as long as it needs to answer: the acknowledgements come
// from the far proxy, not from the machine.

// DefaultAckTimeout is what a far proxy may take, beyond two round trips,
// to acknowledge a backhaul request.
const DefaultAckTimeout = 50 * time.Millisecond

// ackInterval is how often the far proxy acknowledges a request again
// while its machine has not started the answer.
const ackInterval = 25 * time.Millisecond

// ackBudget is how long a far host may take to acknowledge a request.
func (p *Proxy) ackBudget(tg *route.Target) time.Duration {
	if tg.RTT <= 0 {
		return p.cfg.ConnectTimeout
	}
	return min(p.cfg.AckTimeout+2*tg.RTT, p.cfg.ConnectTimeout)
}

// keepAcking acknowledges a backhaul request at once, and again every
// ackInterval until stop is called; stop returns once no acknowledgement
// is being written, so the caller may answer. Nothing may have been set in
// the response's header yet: a 1xx carries what is there.
func keepAcking(w http.ResponseWriter) (stop func()) {
	w.WriteHeader(http.StatusProcessing)
	a := &acker{w: w}
	a.mu.Lock()
	a.timer = time.AfterFunc(ackInterval, a.tick)
	a.mu.Unlock()
	return a.stop
}

// acker repeats a backhaul request's acknowledgement on a timer: no
// goroutine while it waits, none at all for a request answered within
// ackInterval.
type acker struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	timer   *time.Timer
	stopped bool
}

func (a *acker) tick() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopped {
		return
	}
	a.w.WriteHeader(http.StatusProcessing)
	a.timer.Reset(ackInterval)
}

func (a *acker) stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopped = true
	a.timer.Stop()
}

// silentError is an attempt whose far host did not acknowledge the request
// in time.
type silentError struct {
	host   string
	budget time.Duration
	found  bool // given up when another attempt found the host silent
}

func (e *silentError) Error() string {
	if e.found {
		return fmt.Sprintf("host %s was found silent while this attempt waited on it", e.host)
	}
	return fmt.Sprintf("host %s did not acknowledge the request within %v", e.host, e.budget)
}

// ackWatch times one attempt's acknowledgement.
type ackWatch struct {
	mu     sync.Mutex
	state  int // ackWaiting, ackDone or ackSilent
	timer  *time.Timer
	cancel context.CancelFunc
	err    *silentError
	// sus makes the host suspect when no word came in time (suspect.go),
	// started by suspect; heard clears a suspicion (and learns the first
	// word's round trip).
	sus     *suspectClock
	suspect func(after time.Duration) *suspectClock
	allow   time.Duration // how long the host's first word may take
	wrote   time.Time     // when the request's headers were written
	heard   func(first bool, took time.Duration)
	// wait is the attempt among those on its host (silence.go).
	wait    *hostWaiter
	waiters *hostWaiters
	// hedge, when set, starts the request's hedge (hedge.go) when no word
	// came in time, instead of the attempt being given up; it is handed
	// what ends the attempt, and runs under mu. late records the host's
	// lateness, after.
	hedge func(wake func())
	late  func(err *silentError)
}

const (
	ackWaiting = iota
	ackDone
	ackSilent
	ackHedged // late, kept running while a hedge runs
)

// watchAck returns the context of an attempt on tg's host that is
// cancelled when the host does not acknowledge the request within its
// budget, counted from when the request's headers were written.
func (p *Proxy) watchAck(ctx context.Context, tg *route.Target) (context.Context, *ackWatch) {
	ctx, cancel := context.WithCancel(ctx)
	host := tg.Host
	a := &ackWatch{cancel: cancel, err: &silentError{host: host, budget: p.ackBudget(tg)}, waiters: &p.waiters,
		allow: p.words.allowance(host, tg.RTT),
		suspect: func(after time.Duration) *suspectClock {
			return p.suspectTimer(host, after, "an attempt heard nothing from it for a round trip")
		},
		heard: func(first bool, took time.Duration) {
			if first {
				p.words.sample(host, took)
			}
			p.suspicion.heard(host)
		}}
	a.wait = p.waiters.wait(tg.Host, p.quietFor(tg.RTT, a.err.budget), a.giveUp)
	trace := &httptrace.ClientTrace{
		WroteHeaders: func() {
			a.mu.Lock()
			defer a.mu.Unlock()
			if a.state == ackWaiting && a.timer == nil {
				a.wrote = time.Now()
				a.timer = time.AfterFunc(a.err.budget, a.expire)
				a.sus = a.suspect(a.allow)
			}
		},
		Got1xxResponse: func(code int, _ textproto.MIMEHeader) error {
			if code == http.StatusProcessing {
				first := !a.wait.acked.Load()
				a.wait.hear()
				a.mu.Lock()
				took := time.Since(a.wrote)
				a.mu.Unlock()
				a.heard(first, took)
				a.acked()
			}
			return nil
		},
	}
	return httptrace.WithClientTrace(ctx, trace), a
}

func (a *ackWatch) expire() { a.silence(false) }

// giveUp ends the attempt: another found its host silent (silence.go).
func (a *ackWatch) giveUp() { a.silence(true) }

func (a *ackWatch) silence(found bool) {
	a.mu.Lock()
	if a.state != ackWaiting {
		a.mu.Unlock()
		return
	}
	a.err.found = found
	if a.hedge != nil {
		a.state = ackHedged
		if a.timer != nil {
			a.timer.Stop()
		}
		a.hedge(a.cancel)
		a.mu.Unlock()
		a.late(a.err) // outside mu: the host's verdict gives up its other attempts
		return
	}
	a.state = ackSilent
	a.mu.Unlock()
	a.cancel()
}

// acked gives the host until the next acknowledgement is due.
func (a *ackWatch) acked() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.state != ackWaiting {
		return
	}
	if a.timer != nil {
		a.timer.Stop()
	}
	a.timer = time.AfterFunc(a.err.budget+ackInterval, a.expire)
	if a.sus != nil {
		a.sus.Reset(suspectBetweenAcks(a.allow))
	}
}

// stopSuspect stops the suspicion timer; under a.mu.
func (a *ackWatch) stopSuspect() {
	if a.sus != nil {
		a.sus.Stop()
	}
}

// done records the answer; false when the attempt was already given up as
// silent.
func (a *ackWatch) done() bool {
	a.waiters.stop(a.wait)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopSuspect()
	if a.state == ackWaiting || a.state == ackHedged {
		a.state = ackDone
		if a.timer != nil {
			a.timer.Stop()
		}
	}
	return a.state == ackDone
}

// failed returns the attempt's error: a silentError when it was given up
// for want of an acknowledgement.
func (a *ackWatch) failed(err error) error {
	a.waiters.stop(a.wait)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopSuspect()
	if a.timer != nil {
		a.timer.Stop()
	}
	if a.state == ackSilent {
		return a.err
	}
	a.state = ackDone // no hedge starts after the attempt returned
	return err
}
