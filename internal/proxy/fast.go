package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/oklog/ulid/v2"

	"github.com/flamehq/flame/internal/proxy/route"
)

// The fast path's delivery: the same routing, headers, retries, load
// counting and demotions as serveEdge, over pooled keep-alive connections
// of its own (to this host's machines, and to other hosts' backhaul
// listeners, speaking HTTP/1.1 with the internal headers of forward.go).

// str views bytes as a string without copying: for lookups and selection
// only, never kept past the request (the buffer is reused).
func str(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

// newID makes the request id: <ULID>-<region>, in the connection's buffer.
func (fc *fastConn) newID() []byte {
	// ulid.Make's entropy reader makes its ULID escape: the same shape
	// (milliseconds, then 80 random bits) built here allocates nothing.
	var id ulid.ULID
	id.SetTime(ulid.Now())
	var e [10]byte
	binary.BigEndian.PutUint64(e[:8], rand.Uint64())
	binary.BigEndian.PutUint16(e[8:], uint16(rand.Uint32()))
	id.SetEntropy(e[:])
	id.MarshalTextTo(fc.id[:26])
	fc.id[26] = '-'
	fc.idLen = 27 + copy(fc.id[27:], fc.e.p.cfg.Region)
	return fc.id[:fc.idLen]
}

// forward routes and delivers one request whose body is buffered whole.
func (fc *fastConn) forward(body []byte) action {
	p, req := fc.e.p, &fc.req
	appName, ok := p.appFor(str(req.host))
	st := p.state.Load()
	if !ok || !st.table.HasApp(appName) || p.wantsChallenge(str(req.host), str(req.target)) {
		return actHandOff // net/http answers 404 naming the host, or an ACME challenge
	}
	q := route.Query{
		Port:           p.publicPort(fc.secure),
		PreferRegion:   str(req.header("Fly-Prefer-Region")),
		ForceRegion:    str(req.header("Fly-Force-Region")),
		PreferInstance: str(req.header("Fly-Prefer-Instance-Id")),
		ForceInstance:  str(req.header("Fly-Force-Instance-Id")),
		Rand:           p.seq.Add(0x9e3779b97f4a7c15),
	}
	var buf [route.MaxCandidates]*route.Target
	cands := st.table.Select(appName, q, routeInput{p}, buf[:0])
	if len(cands) == 0 || cands[0].ForceHTTPS && !fc.secure {
		return actHandOff // the reasons, autostarts held for and redirects are net/http's
	}
	if p.allOverSoft(cands) {
		// autostart starts a machine in the background (it keeps the app
		// and query: copies, not views of the buffer) and does not wait.
		q.PreferRegion, q.ForceRegion = strings.Clone(q.PreferRegion), strings.Clone(q.ForceRegion)
		q.PreferInstance, q.ForceInstance = strings.Clone(q.PreferInstance), strings.Clone(q.ForceInstance)
		cands, _ = p.autostart(context.Background(), st, strings.Clone(appName), q, cands)
	}
	fc.newID()
	o := order{p: p}
	return fc.deliver(st, appName, cands, &o, body, nil)
}

// deliver tries the candidates left in o's order until one answers
// (tried: the failures so far).
func (fc *fastConn) deliver(st *state, appName string, cands []*route.Target, o *order, body []byte, tried []string) action {
	p, req := fc.e.p, &fc.req
	for tg, probe, ok := o.next(cands); ok; tg, probe, ok = o.next(cands) {
		// Over the backhaul, a request that may go to a next candidate
		// waits only so long for the far host's acknowledgement (ack.go).
		// A late one is hedged (hedge.go).
		ack := !tg.OnSelf && o.more(cands) && idempotent(str(req.method))
		act, err := fc.attempt(st, tg, body, probe, ack, o, cands)
		if h := fc.hedge; h != nil {
			fc.hedge = nil
			return fc.settleHedge(h, tg, probe, act, err, appName, tried)
		}
		if err == nil {
			return act
		}
		if act, done := fc.attemptFailed(tg, probe, err, &tried); done {
			return act
		}
	}
	reason := fmt.Sprintf("no machine of app %q answered; tried %s", appName, strings.Join(tried, "; "))
	p.log.Warn("request failed on every candidate", "app", strings.Clone(appName), "request_id", string(fc.id[:fc.idLen]), "reason", reason)
	fc.fail(http.StatusBadGateway, codeAllFailed, reason, req.close)
	return actKeep
}

// attemptFailed records an attempt on tg that failed before its answer
// started; done when the request ends there (the client left, or a
// request that is not retried timed out), else the failure joins tried.
func (fc *fastConn) attemptFailed(tg *route.Target, probe bool, err error, tried *[]string) (act action, done bool) {
	p, req := fc.e.p, &fc.req
	if fc.gone.Load() || fc.state.Load() == connClosed {
		p.release(tg, probe)
		return actClose, true // the client went away, or the proxy cut it
	}
	p.strike(tg, err)
	p.release(tg, probe)
	if headerTimeout(err) && !idempotent(str(req.method)) {
		reason := fmt.Sprintf("machine %s in %s did not answer within %v; a %s is not retried", tg.MachineID, tg.Region, p.cfg.ResponseHeaderTimeout, req.method)
		fc.fail(http.StatusGatewayTimeout, codeTimeout, reason, req.close)
		return actKeep, true
	}
	p.log.Debug("candidate failed", "app", tg.App, "machine", tg.MachineID, "host", tg.Host, "request_id", string(fc.id[:fc.idLen]), "err", err)
	*tried = append(*tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
	return actKeep, false
}

// attempt sends the request to one candidate (with ack, given up when the
// candidate's host does not acknowledge it in time). A non-nil error means
// the candidate failed before its answer started: nothing reached the
// client.
func (fc *fastConn) attempt(st *state, tg *route.Target, body []byte, probe, ack bool, o *order, cands []*route.Target) (action, error) {
	p := fc.e.p
	key := upKey{addr: tg.Addr, port: tg.Port}
	headerTimeout := p.cfg.ResponseHeaderTimeout
	var ackBudget time.Duration
	if ack {
		ackBudget = p.ackBudget(tg)
	}
	if !tg.OnSelf {
		key = upKey{addr: st.backhaul[tg.Host]}
		if key.addr == "" {
			return actKeep, fmt.Errorf("host %s advertises no proxy address", tg.Host)
		}
		headerTimeout += time.Second // the far proxy times its machine out first and says so
	}
	p.load.add(tg.MachineID, 1)
	fc.counted = tg.MachineID
	defer fc.endLoad()
	// A pooled connection the machine closed meanwhile fails before any
	// answer: it is replaced by a new one, once.
	for fresh := false; ; fresh = true {
		var uc *upConn
		if !fresh {
			uc = fc.e.pool.get(key)
		}
		if uc == nil {
			var err error
			if uc, err = fc.e.pool.dial(fc.e.dialer(tg), key, p.connectBudget(tg)); err != nil {
				return actKeep, err
			}
			fresh = true
		}
		fc.setUp(uc)
		err := fc.exchange(uc, tg, body, headerTimeout, ackBudget, st, o, cands)
		if err == nil {
			break
		}
		fc.setUp(nil)
		uc.c.Close()
		var se *silentError
		if fresh || fc.hedge != nil || fc.gone.Load() || fc.state.Load() == connClosed || uc.got > 0 || errors.Is(err, errBadResponse) || isTimeout(err) || errors.As(err, &se) {
			return actKeep, err
		}
	}
	return fc.answered(fc.upConn, tg, probe)
}

// answered passes on the answer whose head exchange read from uc (fc's
// upstream connection in use): a far host's word that the attempt failed
// is an error, a fly-replay goes to serveEdge, else the answer goes to
// the client.
func (fc *fastConn) answered(uc *upConn, tg *route.Target, probe bool) (action, error) {
	p := fc.e.p
	defer fc.setUp(nil)
	resp := &fc.resp
	if !tg.OnSelf {
		var err error
		switch {
		case len(resp.retry) > 0:
			err = fmt.Errorf("host %s: %s", tg.Host, resp.retry)
			if equalFoldBS(resp.retryKind, retryNotReached) {
				err = fmt.Errorf("%w: %w", errNotReached, err)
			}
		case len(resp.timeout) > 0 && idempotent(str(fc.req.method)):
			err = &farTimeout{fmt.Sprintf("host %s: %s", tg.Host, resp.timeout)}
		}
		if err != nil {
			uc.c.Close()
			return actKeep, err
		}
	}
	if fc.hedge != nil && !fc.hedge.claim() {
		uc.c.Close() // the hedge's answer came first
		return actKeep, errLostRace
	}
	if !tg.OnSelf && len(resp.timeout) > 0 {
		p.strike(tg, errors.New(string(resp.timeout))) // a 504 for the client
		p.release(tg, probe)
	} else {
		p.succeeded(tg)
	}
	if resp.replay {
		// fly-replay is followed by serveEdge: the request goes there,
		// whole, with this answer (handover.go).
		uc.dl.read(uc.c, time.Time{}, 0) // the prefetch reads with no deadline
		fc.pre = fc.prefetch(uc, tg)
		uc.c.Close()
		return actHandOff, nil
	}
	fc.giveBody()
	return fc.respond(uc, tg), nil
}

// allOverSoft reports whether every candidate is at its soft limit: then
// autostart starts another machine, if the app has one stopped.
func (p *Proxy) allOverSoft(cands []*route.Target) bool {
	for _, tg := range cands {
		if !p.overSoft(tg) {
			return false
		}
	}
	return true
}

// farTimeout is a far host's word that its machine did not answer in time;
// like a local header timeout, only an idempotent request moves on.
type farTimeout struct{ s string }

func (e *farTimeout) Error() string { return e.s }

// errBadResponse: what came back is not an HTTP/1.1 response.
var errBadResponse = errors.New("malformed response")

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// dialer is how a target is reached: the machine directly, or the host's
// backhaul.
func (e *edgeServer) dialer(tg *route.Target) DialFunc {
	if tg.OnSelf {
		return e.p.cfg.DialMachine
	}
	return e.p.dialWaiting(tg)
}

// exchange writes the request and reads the response's head into fc.resp.
// With ack > 0 the far host must acknowledge the request within ack, and
// again within ack plus ackInterval of each acknowledgement (ack.go), or
// the attempt ends with a silentError.
//
// When the acknowledgement is late and the request may be hedged (o and
// cands give the candidates left), the attempt goes on and the hedge
// starts (fc.hedge, hedge.go); it ends when the hedge wins.
func (fc *fastConn) exchange(uc *upConn, tg *route.Target, body []byte, timeout, ack time.Duration, st *state, o *order, cands []*route.Target) error {
	b := fc.out.start(nil)
	b = fc.appendRequest(b, tg, body)
	fc.out.b = b
	if len(b)+len(body) <= cap(b) {
		b = append(b, body...)
		body = nil
	}
	uc.got = 0
	now := time.Now()
	deadline := now.Add(timeout)
	// The write deadline stands between requests (only exchange writes
	// here): it may fire up to timeout/slackDiv late, and moves once per
	// that much time on a busy connection.
	uc.dl.write(uc.c, deadline, timeout/slackDiv)
	// A machine slower than clientCheckAfter has the client watched
	// meanwhile: a client that leaves ends the attempt (net/http's path
	// cancels its request the same way).
	check := now.Add(min(timeout, clientCheckAfter))
	var ackDue time.Time    // when the far host's next acknowledgement is due
	var suspectAt time.Time // when the host is suspect without it (suspect.go)
	var allow time.Duration // how long its first word may take
	acked, rechecked := false, false
	var gaveUp *atomic.Bool // the host was found silent meanwhile (silence.go)
	var hw *hostWaiter
	if ack > 0 {
		ackDue = now.Add(ack)
		if allow = fc.e.p.words.allowance(tg.Host, tg.RTT); allow > 0 {
			suspectAt = now.Add(allow)
		}
		p, flag, c := fc.e.p, new(atomic.Bool), uc.c
		gaveUp = flag
		hw = p.waiters.wait(tg.Host, p.quietFor(tg.RTT, ack), func() {
			flag.Store(true)
			c.SetReadDeadline(time.Now())
		})
		defer p.waiters.stop(hw)
	}
	var stop func()
	readBy := func() time.Time { // the first of the deadlines still ahead
		if gaveUp != nil && gaveUp.Load() {
			return time.Now()
		}
		t := deadline
		if stop == nil && check.Before(t) {
			t = check
		}
		if !ackDue.IsZero() && ackDue.Before(t) {
			t = ackDue
		}
		if !suspectAt.IsZero() && suspectAt.Before(t) {
			t = suspectAt
		}
		return t
	}
	// The first read deadline: the client check's may be late by a little
	// (it only starts the watch), the others are exact.
	if t := readBy(); t.Equal(check) && ackDue.IsZero() {
		uc.dl.read(uc.c, t, clientCheckAfter/slackDiv)
	} else {
		uc.dl.read(uc.c, t, 0)
	}
	defer func() {
		if stop != nil {
			stop()
		}
	}()
	// A request in one piece is written and its answer waited for in one
	// step (sendThenRead), with no read in vain between.
	send := uc.rc != nil && len(body) == 0 && uc.r == uc.w
	if !send {
		if _, err := uc.c.Write(b); err != nil {
			return err
		}
		if len(body) > 0 {
			if _, err := uc.c.Write(body); err != nil {
				return err
			}
		}
		fc.out.b = b[:0]
	}
	for {
		err := parseResponseHead(uc.buf[uc.r:uc.w], 1<<20, &fc.resp)
		switch err {
		case nil:
			if fc.resp.status/100 == 1 && fc.resp.status != http.StatusSwitchingProtocols {
				uc.r += fc.resp.headLen // an interim answer (103): not passed on, as net/http does
				if !ackDue.IsZero() && fc.resp.status == http.StatusProcessing {
					hw.hear()
					fc.e.p.suspicion.heard(tg.Host)
					at := time.Now()
					if !acked {
						acked = true
						fc.e.p.words.sample(tg.Host, at.Sub(now))
					}
					ackDue = at.Add(ack + ackInterval) // the far host's acknowledgement
					if d := suspectBetweenAcks(allow); d > 0 {
						suspectAt, rechecked = at.Add(d), false
					}
					uc.dl.read(uc.c, readBy(), 0)
				}
				continue
			}
			if fc.resp.status == http.StatusSwitchingProtocols {
				return fmt.Errorf("%w: 101 to a request without an upgrade", errBadResponse)
			}
			if hw != nil {
				fc.e.p.waiters.stop(hw) // the answer came: no giving up now
				if gaveUp != nil && gaveUp.Load() {
					// The silent host's wake-up set a read deadline of
					// its own: cleared, as dl knows nothing of it.
					uc.dl.r = time.Time{}
					uc.c.SetReadDeadline(time.Time{})
				}
			}
			// The deadlines stand: the body's reads set their own
			// (upConn.fill), and a replay's prefetch clears it.
			return nil
		case errIncomplete:
			var err error
			if send {
				send, err = false, uc.sendThenRead(b)
				fc.out.b = b[:0]
			} else {
				err = uc.fill()
			}
			if err != nil {
				if !isTimeout(err) {
					if fc.hedge != nil && fc.hedge.lost() {
						return errLostRace
					}
					return err
				}
				now := time.Now()
				switch {
				case suspectAt.IsZero() || now.Before(suspectAt):
				case !rechecked:
					// A word may wait unread: look once more (suspect.go).
					rechecked, suspectAt = true, now.Add(recheckAfter(suspectAt, now))
				default:
					suspectAt = time.Time{}
					fc.e.p.suspectHost(tg.Host, "an attempt heard nothing from it for a round trip")
				}
				if fc.hedge != nil && fc.hedge.lost() {
					return errLostRace
				}
				if !ackDue.IsZero() && (!now.Before(ackDue) || gaveUp.Load()) {
					se := &silentError{host: tg.Host, budget: ack, found: gaveUp.Load()}
					if !fc.startHedge(uc, tg, st, o, cands, body, hw) {
						return se
					}
					// The attempt goes on, hedged; the host was late all
					// the same (its breaker opens, its region counts it).
					ackDue, suspectAt, gaveUp = time.Time{}, time.Time{}, nil
					fc.e.p.strike(tg, se)
					uc.dl.r = time.Time{} // a wake-up's deadline, unknown to dl
				}
				if !now.Before(deadline) {
					return err
				}
				if stop == nil && !now.Before(check) {
					stop = fc.watchClient(uc)
				}
				uc.dl.read(uc.c, readBy(), 0)
			}
		default:
			return fmt.Errorf("%w: %v", errBadResponse, err)
		}
	}
}

// clientCheckAfter is how long a machine may take to answer before the
// client's connection is watched for its leaving.
const clientCheckAfter = 200 * time.Millisecond

// watchClient reads the client's connection until stop is called: a
// client that closes it (or resets it) has left, and the upstream
// connection is closed to end the attempt. Bytes the client sends
// meanwhile (a pipelined request) are kept, and end the watch.
func (fc *fastConn) watchClient(uc *upConn) (stop func()) {
	b := (*fc.buf)[fc.w:]
	if len(b) == 0 {
		return func() {} // a full buffer: the client is not done sending
	}
	done := make(chan struct{})
	fc.dl.read(fc.c, time.Time{}, 0)
	go func() {
		defer close(done)
		n, err := fc.c.Read(b)
		if n > 0 || isTimeout(err) {
			fc.w += n
			return
		}
		fc.gone.Store(true)
		uc.c.Close()
	}()
	return func() {
		fc.dl.read(fc.c, time.Unix(1, 0), 0) // ends the read
		<-done
		fc.dl.read(fc.c, time.Time{}, 0)
	}
}

// appendRequest writes the request line and headers for the next hop:
// the client's headers without the hop-by-hop and internal ones, then
// Fly's, as serveEdge sets them.
func (fc *fastConn) appendRequest(b []byte, tg *route.Target, body []byte) []byte {
	p, req := fc.e.p, &fc.req
	b = append(b, req.method...)
	b = append(b, ' ')
	b = append(b, req.target...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, req.host...)
	b = append(b, "\r\n"...)
	var xff int
	for i := range req.headers {
		h := &req.headers[i]
		if dropRequestHeader(req, h.name) {
			continue
		}
		if equalFoldBS(h.name, "X-Forwarded-For") {
			xff++
			continue
		}
		b = append(b, h.name...)
		b = append(b, ": "...)
		b = append(b, h.value...)
		b = append(b, "\r\n"...)
	}
	b = append(b, "Fly-Client-Ip: "...)
	b = append(b, fc.clientIP...)
	b = append(b, "\r\nFly-Region: "...)
	b = append(b, p.cfg.Region...)
	b = append(b, "\r\nFly-Request-Id: "...)
	b = append(b, fc.id[:fc.idLen]...)
	b = append(b, "\r\nX-Forwarded-For: "...)
	if xff > 0 {
		for i := range req.headers {
			h := &req.headers[i]
			if equalFoldBS(h.name, "X-Forwarded-For") && !dropRequestHeader(req, h.name) {
				b = append(b, h.value...)
				b = append(b, ", "...)
			}
		}
	}
	b = append(b, fc.clientIP...)
	if fc.secure {
		b = append(b, "\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: "...)
	} else {
		b = append(b, "\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: "...)
	}
	port := int64(p.publicPort(fc.secure))
	b = appendInt(b, port)
	b = append(b, "\r\nFly-Forwarded-Port: "...)
	b = appendInt(b, port)
	b = append(b, "\r\n"...)
	if !tg.OnSelf {
		b = append(b, hdrToken+": "...)
		b = append(b, p.cfg.Token...)
		b = append(b, "\r\n"+hdrApp+": "...)
		b = append(b, tg.App...)
		b = append(b, "\r\n"+hdrMachine+": "...)
		b = append(b, tg.MachineID...)
		b = append(b, "\r\n"+hdrPort+": "...)
		b = appendInt(b, port)
		b = append(b, "\r\n"...)
	}
	if m := str(req.method); len(body) > 0 || m == http.MethodPost || m == http.MethodPut || m == http.MethodPatch {
		b = append(b, "Content-Length: "...)
		b = appendInt(b, int64(len(body)))
		b = append(b, "\r\n"...)
	}
	return append(b, "\r\n"...)
}

// dropRequestHeader: what the edge does not pass on of a client's request.
// Fly's own headers are set again by the edge.
func dropRequestHeader(req *h1Request, name []byte) bool {
	if hopByHop(name) || listedInConnection(req.headers, name) || hasPrefixFold(name, internalPref) {
		return true
	}
	for _, n := range [...]string{"Host", "Content-Length", hdrReplaySrc, "Fly-Client-Ip", "Fly-Region", "Fly-Request-Id",
		"X-Forwarded-Proto", "X-Forwarded-Port", "Fly-Forwarded-Port"} {
		if equalFoldBS(name, n) {
			return true
		}
	}
	return false
}

func hopByHop(name []byte) bool {
	for _, h := range hopHeaders {
		if equalFoldBS(name, h) {
			return true
		}
	}
	return false
}

// listedInConnection reports whether a Connection header names the
// header (a hop-by-hop header of the sender's choosing).
func listedInConnection(hs []h1Header, name []byte) bool {
	for i := range hs {
		if !equalFoldBS(hs[i].name, "Connection") {
			continue
		}
		for tok := range tokens(hs[i].value) {
			if len(tok) == len(name) && equalFoldBS(tok, str(name)) {
				return true
			}
		}
	}
	return false
}

// respond passes the machine's answer to the client, streaming its body.
// A body cut off after the head was sent cuts the client's connection.
func (fc *fastConn) respond(uc *upConn, tg *route.Target) action {
	p, req, resp := fc.e.p, &fc.req, &fc.resp
	isHead := str(req.method) == http.MethodHead
	fc.out.b = fc.appendAnswerHead(fc.out.start(&fc.io), isHead)
	var err error
	reusable := !resp.close
	uc.watchBody(fc)
	switch {
	case bodyless(isHead, resp.status):
		uc.r += resp.headLen
		fc.endLoad()
		err = fc.out.flush()
	case resp.contentLength >= 0:
		uc.r += resp.headLen
		if err = copyN(&fc.out, uc, resp.contentLength); err == nil {
			fc.endLoad()
			err = fc.out.flush()
		}
	case resp.chunked:
		uc.r += resp.headLen
		err = copyChunked(&fc.out, uc)
	default:
		uc.r += resp.headLen
		reusable = false
		err = copyUntilEOF(&fc.out, uc)
	}
	uc.endWatch() // before uc can go back to the pool
	if err == nil {
		fc.endLoad()
		err = fc.out.flush()
	}
	if err != nil {
		uc.c.Close()
		p.log.Debug("response cut off", "machine", tg.MachineID, "err", err)
		return actClose
	}
	if reusable && uc.r == uc.w {
		fc.e.pool.put(uc)
	} else {
		uc.c.Close()
	}
	return actKeep
}

// appendAnswerHead writes the head of the machine's answer (fc.resp) as
// the client gets it.
func (fc *fastConn) appendAnswerHead(b []byte, isHead bool) []byte {
	req, resp := &fc.req, &fc.resp
	b = append(b, "HTTP/1.1 "...)
	b = appendInt(b, int64(resp.status))
	b = append(b, ' ')
	if t := http.StatusText(resp.status); t != "" {
		b = append(b, t...)
	} else {
		b = append(b, "status code "...)
		b = appendInt(b, int64(resp.status))
	}
	b = append(b, "\r\n"...)
	for i := range resp.headers {
		h := &resp.headers[i]
		if hopByHop(h.name) || listedInConnection(resp.headers, h.name) || hasPrefixFold(h.name, internalPref) ||
			equalFoldBS(h.name, "Content-Length") || equalFoldBS(h.name, "Fly-Request-Id") || equalFoldBS(h.name, "Server") {
			continue
		}
		b = append(b, h.name...)
		b = append(b, ": "...)
		b = append(b, h.value...)
		b = append(b, "\r\n"...)
	}
	b = fc.appendEdgeHeaders(b, !resp.hasDate)
	switch {
	case bodyless(isHead, resp.status):
		if resp.contentLength >= 0 && resp.status != http.StatusNoContent && resp.status/100 != 1 {
			b = append(b, "Content-Length: "...)
			b = appendInt(b, resp.contentLength)
			b = append(b, "\r\n"...)
		}
	case resp.contentLength >= 0:
		b = append(b, "Content-Length: "...)
		b = appendInt(b, resp.contentLength)
		b = append(b, "\r\n"...)
	default:
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	}
	if req.close {
		b = append(b, "Connection: close\r\n"...)
	}
	return append(b, "\r\n"...)
}

// appendEdgeHeaders adds what every edge answer carries.
func (fc *fastConn) appendEdgeHeaders(b []byte, date bool) []byte {
	b = append(b, "Fly-Request-Id: "...)
	b = append(b, fc.id[:fc.idLen]...)
	b = append(b, "\r\nServer: "+serverName+"\r\nVia: "+viaValue+"\r\n"...)
	if date {
		b = append(b, "Date: "...)
		b = appendDate(b, time.Now())
		b = append(b, "\r\n"...)
	}
	return b
}

// fail answers with the edge's own error, as Proxy.fail does.
func (fc *fastConn) fail(status int, code, reason string, close bool) {
	body := fmt.Sprintf("%d %s: %s\n", status, code, reason)
	b := fc.out.start(&fc.io)
	b = append(b, "HTTP/1.1 "...)
	b = appendInt(b, int64(status))
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nFlame-Error: "...)
	b = append(b, code...)
	b = append(b, "\r\n"...)
	b = fc.appendEdgeHeaders(b, true)
	b = append(b, "Content-Length: "...)
	b = appendInt(b, int64(len(body)))
	b = append(b, "\r\n"...)
	if close {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, "\r\n"...)
	b = append(b, body...)
	fc.out.b = b
	fc.out.flush()
}

// copyLength copies n bytes of body from the machine to the client.
func copyLength(o *outBuf, uc *upConn, n int64) error {
	if err := copyN(o, uc, n); err != nil {
		return err
	}
	return o.flush()
}

// copyChunked copies a chunked body, chunk by chunk (trailers are dropped,
// as serveEdge drops them), flushing whenever the machine has sent no
// more yet: a stream reaches the client as it comes.
func copyChunked(o *outBuf, uc *upConn) error {
	for {
		line, err := uc.line()
		if err != nil {
			return err
		}
		if i := strings.IndexByte(str(line), ';'); i >= 0 {
			line = line[:i]
		}
		size, ok := parseHex(trimOWS(line))
		if !ok {
			return errBadResponse
		}
		if size == 0 {
			for {
				l, err := uc.line()
				if err != nil {
					return err
				}
				if len(l) == 0 {
					break
				}
			}
			return o.frame(lastChunk) // the caller flushes
		}
		if err := o.chunkHeader(size); err != nil {
			return err
		}
		if err := copyN(o, uc, size); err != nil {
			return err
		}
		if err := o.frame(crlf); err != nil {
			return err
		}
		if l, err := uc.line(); err != nil || len(l) != 0 {
			return errBadResponse
		}
		if uc.r == uc.w {
			if err := o.flush(); err != nil {
				return err
			}
		}
	}
}

// copyN copies n bytes of body, flushing only before it would wait.
func copyN(o *outBuf, uc *upConn, n int64) error {
	for n > 0 {
		if uc.r == uc.w {
			if err := o.flush(); err != nil {
				return err
			}
			if err := uc.fill(); err != nil {
				return err
			}
		}
		k := min(int64(uc.w-uc.r), n)
		if err := o.write(uc.buf[uc.r : uc.r+int(k)]); err != nil {
			return err
		}
		uc.r += int(k)
		n -= k
	}
	return nil
}

// copyUntilEOF sends a body the machine ends by closing, as chunks.
func copyUntilEOF(o *outBuf, uc *upConn) error {
	for {
		if uc.r < uc.w {
			if err := o.chunkHeader(int64(uc.w - uc.r)); err != nil {
				return err
			}
			if err := o.write(uc.buf[uc.r:uc.w]); err != nil {
				return err
			}
			if err := o.frame(crlf); err != nil {
				return err
			}
			uc.r = uc.w
			if err := o.flush(); err != nil {
				return err
			}
		}
		err := uc.fill()
		if errors.Is(err, io.EOF) {
			return o.frame(lastChunk) // the caller flushes
		}
		if err != nil {
			return err
		}
	}
}

// outBuf is a write buffer on the client's connection, taken from a pool
// for one answer.
type outBuf struct {
	c  io.Writer
	bp *[]byte
	b  []byte
	// data: chunked framing is not written, only the body's bytes.
	data bool
}

const outBufSize = 16 << 10

var outBufs = sync.Pool{New: func() any { b := make([]byte, 0, outBufSize); return &b }}

// start empties the buffer for writing to c and returns it.
func (o *outBuf) start(c io.Writer) []byte {
	if o.bp == nil {
		o.bp = outBufs.Get().(*[]byte)
		o.b = (*o.bp)[:0]
	}
	o.c = c
	o.b = o.b[:0]
	return o.b
}

func (o *outBuf) write(p []byte) error {
	if len(o.b)+len(p) > cap(o.b) {
		if err := o.flush(); err != nil {
			return err
		}
		if len(p) > cap(o.b) {
			_, err := o.c.Write(p)
			return err
		}
	}
	o.b = append(o.b, p...)
	return nil
}

// chunkHeader writes a chunk's size line.
func (o *outBuf) chunkHeader(size int64) error {
	if o.data {
		return nil
	}
	if len(o.b)+20 > cap(o.b) {
		if err := o.flush(); err != nil {
			return err
		}
	}
	o.b = strconv.AppendInt(o.b, size, 16)
	o.b = append(o.b, '\r', '\n')
	return nil
}

var lastChunk = []byte("0\r\n\r\n")

// frame writes chunked framing, unless only the data is wanted.
func (o *outBuf) frame(p []byte) error {
	if o.data {
		return nil
	}
	return o.write(p)
}

// copyChunkedData copies a chunked body's data alone.
func copyChunkedData(o *outBuf, uc *upConn) error {
	o.data = true
	return copyChunked(o, uc)
}

func (o *outBuf) flush() error {
	if len(o.b) == 0 {
		return nil
	}
	_, err := o.c.Write(o.b)
	o.b = o.b[:0]
	return err
}

func (o *outBuf) release() {
	if o.bp != nil {
		if cap(o.b) == outBufSize {
			*o.bp = o.b[:0]
		}
		outBufs.Put(o.bp)
		o.bp, o.b = nil, nil
	}
}

func appendInt(b []byte, n int64) []byte { return strconv.AppendInt(b, n, 10) }

// The Date header, formatted once a second.
type dateStamp struct {
	sec int64
	b   []byte
}

var dateNow atomic.Pointer[dateStamp]

func appendDate(b []byte, now time.Time) []byte {
	sec := now.Unix()
	d := dateNow.Load()
	if d == nil || d.sec != sec {
		d = &dateStamp{sec: sec, b: now.UTC().AppendFormat(nil, http.TimeFormat)}
		dateNow.Store(d)
	}
	return append(b, d.b...)
}
