package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/httpserve"
)

// The edge listener. Every accepted connection is dispatched here: plain
// HTTP/1.1 requests are served by the fast path (fast.go: a strict parser,
// pooled buffers and pooled upstream connections, nothing allocated per
// request), and a connection the fast path does not want — HTTP/2 with
// prior knowledge (h2c), an upgrade (WebSockets), CONNECT, Expect,
// HTTP/1.0, an unknown host or an app with no candidate, a body larger
// than the fast path buffers, a fly-replay answer — is handed, with the
// bytes already read, to the net/http server running serveEdge, which
// serves it from then on. Both paths answer alike; the fast path only
// serves the common case without allocating.
//
// TLS slots in at accept: a TLS listener (or handshake in dispatch) wraps
// the accepted connection before the HTTP/1.1 / h2 split, and a connection
// whose ALPN chose h2 goes straight to the net/http server.

// edgeServer serves the edge listener.
type edgeServer struct {
	p    *Proxy
	ln   net.Listener
	slow *http.Server // serveEdge over net/http: h2c and what the fast path hands over
	// handed is the listener slow serves: the connections handed over.
	handed *handoffListener
	pool   *upPool

	headLimit int // request head bytes, as net/http allows (MaxHeaderBytes + 4096)
	bodyLimit int // bodies the fast path buffers; larger ones are handed over
	big       sync.Pool

	mu      sync.Mutex
	conns   map[*fastConn]struct{}
	closing atomic.Bool
	wg      sync.WaitGroup

	// tlsLn is the HTTPS listener (nil: none); its connections are
	// wrapped in TLS with tlsConf (tls.go).
	tlsLn   net.Listener
	tlsConf *tls.Config

	// loops serve plain TCP connections from event loops (evloop_linux.go);
	// nil: every connection has a goroutine.
	loops *evloops
}

// fastBodyLimit is the largest request body the fast path buffers itself
// (within MaxBufferedBody); a larger one goes through net/http, which
// buffers up to MaxBufferedBody or streams.
const fastBodyLimit = 64 << 10

// noEventLoop turns the event loops off for every edge (the tests run the
// whole suite with a goroutine per connection with FLAME_TEST_EVENT_LOOP=0).
var noEventLoop bool

// smallBuf is a connection's read buffer until a request needs more.
const smallBuf = 4 << 10

var smallBufs = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}

// edgeHTTPServer is the net/http server of the edge: HTTP/1.1 and h2c.
func (p *Proxy) edgeHTTPServer() *http.Server {
	protos := new(http.Protocols)
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	protos.SetHTTP2(true) // over TLS (tls.go)
	return httpserve.Apply(&http.Server{
		Handler:           http.HandlerFunc(p.serveEdge),
		MaxHeaderBytes:    p.cfg.MaxHeaderBytes,
		ReadHeaderTimeout: p.cfg.ReadHeaderTimeout,
		IdleTimeout:       p.cfg.IdleTimeout,
		Protocols:         protos,
		ConnContext:       connContext,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}, p.httpLimits())
}

func newEdgeServer(p *Proxy, ln net.Listener) *edgeServer {
	e := &edgeServer{
		p: p, ln: ln, slow: p.edgeHTTPServer(),
		handed:    &handoffListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})},
		pool:      newUpPool(),
		headLimit: p.cfg.MaxHeaderBytes + 4096,
		bodyLimit: int(min(p.cfg.MaxBufferedBody, fastBodyLimit)),
		conns:     map[*fastConn]struct{}{},
	}
	if p.cfg.TLS != nil {
		e.tlsLn, e.tlsConf = p.cfg.TLS.Listener, p.cfg.TLS.tlsServerConfig()
	}
	size := e.headLimit + e.bodyLimit + 4096
	e.big.New = func() any { b := make([]byte, size); return &b }
	if !p.cfg.DisableEventLoop && (!noEventLoop || p.cfg.loops) {
		loops, err := newEvloops(e, runtime.GOMAXPROCS(0))
		if err != nil {
			p.log.Warn("edge event loops unavailable: a goroutine per connection", "err", err)
		}
		e.loops = loops
	}
	return e
}

// start runs the accept loop, the net/http server and the upstream pool's
// reaper.
func (e *edgeServer) start() {
	e.wg.Add(3)
	go func() {
		defer e.wg.Done()
		if err := e.slow.Serve(e.handed); err != nil && !errors.Is(err, http.ErrServerClosed) {
			e.p.log.Error("edge listener (net/http) stopped", "err", err)
		}
	}()
	go func() {
		defer e.wg.Done()
		e.pool.reap(e.handed.done)
	}()
	go func() {
		defer e.wg.Done()
		e.acceptLoop(e.ln, false)
	}()
	if e.tlsLn != nil {
		e.wg.Go(func() { e.acceptLoop(e.tlsLn, true) })
	}
	e.loops.start()
}

func (e *edgeServer) acceptLoop(ln net.Listener, overTLS bool) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if e.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() {
				// Out of descriptors and the like: wait, as net/http does.
				backoff = max(5*time.Millisecond, min(2*backoff, time.Second))
				e.p.log.Debug("edge accept", "err", err, "retry_in", backoff)
				select {
				case <-time.After(backoff):
				case <-e.handed.done:
					return
				}
				continue
			}
			e.p.log.Error("edge listener stopped", "err", err)
			return
		}
		backoff = 0
		e.dispatch(c, overTLS)
	}
}

// dispatch starts serving an accepted connection: one from the HTTPS
// listener is wrapped in TLS, and its handshake (in its own goroutine, on
// serve) decides between net/http's HTTP/2 and the fast path; a plain
// connection starts on the fast path, which hands HTTP/2's preface to
// net/http itself.
func (e *edgeServer) dispatch(c net.Conn, overTLS bool) {
	if overTLS {
		c = tls.Server(c, e.tlsConf)
	} else if e.loops.adopt(c) {
		return
	}
	fc := &fastConn{e: e, c: c, secure: overTLS}
	e.mu.Lock()
	if e.closing.Load() {
		e.mu.Unlock()
		c.Close()
		return
	}
	e.conns[fc] = struct{}{}
	e.wg.Add(1)
	e.mu.Unlock()
	go fc.serve()
}

func (e *edgeServer) untrack(fc *fastConn) {
	e.mu.Lock()
	delete(e.conns, fc)
	e.mu.Unlock()
}

// handOff gives a connection to the net/http server, which reads pending
// first: the bytes the fast path read and did not serve.
func (e *edgeServer) handOff(c net.Conn, pending []byte, pre *prefetched) {
	rc := &replayConn{Conn: c, pending: bytes.Clone(pending), pre: pre}
	select {
	case e.handed.conns <- rc:
	case <-e.handed.done:
		c.Close()
	}
}

// close stops accepting, closes idle connections at once, lets requests in
// flight finish until ctx ends, then cuts what is left; it waits for every
// goroutine the edge started.
func (e *edgeServer) close(ctx context.Context) {
	e.closing.Store(true)
	e.ln.Close()
	if e.tlsLn != nil {
		e.tlsLn.Close()
	}
	e.loops.drain()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		e.mu.Lock()
		for fc := range e.conns {
			if fc.state.CompareAndSwap(connIdle, connClosed) {
				fc.c.Close()
			}
		}
		left := len(e.conns) + e.loops.live()
		e.mu.Unlock()
		if left == 0 {
			break
		}
		select {
		case <-tick.C:
			continue
		case <-ctx.Done():
		}
		e.mu.Lock()
		for fc := range e.conns {
			fc.state.Store(connClosed)
			fc.cut()
		}
		e.mu.Unlock()
		e.loops.cut()
		break
	}
	if err := e.slow.Shutdown(ctx); err != nil {
		e.slow.Close()
	}
	e.handed.Close()
	e.wg.Wait()
	e.pool.closeAll()
}

// handoffListener is the net/http server's listener: it accepts what the
// fast path hands over.
type handoffListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// replayConn reads pending before the connection.
type replayConn struct {
	net.Conn
	pending []byte
	pre     *prefetched // the first request's fly-replay answer, if any
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// Connection states, for Close: an idle connection may be closed at once.
const (
	connActive int32 = iota
	connIdle
	connClosed
)

// fastConn is one client connection on the fast path.
type fastConn struct {
	e        *edgeServer
	c        net.Conn
	io       sockIO // c, for the reads and writes of requests and answers
	state    atomic.Int32
	clientIP string
	secure   bool // over TLS (c is a *tls.Conn)

	buf    *[]byte // read buffer (small, or big while a request needs it)
	isBig  bool
	r, w   int // buf[r:w] is read and not yet served
	req    h1Request
	resp   h1Response
	out    outBuf
	body   []byte // a chunked body, decoded
	id     [26 + 1 + 64]byte
	idLen  int
	dl     deadlines // the client connection's, as set
	upMu   sync.Mutex
	upConn *upConn // the upstream connection in use, cut on a forced close
	pre    *prefetched
	gone   atomic.Bool // the client left while its request was in flight
	held   int64       // bytes of the body buffer budget the request holds
	// counted is the machine the request is counted in flight to, until
	// its answer is done.
	counted string
	// hedge is the request's hedge while one runs (hedge.go);
	// hedgeCancel, under upMu, ends it on a forced close.
	hedge       *hedge
	hedgeCancel context.CancelFunc
	// resume, when set, is what serve does first: the rest of a request an
	// event loop began (evloop_linux.go).
	resume func() action
}

// endLoad ends the request's count in flight (before the answer's last
// bytes are sent, as net/http's path ends it before its last flush).
func (fc *fastConn) endLoad() {
	if fc.counted != "" {
		fc.e.p.load.add(fc.counted, -1)
		fc.counted = ""
	}
}

// giveBody returns the request's share of the body buffer budget: once
// the machine's answer started, the body is not sent again.
func (fc *fastConn) giveBody() {
	if fc.held > 0 {
		fc.e.p.buffered.give(fc.held)
		fc.held = 0
	}
}

// cut closes the client's connection and the upstream one in use.
func (fc *fastConn) cut() {
	fc.c.Close()
	fc.upMu.Lock()
	if fc.upConn != nil {
		fc.upConn.c.Close()
	}
	if fc.hedgeCancel != nil {
		fc.hedgeCancel()
	}
	fc.upMu.Unlock()
}

func (fc *fastConn) setUp(uc *upConn) {
	fc.upMu.Lock()
	fc.upConn = uc
	fc.upMu.Unlock()
}

// serve reads and serves requests until the connection ends or is handed
// over.
func (fc *fastConn) serve() {
	e := fc.e
	handed := false
	defer func() {
		if !handed {
			fc.c.Close()
		}
		fc.release()
		e.untrack(fc)
		e.wg.Done()
	}()
	if fc.buf == nil {
		fc.buf = smallBufs.Get().(*[]byte)
	}
	fc.io = newSockIO(fc.c) // plain through a *tls.Conn
	if fc.clientIP == "" {
		fc.clientIP = fc.c.RemoteAddr().String()
		if h, _, err := net.SplitHostPort(fc.clientIP); err == nil {
			fc.clientIP = h
		}
	}
	if fc.secure {
		// Idle until the handshake is done: Close may end it.
		fc.state.Store(connIdle)
		h2, err := fc.handshake(fc.c.(*tls.Conn))
		if err != nil {
			return
		}
		if h2 {
			handed = true
			e.handOffTLS(fc.c.(*tls.Conn))
			return
		}
	}
	for {
		var act action
		if r := fc.resume; r != nil {
			fc.resume = nil
			act = r()
		} else if e.closing.Load() {
			return
		} else {
			act = fc.next()
		}
		switch act {
		case actClose:
			return
		case actHandOff:
			handed = true
			e.handOff(fc.c, (*fc.buf)[fc.r:fc.w], fc.pre)
			return
		}
	}
}

// release gives the buffers back.
func (fc *fastConn) release() {
	if fc.buf != nil {
		fc.putBuf()
	}
	fc.out.release()
}

func (fc *fastConn) putBuf() {
	if fc.isBig {
		fc.e.big.Put(fc.buf)
	} else {
		smallBufs.Put(fc.buf)
	}
	fc.buf, fc.isBig = nil, false
}

// What a connection does after a request.
type action int

const (
	actKeep action = iota
	actClose
	actHandOff
)

// fill reads more bytes, growing the buffer to the big one when it is
// full; false when the buffer cannot grow or the read failed.
func (fc *fastConn) fill() bool {
	b := *fc.buf
	if fc.r > 0 && fc.w == len(b) || fc.r == fc.w {
		copy(b, b[fc.r:fc.w])
		fc.w -= fc.r
		fc.r = 0
	}
	if fc.w == len(b) {
		if fc.isBig {
			return false
		}
		nb := fc.e.big.Get().(*[]byte)
		copy(*nb, b[:fc.w])
		smallBufs.Put(fc.buf)
		fc.buf, fc.isBig = nb, true
		b = *nb
	}
	n, err := fc.io.Read(b[fc.w:])
	fc.w += n
	return n > 0 || err == nil
}

// next reads one request and serves it.
func (fc *fastConn) next() action {
	e, p := fc.e, fc.e.p
	// Until its head is read whole, a request is not begun: Close may
	// end the connection.
	fc.state.Store(connIdle)
	if e.closing.Load() {
		return actClose
	}
	if fc.r == fc.w {
		// Between requests: the small buffer is enough.
		fc.r, fc.w = 0, 0
		if fc.isBig {
			fc.putBuf()
			fc.buf = smallBufs.Get().(*[]byte)
		}
		// The idle deadline stands across requests (nothing reads the
		// connection under it but this fill): it moves once per slack.
		fc.dl.read(fc.c, time.Now().Add(p.cfg.IdleTimeout), p.cfg.IdleTimeout/slackDiv)
		if !fc.fill() {
			return actClose
		}
	}
	// The header timeout runs from the first bytes of the head; it is set
	// only if the head needs another read.
	var headBy time.Time
	req := &fc.req
	for {
		err := parseRequestHead((*fc.buf)[fc.r:fc.w], e.headLimit, req)
		switch err {
		case nil:
		case errIncomplete:
			if headBy.IsZero() {
				headBy = time.Now().Add(p.cfg.ReadHeaderTimeout)
			}
			fc.dl.read(fc.c, headBy, 0)
			if !fc.fill() {
				if fc.w-fc.r >= e.headLimit {
					fc.plain(http.StatusRequestHeaderFieldsTooLarge)
				}
				return actClose // the timeout passed or the client left
			}
			continue
		case errTooLarge:
			fc.plain(http.StatusRequestHeaderFieldsTooLarge)
			return actClose
		case errMalformed:
			fc.plain(http.StatusBadRequest)
			return actClose
		default:
			return actHandOff
		}
		break
	}
	if !fc.state.CompareAndSwap(connIdle, connActive) {
		return actClose // the proxy is closing
	}
	if req.upgrade || req.expect || req.minor == 0 || string(req.method) == http.MethodConnect {
		return actHandOff
	}
	// The body, buffered whole.
	var body []byte
	raw := req.headLen
	var bodyBy time.Time // the body timeout, set before the body's first read
	bodyDeadline := func() {
		if bodyBy.IsZero() {
			bodyBy = time.Now().Add(p.cfg.BodyReadTimeout)
		}
		fc.dl.read(fc.c, bodyBy, 0)
	}
	switch {
	case req.chunked:
		for {
			var n int
			var err error
			fc.body, n, err = decodeChunked((*fc.buf)[fc.r+req.headLen:fc.w], int64(e.bodyLimit), fc.body[:0])
			switch err {
			case nil:
				raw += n
				body = fc.body
			case errIncomplete:
				bodyDeadline()
				if fc.fill() {
					continue
				}
				if fc.w-fc.r >= len(*fc.buf) {
					return actHandOff // larger than the fast path buffers
				}
				return fc.bodyTimeout()
			case errTooLarge:
				return actHandOff
			default:
				fc.plain(http.StatusBadRequest)
				return actClose
			}
			break
		}
		if !p.buffered.take(int64(len(body))) {
			return actHandOff // net/http streams it
		}
		fc.held = int64(len(body))
		defer fc.giveBody()
	case req.contentLength > 0:
		if req.contentLength > int64(e.bodyLimit) {
			return actHandOff
		}
		n := int(req.contentLength)
		if !p.buffered.take(int64(n)) {
			return actHandOff
		}
		fc.held = int64(n)
		defer fc.giveBody()
		for fc.w-fc.r < req.headLen+n {
			bodyDeadline()
			if !fc.fill() {
				return fc.bodyTimeout()
			}
		}
		raw += n
		body = (*fc.buf)[fc.r+req.headLen : fc.r+req.headLen+n]
	}
	// The read deadline set last stands while the request is forwarded:
	// nothing reads the client's connection meanwhile but watchClient,
	// which clears it.
	return fc.served(fc.forward(body), raw)
}

// served ends a request whose raw bytes (head and body) were read from
// fc.r, after forward's act.
func (fc *fastConn) served(act action, raw int) action {
	fc.out.release()
	fc.shrink()
	if act == actHandOff {
		return act // the request's bytes are replayed from fc.r
	}
	fc.r += raw
	if fc.req.close && act == actKeep {
		return actClose
	}
	return act
}

// shrink drops what one large request grew, so an idle connection holds
// only its small buffer.
func (fc *fastConn) shrink() {
	if cap(fc.req.headers) > 64 {
		fc.req.headers = nil
	}
	if cap(fc.resp.headers) > 64 {
		fc.resp.headers = nil
	}
	if cap(fc.body) > smallBuf {
		fc.body = nil
	}
}

// bodyTimeout answers a body that did not arrive in time (or at all).
func (fc *fastConn) bodyTimeout() action {
	p := fc.e.p
	fc.giveBody()
	fc.newID()
	fc.fail(http.StatusRequestTimeout, codeBadRequest, "the request's body did not arrive within "+p.cfg.BodyReadTimeout.String(), true)
	fc.linger()
	return actClose
}

// plain answers as net/http does to a request it cannot read: a status,
// and the connection closed.
func (fc *fastConn) plain(status int) {
	text := http.StatusText(status)
	b := fc.out.start(&fc.io)
	b = append(b, "HTTP/1.1 "...)
	b = appendInt(b, int64(status))
	b = append(b, ' ')
	b = append(b, text...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"...)
	b = appendInt(b, int64(status))
	b = append(b, ' ')
	b = append(b, text...)
	fc.out.b = b
	fc.out.flush()
	fc.linger()
}

// linger ends a connection the edge refused a request on without
// resetting it: what the client still sends is read and dropped for a
// moment after the answer (as net/http does), so the answer is not lost to
// a reset.
func (fc *fastConn) linger() {
	type closeWriter interface{ CloseWrite() error }
	cw, ok := fc.c.(closeWriter)
	if !ok {
		return
	}
	cw.CloseWrite()
	fc.dl.read(fc.c, time.Now().Add(lingerTime), 0)
	var drop [4 << 10]byte
	for n := 0; n < lingerBytes; {
		k, err := fc.c.Read(drop[:])
		n += k
		if err != nil {
			return
		}
	}
}

// What linger reads at most.
const (
	lingerTime  = 500 * time.Millisecond
	lingerBytes = 256 << 10
)
