package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Hedging. A far host that does not acknowledge a request in time (ack.go)
// is not always dead: on a starved machine a live host's acknowledgement
// comes late, and its machine's answer after it. So a late acknowledgement
// does not end the attempt. The attempt keeps running (the primary); its
// host is struck as silent, as before (its breaker opens and its region
// counts a failure: the next requests keep away from a dead host); and the
// same request — idempotent, its body buffered: only a request that could
// be retried is hedged — goes to the next candidates, one at a time (the
// hedge: the retries that would have followed, started while the primary
// still may answer). The first answer to start wins; the other attempt is
// cancelled and its connection closed, so its machine's work stops. With no
// hedge answer, the primary's answer is still taken: a slow answer is never
// thrown away for a failure elsewhere. A request that may not be sent twice
// is never hedged (it waits for no acknowledgement at all, as before).
//
// Bounds: one hedge in flight per request (the hedge tries the candidates
// in turn, and a hedge attempt whose own host is late is given up for the
// next, as attempts were before); a hedge never goes to a machine at its
// hard limit, nor into a region whose breaker is not closed (route.go's
// RegionBreaker); the primary's lateness counts against its region's
// breaker, and each hedge attempt counts in its region like any attempt,
// so a slow region trips its breaker and sheds its traffic instead of
// taking every request twice.

// Who won a hedged request's race.
const (
	raceOpen int32 = iota
	primaryWon
	hedgeWon
)

// hedge is the second attempt of a request whose primary was late: it runs
// in its own goroutine until it has an answer, runs out of candidates or
// is cancelled.
type hedge struct {
	ctx    context.Context
	cancel context.CancelFunc
	won    atomic.Int32
	wake   func() // ends the primary once the hedge won
	done   chan struct{}
	// Set by the hedge before done closes.
	resp  *http.Response // its answer (nil: none); its Body's Close ends ctx
	from  *route.Target
	tried []string
}

// claim ends the race for the primary: false when the hedge won it.
func (h *hedge) claim() bool {
	if !h.won.CompareAndSwap(raceOpen, primaryWon) {
		return false
	}
	h.cancel() // the hedge's attempt ends, its connection closed
	return true
}

// lost reports whether the primary lost the race.
func (h *hedge) lost() bool { return h.won.Load() == hedgeWon }

// wait returns once the hedge's goroutine ended.
func (h *hedge) wait() { <-h.done }

// hedgeRequest is what a hedge sends: the request as serveEdge forwards it.
type hedgeRequest struct {
	r    *http.Request // method, URL and Host; its context is the hedge's
	hdr  http.Header   // the headers to forward, Fly's set
	body *requestBody  // buffered
	port string
}

// startHedge starts the hedge of a request on the candidates o has not
// given yet (o and cands are copied: the caller's stay its own). wake ends
// the primary when the hedge wins. It returns nil when nothing is left to
// hedge to.
func (p *Proxy) startHedge(parent context.Context, st *state, o *order, cands []*route.Target, hr hedgeRequest, wake func()) *hedge {
	if !o.more(cands) {
		return nil
	}
	ctx, cancel := context.WithCancel(parent)
	h := &hedge{ctx: ctx, cancel: cancel, wake: wake, done: make(chan struct{})}
	oc, cs := *o, slices.Clone(cands)
	hr.r = hr.r.WithContext(ctx)
	p.hedges.Add(1)
	go func() {
		defer close(h.done)
		p.runHedge(h, st, &oc, cs, hr)
	}()
	return h
}

// runHedge tries the candidates in turn until one answers (and the hedge
// wins the race), none is left, or the hedge is cancelled.
func (p *Proxy) runHedge(h *hedge, st *state, o *order, cands []*route.Target, hr hedgeRequest) {
	for tg, probe, ok := o.next(cands); ok; tg, probe, ok = o.next(cands) {
		if h.ctx.Err() != nil {
			p.release(tg, probe)
			return
		}
		if why := p.notHedgedTo(tg); why != "" {
			p.release(tg, probe)
			h.tried = append(h.tried, fmt.Sprintf("%s in %s: not hedged to: %s", tg.MachineID, tg.Region, why))
			continue
		}
		rb, size, _ := hr.body.attempt()
		// Only one hedge is in flight: a hedge attempt whose host is late
		// is given up for the next candidate (ack.go).
		ack := !tg.OnSelf && o.more(cands)
		resp, err := p.send(hr.r, st, tg, hr.hdr, rb, size, hr.port, ack, nil)
		err = farVerdict(tg, resp, err, hr.r.Method)
		if err != nil {
			if h.ctx.Err() != nil {
				p.release(tg, probe) // the primary won, or the client left
				return
			}
			p.strike(tg, err)
			p.release(tg, probe)
			h.tried = append(h.tried, fmt.Sprintf("%s in %s (hedged): %v", tg.MachineID, tg.Region, err))
			continue
		}
		if !h.won.CompareAndSwap(raceOpen, hedgeWon) {
			resp.Body.Close() // the primary's answer came first: this connection closes
			p.release(tg, probe)
			return
		}
		p.succeeded(tg)
		resp.Body = &hedgeBody{ReadCloser: resp.Body, cancel: h.cancel}
		h.resp, h.from = resp, tg
		h.wake()
		return
	}
}

// notHedgedTo says why a hedge skips tg ("" when it does not): a machine at
// its hard limit, or a region whose breaker is not closed.
func (p *Proxy) notHedgedTo(tg *route.Target) string {
	if max(tg.Published, p.load.InFlight(tg.MachineID)) >= tg.HardLimit {
		return fmt.Sprintf("at its hard limit (%d)", tg.HardLimit)
	}
	if st := p.regions.state(tg.App, tg.Region); st != route.RegionClosed {
		return fmt.Sprintf("region %s is %v", tg.Region, st)
	}
	return ""
}

// hedgeBody is the winning hedge's answer: closing it ends the hedge.
type hedgeBody struct {
	io.ReadCloser
	once   sync.Once
	cancel context.CancelFunc
}

func (b *hedgeBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.cancel)
	return err
}

// farVerdict turns a far host's word that its machine was not reached, or
// did not answer in time (for a request that may go on), into the attempt's
// error, closing the response; other responses pass as they are.
func farVerdict(tg *route.Target, resp *http.Response, err error, method string) error {
	if err != nil || tg.OnSelf {
		return err
	}
	switch {
	case resp.Header.Get(hdrRetry) != "":
		err = fmt.Errorf("host %s: %s", tg.Host, resp.Header.Get(hdrRetry))
		if resp.Header.Get(hdrRetryKind) == retryNotReached {
			err = fmt.Errorf("%w: %w", errNotReached, err)
		}
	case resp.Header.Get(hdrTimeout) != "" && idempotent(method):
		err = fmt.Errorf("host %s: %s", tg.Host, resp.Header.Get(hdrTimeout))
	}
	if err != nil {
		resp.Body.Close()
	}
	return err
}

// hedgeSlot holds the hedge an attempt started when its host was late: set
// under the attempt's ackWatch lock, read once the attempt returned.
type hedgeSlot struct {
	mu sync.Mutex
	h  *hedge
}

func (s *hedgeSlot) set(h *hedge) {
	s.mu.Lock()
	s.h = h
	s.mu.Unlock()
}

func (s *hedgeSlot) get() *hedge {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.h
}

// settleHedge ends a hedged request of net/http's path once its primary
// attempt on tg returned (resp, or err): the primary's answer if it won the
// race, else the hedge's, else the failures of both.
func (p *Proxy) settleHedge(r *http.Request, h *hedge, tg *route.Target, probe bool, resp *http.Response, err error, tried []string) (*http.Response, *route.Target, []string) {
	if err == nil && h.claim() {
		h.wait()
		p.succeeded(tg)
		return resp, tg, nil
	}
	if err == nil {
		resp.Body.Close() // the hedge's answer came first
	}
	h.wait()
	if r.Context().Err() != nil {
		p.release(tg, probe)
		if h.resp != nil {
			h.resp.Body.Close()
		}
		return nil, nil, nil // the client went away
	}
	if !h.lost() {
		p.strike(tg, err) // it failed on its own
		tried = append(tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
	}
	p.release(tg, probe)
	if h.resp != nil {
		return h.resp, h.from, nil
	}
	return nil, nil, append(tried, h.tried...)
}

// hedgeRequest rebuilds the fast path's request as net/http's path
// forwards it (a copy: the connection's buffer is reused once the request
// is done), for its hedge.
func (fc *fastConn) hedgeRequest(body []byte) (hedgeRequest, error) {
	b := fc.appendRequest(nil, &route.Target{OnSelf: true}, body)
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
	if err != nil {
		return hedgeRequest{}, fmt.Errorf("rebuild request for its hedge: %w", err)
	}
	rb := &requestBody{}
	if len(body) > 0 {
		rb = &requestBody{buf: bytes.Clone(body), size: int64(len(body))}
	}
	port := fmt.Sprint(fc.e.p.publicPort(fc.secure))
	return hedgeRequest{r: r, hdr: r.Header, body: rb, port: port}, nil
}

// errLostRace ends a primary attempt whose hedge answered first.
var errLostRace = errors.New("the hedge answered first")

// startHedge starts the hedge of the fast path's request when its primary
// attempt, on tg over uc, was not acknowledged in time; false when it cannot be
// hedged (nothing left to try), and the attempt ends as before. The
// primary stops waiting among its host's attempts (hw): it is given up
// only by losing the race.
func (fc *fastConn) startHedge(uc *upConn, tg *route.Target, st *state, o *order, cands []*route.Target, body []byte, hw *hostWaiter) bool {
	if o == nil || !o.more(cands) {
		return false
	}
	hr, err := fc.hedgeRequest(body)
	if err != nil {
		fc.e.p.log.Debug("no hedge", "request_id", string(fc.id[:fc.idLen]), "err", err)
		return false
	}
	c := uc.c
	h := fc.e.p.startHedge(context.Background(), st, o, cands, hr, func() { c.Close() })
	if h == nil {
		return false
	}
	fc.hedge = h
	fc.upMu.Lock()
	fc.hedgeCancel = h.cancel
	fc.upMu.Unlock()
	if fc.state.Load() == connClosed {
		h.cancel() // cut meanwhile
	}
	fc.e.p.waiters.stop(hw)
	fc.e.p.log.Debug("candidate failed", "app", tg.App, "machine", tg.MachineID, "host", tg.Host, "request_id", string(fc.id[:fc.idLen]),
		"err", "no acknowledgement in time; hedged")
	return true
}

// settleHedge ends a hedged request of the fast path once its primary
// attempt on tg returned: answered by the primary (act, err nil), or by
// the hedge (handed to net/http's path with its answer, as a fly-replay
// is), or failed on both.
func (fc *fastConn) settleHedge(h *hedge, tg *route.Target, probe bool, act action, err error, appName string, tried []string) action {
	p := fc.e.p
	defer func() {
		fc.upMu.Lock()
		fc.hedgeCancel = nil
		fc.upMu.Unlock()
	}()
	if err == nil {
		h.wait()
		return act
	}
	if fc.gone.Load() || fc.state.Load() == connClosed {
		h.cancel()
		h.wait()
		p.release(tg, probe)
		if h.resp != nil {
			h.resp.Body.Close()
		}
		return actClose // the client went away, or the proxy cut it
	}
	h.wait()
	if !h.lost() {
		p.strike(tg, err) // it failed on its own
		tried = append(tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
	}
	p.release(tg, probe)
	if h.resp != nil {
		fc.pre = &prefetched{reqID: string(fc.id[:fc.idLen]), resp: h.resp, from: h.from}
		return actHandOff
	}
	tried = append(tried, h.tried...)
	reason := fmt.Sprintf("no machine of app %q answered; tried %s", appName, strings.Join(tried, "; "))
	p.log.Warn("request failed on every candidate", "app", strings.Clone(appName), "request_id", string(fc.id[:fc.idLen]), "reason", reason)
	fc.fail(http.StatusBadGateway, codeAllFailed, reason, fc.req.close)
	return actKeep
}
