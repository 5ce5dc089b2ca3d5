package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Headers between proxies. A client's request never carries them past the
// edge, and a machine's response never carries them back.
const (
	hdrToken   = "Flame-Proxy-Token"   // the hosts' shared token
	hdrApp     = "Flame-Proxy-App"     // the app the edge routed the request to
	hdrMachine = "Flame-Proxy-Machine" // the machine it chose
	hdrPort    = "Flame-Proxy-Port"    // the public port the request came in on
	// hdrRetry on a backhaul response says the machine was not reached
	// (not running on that host, connect refused, reset): the edge tries
	// its next candidate. Fly calls the first case PM13, "recently stopped".
	hdrRetry = "Flame-Proxy-Retry"
	// hdrTimeout on a backhaul response says the machine took the request
	// but did not start answering in time: only an idempotent request
	// moves on.
	hdrTimeout = "Flame-Proxy-Timeout"
	// hdrRetryKind says why, with hdrRetry: retryNotReached when nothing
	// reached the machine (not running there, connect refused), which opens
	// its breaker at once; absent for a reset.
	hdrRetryKind    = "Flame-Proxy-Retry-Kind"
	retryNotReached = "not-reached"
	internalPref    = "Flame-Proxy-"
)

// Response headers every edge answer carries, and the name it goes by.
const (
	serverName = "Flame"
	viaValue   = "1.1 flame"
)

// Error codes of the edge's own answers (header Flame-Error).
const (
	codeUnknownHost = "unknown_host" // 404: no app at that name
	codeNoCandidate = "no_candidate" // 503: no machine can take the request
	codeAllFailed   = "all_failed"   // 502: every candidate tried failed
	codeBadRequest  = "bad_request"  // 400: the request's body could not be read; 405 for CONNECT
	codeForbidden   = "forbidden"    // 403: a backhaul request without the token
	codeNotHere     = "not_here"     // 503 on the backhaul: the machine does not run here
	codeTimeout     = "timeout"      // 504: the machine did not start its answer in time
	codeBadReplay   = "bad_replay"   // 502: a fly-replay the edge cannot follow
	codeReplayLimit = "replay_limit" // 508: more than MaxReplays replays
)

// forwardable is a copy of a request's headers to send on: without the
// hop-by-hop and the proxies' internal ones, keeping an upgrade's.
func forwardable(in http.Header) http.Header {
	h := in.Clone()
	proto := upgradeOf(h)
	removeHopHeaders(h)
	removeInternal(h)
	keepUpgrade(h, proto)
	return h
}

// hopHeaders are meaningful for one connection only and never forwarded.
var hopHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for f := range strings.SplitSeq(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				h.Del(f)
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
}

func removeInternal(h http.Header) {
	for k := range h {
		if strings.HasPrefix(k, internalPref) {
			delete(h, k)
		}
	}
}

// idempotent methods may be sent again after a machine took them without
// answering (RFC 9110, 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// headerTimeout reports whether an attempt failed because the machine did
// not start its answer in time (a connect that timed out is no such case:
// nothing was sent).
func headerTimeout(err error) bool {
	var ce *connectError
	if errors.As(err, &ce) {
		return false
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// requestBody is a request's body as the attempts see it: buffered whole
// (every attempt reads it from the start), or streamed once.
type requestBody struct {
	buf    []byte
	stream *onceReader // nil when buffered
	size   int64       // -1 when unknown
}

// onceReader counts what was read, so a retry is known to be safe only
// while nothing was. Close does nothing: the server closes the request.
type onceReader struct {
	r io.Reader
	n int64
}

func (o *onceReader) Read(b []byte) (int, error) {
	n, err := o.r.Read(b)
	o.n += int64(n)
	return n, err
}

func (o *onceReader) Close() error { return nil }

// byteBudget bounds the bytes of request bodies buffered at once: past it,
// bodies stream (and are not retried) instead of taking memory without
// limit.
type byteBudget struct{ left atomic.Int64 }

func (b *byteBudget) take(n int64) bool {
	if b.left.Add(-n) < 0 {
		b.left.Add(n)
		return false
	}
	return true
}

func (b *byteBudget) give(n int64) { b.left.Add(n) }

// readBody buffers up to max bytes of a request's body, within the budget;
// held is what it keeps of the budget until the request ends.
func readBody(r *http.Request, max int64, budget *byteBudget) (body *requestBody, held int64, err error) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return &requestBody{}, 0, nil
	}
	stream := func(rd io.Reader) *requestBody {
		return &requestBody{stream: &onceReader{r: rd}, size: r.ContentLength}
	}
	if r.ContentLength > max {
		return stream(r.Body), 0, nil
	}
	need := r.ContentLength
	if need < 0 {
		need = max + 1 // unknown: room for the most, given back once read
	}
	if !budget.take(need) {
		return stream(r.Body), 0, nil
	}
	buf, err := io.ReadAll(io.LimitReader(r.Body, max+1))
	if err != nil {
		budget.give(need)
		return nil, 0, fmt.Errorf("read request body: %w", err)
	}
	if int64(len(buf)) > max {
		budget.give(need)
		return stream(io.MultiReader(bytes.NewReader(buf), r.Body)), 0, nil
	}
	held = int64(len(buf))
	budget.give(need - held)
	return &requestBody{buf: buf, size: held}, held, nil
}

// attempt returns the body for one attempt, and whether one may be made.
func (b *requestBody) attempt() (io.ReadCloser, int64, bool) {
	switch {
	case b.stream != nil:
		return b.stream, b.size, b.stream.n == 0
	case len(b.buf) == 0:
		return http.NoBody, 0, true
	}
	return io.NopCloser(bytes.NewReader(b.buf)), int64(len(b.buf)), true
}

// serveEdge routes a client's request to the best machine of its app.
func (p *Proxy) serveEdge(w http.ResponseWriter, r *http.Request) {
	reqID := ulid.Make().String() + "-" + p.cfg.Region
	pre := handedOver(r) // a fly-replay the fast path was answered with
	if pre != nil {
		reqID = pre.reqID
		defer pre.resp.Body.Close() // a hedge's answer holds a connection
	}
	if r.Method == http.MethodConnect {
		p.fail(w, reqID, http.StatusMethodNotAllowed, codeBadRequest, "CONNECT is not proxied")
		return
	}
	if p.acmeChallenge(w, r) {
		return
	}
	overTLS := secure(r)
	appName, ok := p.appFor(r.Host)
	st := p.state.Load()
	if !ok || !st.table.HasApp(appName) {
		p.fail(w, reqID, http.StatusNotFound, codeUnknownHost, fmt.Sprintf("no app is served at %q", clipHost(r.Host)))
		return
	}
	q := route.Query{
		Port:           p.publicPort(overTLS),
		PreferRegion:   r.Header.Get("Fly-Prefer-Region"),
		ForceRegion:    r.Header.Get("Fly-Force-Region"),
		PreferInstance: r.Header.Get("Fly-Prefer-Instance-Id"),
		ForceInstance:  r.Header.Get("Fly-Force-Instance-Id"),
		Rand:           p.seq.Add(0x9e3779b97f4a7c15),
	}
	var buf [route.MaxCandidates]*route.Target
	cands := st.table.Select(appName, q, routeInput{p}, buf[:0])
	cands, why := p.autostart(r.Context(), st, appName, q, cands)
	if len(cands) == 0 {
		reason := st.table.Explain(appName, q, routeInput{p})
		if why != "" {
			reason += "; " + why
		}
		p.log.Debug("no candidate", "app", appName, "request_id", reqID, "reason", reason)
		p.fail(w, reqID, http.StatusServiceUnavailable, codeNoCandidate, reason)
		return
	}
	if cands[0].ForceHTTPS && !overTLS {
		w.Header().Set("Location", p.httpsURL(r.Host, r.URL.RequestURI()))
		w.Header().Set("Fly-Request-Id", reqID)
		w.Header().Set("Server", serverName)
		w.Header().Add("Via", viaValue)
		w.WriteHeader(http.StatusMovedPermanently)
		return
	}
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(p.cfg.BodyReadTimeout)) // a socket deadline: the real clock
	body, held, err := readBody(r, p.cfg.MaxBufferedBody, &p.buffered)
	if err != nil {
		// The rest of the body is not waited for: the connection closes.
		w.Header().Set("Connection", "close")
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			p.fail(w, reqID, http.StatusRequestTimeout, codeBadRequest, fmt.Sprintf("the request's body did not arrive within %v", p.cfg.BodyReadTimeout))
			return
		}
		p.fail(w, reqID, http.StatusBadRequest, codeBadRequest, err.Error())
		return
	}
	defer p.buffered.give(held)
	rc.SetReadDeadline(time.Time{}) // a streamed body takes its time
	hdr := forwardable(r.Header)
	clientIP := r.RemoteAddr
	if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		clientIP = h
	}
	port := strconv.Itoa(q.Port)
	hdr.Set("Fly-Client-IP", clientIP)
	hdr.Set("Fly-Region", p.cfg.Region)
	hdr.Set("Fly-Request-Id", reqID)
	if prior := hdr.Values("X-Forwarded-For"); len(prior) > 0 {
		hdr.Set("X-Forwarded-For", strings.Join(prior, ", ")+", "+clientIP)
	} else {
		hdr.Set("X-Forwarded-For", clientIP)
	}
	if overTLS {
		hdr.Set("X-Forwarded-Proto", "https")
	} else {
		hdr.Set("X-Forwarded-Proto", "http")
	}
	hdr.Set("X-Forwarded-Port", port)
	hdr.Set("Fly-Forwarded-Port", port)

	hdr.Del(hdrReplaySrc) // only the edge says where a replay comes from
	for replays := 0; ; replays++ {
		resp, from, tried := pre.answer()
		if resp == nil {
			resp, from, tried = p.attempts(w, r, reqID, st, appName, cands, body, hdr, port)
		}
		pre = nil
		if resp == nil {
			if tried != nil {
				reason := fmt.Sprintf("no machine of app %q answered; tried %s", appName, strings.Join(tried, "; "))
				p.log.Warn("request failed on every candidate", "app", appName, "request_id", reqID, "reason", reason)
				p.fail(w, reqID, http.StatusBadGateway, codeAllFailed, reason)
			}
			return
		}
		rp, isReplay, err := replayOf(resp)
		if !isReplay {
			p.respond(w, resp, reqID, from.MachineID)
			return
		}
		var status int
		var code, reason string
		switch {
		case err != nil:
			status, code, reason = http.StatusBadGateway, codeBadReplay, fmt.Sprintf("machine %s asked for a replay the edge cannot follow: %v", from.MachineID, err)
		case body.stream != nil:
			status, code, reason = http.StatusBadGateway, codeBadReplay, fmt.Sprintf("machine %s asked for a replay, but the request's body was larger than %d bytes and was streamed, not kept: it cannot be sent again", from.MachineID, p.cfg.MaxBufferedBody)
		case replays == MaxReplays:
			status, code, reason = http.StatusLoopDetected, codeReplayLimit, fmt.Sprintf("machine %s asked for replay %d; at most %d are followed", from.MachineID, replays+1, MaxReplays)
		case rp.App != "" && rp.App != appName && !st.table.SameOrg(appName, rp.App):
			// The same answer whether the app exists in another org or
			// not at all: a tenant learns nothing of other orgs' apps.
			status, code, reason = http.StatusBadGateway, codeBadReplay, fmt.Sprintf("machine %s asked for a replay to app %q, which is not an app of its organization", from.MachineID, rp.App)
		}
		if code == "" {
			if rp.App != "" {
				appName = rp.App // another app of the org: the replays go on counting
			}
			cands = p.replayTargets(st, appName, q.Port, rp, from, cands[:0])
			if len(cands) == 0 {
				status, code, reason = http.StatusServiceUnavailable, codeNoCandidate, fmt.Sprintf("machine %s asked for a replay (%s) that no machine can take", from.MachineID, rp)
			}
		}
		if code != "" {
			p.log.Debug("replay refused", "app", appName, "request_id", reqID, "reason", reason)
			p.fail(w, reqID, status, code, reason)
			return
		}
		hdr.Set(hdrReplaySrc, replaySrc(from.MachineID, from.Region, p.cfg.Now(), rp.State))
	}
}

// attempts tries the candidates in order and returns the first response,
// with the machine it came from. With no response, tried lists the
// failures (nil when the request was answered here or the client left). A
// candidate whose breaker keeps it out is tried only after every other, as
// a last resort.
func (p *Proxy) attempts(w http.ResponseWriter, r *http.Request, reqID string, st *state, appName string, cands []*route.Target, body *requestBody, hdr http.Header, port string) (*http.Response, *route.Target, []string) {
	tried := []string{}
	o := order{p: p}
	for tg, probe, ok := o.next(cands); ok; tg, probe, ok = o.next(cands) {
		rb, size, ok := body.attempt()
		if !ok {
			p.release(tg, probe)
			break // a streamed body was already sent, in part
		}
		// Over the backhaul, a request that may go to a next candidate
		// waits only so long for the far host's acknowledgement (ack.go),
		// then is hedged there (hedge.go).
		ack := !tg.OnSelf && o.more(cands) && idempotent(r.Method) && body.stream == nil
		var slot *hedgeSlot
		var startHedge func(wake func())
		if ack {
			slot = &hedgeSlot{}
			startHedge = func(wake func()) {
				p.log.Debug("candidate failed", "app", appName, "machine", tg.MachineID, "host", tg.Host, "request_id", reqID,
					"err", "no acknowledgement in time; hedged")
				slot.set(p.startHedge(r.Context(), st, &o, cands, hedgeRequest{r: r, hdr: hdr, body: body, port: port}, wake))
			}
		}
		resp, err := p.send(r, st, tg, hdr, rb, size, port, ack, startHedge)
		err = farVerdict(tg, resp, err, r.Method)
		if slot != nil {
			if h := slot.get(); h != nil {
				return p.settleHedge(r, h, tg, probe, resp, err, tried)
			}
		}
		if err != nil {
			if r.Context().Err() != nil {
				p.release(tg, probe)
				return nil, nil, nil // the client went away
			}
			p.strike(tg, err)
			p.release(tg, probe)
			if headerTimeout(err) && !idempotent(r.Method) {
				reason := fmt.Sprintf("machine %s in %s did not answer within %v; a %s is not retried", tg.MachineID, tg.Region, p.cfg.ResponseHeaderTimeout, r.Method)
				p.fail(w, reqID, http.StatusGatewayTimeout, codeTimeout, reason)
				return nil, nil, nil
			}
			p.log.Debug("candidate failed", "app", appName, "machine", tg.MachineID, "host", tg.Host, "request_id", reqID, "err", err)
			tried = append(tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
			continue
		}
		if !tg.OnSelf && resp.Header.Get(hdrTimeout) != "" {
			p.strike(tg, errors.New(resp.Header.Get(hdrTimeout))) // a 504 for the client
			p.release(tg, probe)
		} else {
			p.succeeded(tg)
		}
		return resp, tg, nil
	}
	return nil, nil, tried
}

// send makes one attempt: straight to a machine of this host, or over the
// backhaul to the machine's host (with ack, given up when that host does
// not acknowledge it in time; with hedge too, kept running and hedged:
// hedge.go).
func (p *Proxy) send(r *http.Request, st *state, tg *route.Target, hdr http.Header, body io.ReadCloser, size int64, port string, ack bool, hedge func(wake func())) (*http.Response, error) {
	h := hdr.Clone()
	addr := net.JoinHostPort(tg.Addr, strconv.Itoa(tg.Port))
	tr := p.toSelf
	if !tg.OnSelf {
		addr = st.backhaul[tg.Host]
		if addr == "" {
			return nil, fmt.Errorf("host %s advertises no proxy address", tg.Host)
		}
		tr = p.hostTransport(h)
		h.Set(hdrToken, p.cfg.Token)
		h.Set(hdrApp, tg.App)
		h.Set(hdrMachine, tg.MachineID)
		h.Set(hdrPort, port)
	}
	ctx := context.WithValue(r.Context(), connectBudgetKey{}, p.connectBudget(tg))
	var aw *ackWatch
	if ack {
		ctx, aw = p.watchAck(ctx, tg)
		if hedge != nil {
			aw.hedge = hedge
			aw.late = func(se *silentError) {
				if se.found {
					// The host was just found silent (its breaker is
					// open): its region counts the attempt. This runs
					// while the host's attempts are given up.
					p.regions.record(tg.App, tg.Region, true)
					return
				}
				p.strike(tg, se)
			}
		}
	}
	out := (&http.Request{
		Method:        r.Method,
		URL:           &url.URL{Scheme: "http", Host: addr, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery},
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Host:          r.Host,
		Body:          body,
		ContentLength: size,
	}).WithContext(ctx)
	if size < 0 {
		out.ContentLength = -1
	}
	p.load.add(tg.MachineID, 1)
	resp, err := tr.RoundTrip(out)
	if aw != nil && (err != nil || !aw.done()) {
		if err == nil {
			resp.Body.Close() // the answer came as the host was given up
		}
		err = aw.failed(err)
		aw.cancel()
	}
	if err != nil {
		p.load.add(tg.MachineID, -1)
		return nil, err
	}
	done := func() {
		p.load.add(tg.MachineID, -1)
		if aw != nil {
			aw.cancel()
		}
	}
	if rwc, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Body = &countedConn{ReadWriteCloser: rwc, done: done}
	} else {
		resp.Body = &countedBody{ReadCloser: resp.Body, done: done}
	}
	return resp, nil
}

// countedConn is countedBody for an upgraded connection: it stays counted
// in flight until it closes.
type countedConn struct {
	io.ReadWriteCloser
	once sync.Once
	done func()
}

func (c *countedConn) Close() error {
	err := c.ReadWriteCloser.Close()
	c.once.Do(c.done)
	return err
}

// countedBody ends a request's count in flight when its response is done.
type countedBody struct {
	io.ReadCloser
	done func()
}

func (c *countedBody) Close() error {
	err := c.ReadCloser.Close()
	if c.done != nil {
		c.done()
		c.done = nil
	}
	return err
}

// respond passes a machine's response to the client. A body cut off after
// the status was sent cuts the client's connection too, so it cannot take
// a partial body for a whole one.
func (p *Proxy) respond(w http.ResponseWriter, resp *http.Response, reqID, machineID string) {
	if resp.StatusCode == http.StatusSwitchingProtocols {
		p.switchProtocols(w, resp, reqID)
		return
	}
	defer resp.Body.Close()
	h := w.Header()
	removeHopHeaders(resp.Header)
	removeInternal(resp.Header)
	if reqID != "" {
		resp.Header.Del(hdrReplay) // for the edge alone
	}
	for k, vs := range resp.Header {
		h[k] = vs
	}
	if reqID != "" {
		h.Set("Fly-Request-Id", reqID)
		h.Set("Server", serverName)
		h.Add("Via", viaValue)
	}
	if resp.ContentLength >= 0 && h.Get("Content-Length") == "" {
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	w.WriteHeader(resp.StatusCode)
	if err := copyBody(w, resp.Body, resp.ContentLength < 0); err != nil {
		p.log.Debug("response cut off", "machine", machineID, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// copyBody copies a response body, flushing after every read when its
// length is unknown (a stream: events, long polls).
func copyBody(w http.ResponseWriter, src io.Reader, flush bool) error {
	if !flush {
		_, err := io.Copy(w, src)
		return err
	}
	rc := http.NewResponseController(w)
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if ferr := rc.Flush(); ferr != nil {
				return ferr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// fail answers with the edge's own error: a status, a code and the reason.
func (p *Proxy) fail(w http.ResponseWriter, reqID string, status int, code, reason string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Flame-Error", code)
	if reqID != "" {
		h.Set("Fly-Request-Id", reqID)
		h.Set("Server", serverName)
		h.Add("Via", viaValue)
	}
	w.WriteHeader(status)
	fmt.Fprintf(w, "%d %s: %s\n", status, code, reason)
}

// clipHost keeps an unknown host short in an answer.
func clipHost(h string) string {
	if len(h) > 100 {
		return h[:100] + "…"
	}
	return h
}

// serveBackhaul delivers what another host's edge sent for a machine of
// this host, once the hop has shown a host's credential (hostcreds.go).
func (p *Proxy) serveBackhaul(w http.ResponseWriter, r *http.Request) {
	if !p.backhaulAuthorized(r) {
		p.fail(w, "", http.StatusForbidden, codeForbidden, "the backhaul takes requests from the cluster's hosts only")
		return
	}
	if isTCPHop(r) {
		p.serveBackhaulTCP(w, r)
		return
	}
	if r.Header.Get(hdrProbe) != "" {
		serveProbe(w) // another host asks whether this one is there (probe.go)
		return
	}
	appName, machineID := r.Header.Get(hdrApp), r.Header.Get(hdrMachine)
	port, _ := strconv.Atoi(r.Header.Get(hdrPort))
	if r.Header.Get(hdrStart) != "" {
		p.serveStart(w, r, appName, machineID, port)
		return
	}
	stopAck := keepAcking(w) // the edge knows this host is alive (ack.go)
	tg := p.state.Load().table.OnSelf(appName, port, machineID)
	if tg == nil || tg.Excluded == route.NotStarted || tg.Excluded == route.NoAddress {
		stopAck()
		why := "not running here"
		if tg != nil {
			why = tg.Excluded.String()
		}
		w.Header().Set(hdrRetry, "machine "+machineID+" "+why)
		w.Header().Set(hdrRetryKind, retryNotReached)
		p.fail(w, "", http.StatusServiceUnavailable, codeNotHere, fmt.Sprintf("machine %q of app %q is %s on host %s", machineID, appName, why, p.cfg.HostID))
		return
	}
	h := forwardable(r.Header)
	body := r.Body
	if r.ContentLength == 0 {
		body = http.NoBody
	}
	out := (&http.Request{
		Method: r.Method,
		URL: &url.URL{Scheme: "http", Host: net.JoinHostPort(tg.Addr, strconv.Itoa(tg.Port)),
			Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery},
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Host: r.Host, Body: body, ContentLength: r.ContentLength,
	}).WithContext(context.WithValue(r.Context(), connectBudgetKey{}, p.cfg.MinConnectTimeout))
	p.load.add(machineID, 1)
	defer p.load.add(machineID, -1)
	resp, err := p.toSelf.RoundTrip(out)
	stopAck()
	if err != nil {
		if r.Context().Err() != nil {
			return
		}
		if headerTimeout(err) {
			w.Header().Set(hdrTimeout, "machine "+machineID+": "+err.Error())
			p.fail(w, "", http.StatusGatewayTimeout, codeTimeout, fmt.Sprintf("machine %q: %v", machineID, err))
			return
		}
		w.Header().Set(hdrRetry, "machine "+machineID+": "+err.Error())
		if ce := (*connectError)(nil); errors.As(err, &ce) {
			w.Header().Set(hdrRetryKind, retryNotReached)
		}
		p.fail(w, "", http.StatusBadGateway, codeAllFailed, fmt.Sprintf("machine %q: %v", machineID, err))
		return
	}
	p.respond(w, resp, "", machineID)
}
