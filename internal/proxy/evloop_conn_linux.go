//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// A client connection on an event loop (evloop_linux.go): reading its
// requests, sending each to a machine, passing the answer on, and handing
// the connection to a goroutine for what the loop does not serve.

type lstate int

const (
	lsIdle lstate = iota // reading a request
	lsDial               // waiting for a connection to the machine
	lsUp                 // the request sent, waiting for the answer
	lsClosed
)

// lconn is a client connection served by a loop: the fast path's state
// of the connection, and the loop's.
type lconn struct {
	fastConn
	l      *evloop
	fd     int
	st     lstate
	more   bool   // the socket may have bytes unread
	hup    bool   // the client shut its side: read to the end, no edge follows
	last   bool   // the answer being written is the connection's last
	eof    bool   // the client sent its last bytes
	inHead bool   // a head has begun to arrive (its deadline is set)
	wq     []byte // the answer's bytes the client has not taken yet
	due    time.Time

	// The request in flight.
	up      *lup
	tg      *route.Target
	probe   bool
	fresh   bool // up was dialed for this request
	headIn  bool // the answer's head is in, its body not yet
	raw     int  // its bytes in buf from r: head and body
	bodyN   int
	sentAt  time.Time
	rst     *state
	appName string
	cands   [route.MaxCandidates]*route.Target
	nc      int
	o       order
}

func (lc *lconn) body() []byte {
	h := lc.r + lc.req.headLen
	return (*lc.buf)[h : h+lc.bodyN]
}

func (lc *lconn) onEvent(evs uint32) {
	if evs&evRead != 0 {
		lc.more = true
	}
	if evs&(evRdHup|evHup|evErr) != 0 {
		lc.hup = true
	}
	lc.run()
}

// run serves the connection as far as it can go without waiting.
func (lc *lconn) run() {
	l, p := lc.l, lc.l.p
	for lc.st != lsClosed {
		if len(lc.wq) > 0 && !lc.flush() {
			return
		}
		if lc.more && !lc.eof && !lc.readIn() {
			return
		}
		if lc.st != lsIdle {
			return // the input waits for the answer in flight
		}
		if l.draining.Load() || l.cutting.Load() {
			lc.close()
			return
		}
		if lc.r == lc.w {
			if lc.eof {
				lc.close()
				return
			}
			lc.inHead = false
			lc.due = l.now.Add(p.cfg.IdleTimeout)
			return
		}
		err := parseRequestHead((*lc.buf)[lc.r:lc.w], lc.e.headLimit, &lc.req)
		switch {
		case err == errIncomplete && lc.more && lc.w-lc.r < len(*lc.buf):
			continue // read more
		case err == errIncomplete && lc.eof:
			lc.close() // the client left mid-request
			return
		case err == errIncomplete && lc.w-lc.r < len(*lc.buf):
			if !lc.inHead {
				lc.inHead = true
				lc.due = l.now.Add(p.cfg.ReadHeaderTimeout)
			}
			return
		case err != nil:
			lc.toGoroutine(nil) // a large head, or one net/http answers
			return
		}
		lc.inHead = false
		if !lc.begin() {
			return
		}
	}
}

// readIn reads what the socket has into the buffer's free space; false
// when the connection ended.
func (lc *lconn) readIn() bool {
	b := *lc.buf
	if lc.st == lsIdle && lc.r > 0 && len(lc.wq) == 0 {
		// Between requests nothing views the buffer: its bytes move up.
		copy(b, b[lc.r:lc.w])
		lc.w -= lc.r
		lc.r = 0
	}
	if lc.w == len(b) {
		return true // full: read once there is room
	}
	n, e := sysRead(uintptr(lc.fd), b[lc.w:])
	switch {
	case e == syscall.EAGAIN:
		lc.more = false
	case e != 0:
		lc.close() // reset
		return false
	case n == 0:
		lc.more, lc.eof = false, true
	default:
		// A read short of the space got all there was: the next bytes
		// come with the next edge — unless the edge that came said the
		// client closed its side, whose end no other edge announces.
		lc.more = n == len(b)-lc.w || lc.hup
		lc.w += n
	}
	return true
}

// flush writes the answer's bytes the client has not taken; false while
// some wait (or the connection ended).
func (lc *lconn) flush() bool {
	for len(lc.wq) > 0 {
		k, e := sysWrite(uintptr(lc.fd), lc.wq)
		switch {
		case e == syscall.EAGAIN:
			lc.l.stalls.Add(1)
			lc.due = lc.l.now.Add(lc.l.p.cfg.IdleTimeout)
			return false
		case e != 0:
			lc.close()
			return false
		}
		lc.wq = lc.wq[k:]
	}
	lc.wq = nil
	lc.out.release()
	if lc.last {
		lc.close()
		return false
	}
	return true
}

// begin starts the request parsed in lc.req on the loop, or hands the
// connection to a goroutine; true when the loop goes on reading.
func (lc *lconn) begin() bool {
	p, req := lc.l.p, &lc.req
	if req.upgrade || req.expect || req.minor == 0 || req.chunked || string(req.method) == http.MethodConnect {
		lc.toGoroutine(nil)
		return false
	}
	lc.bodyN = 0
	if req.contentLength > 0 {
		n := int(req.contentLength)
		if req.headLen+n > len(*lc.buf) {
			lc.toGoroutine(nil) // the goroutine's buffer grows
			return false
		}
		if lc.w-lc.r < req.headLen+n {
			if lc.more {
				return true // read more, parse again
			}
			lc.toGoroutine(nil) // the body comes slowly: BodyReadTimeout is the goroutine's
			return false
		}
		lc.bodyN = n
	}
	appName, ok := p.appFor(str(req.host))
	st := p.state.Load()
	if !ok || !st.table.HasApp(appName) || p.wantsChallenge(str(req.host), str(req.target)) {
		lc.toGoroutine(nil)
		return false
	}
	q := route.Query{
		Port:           p.publicPort(false),
		PreferRegion:   str(req.header("Fly-Prefer-Region")),
		ForceRegion:    str(req.header("Fly-Force-Region")),
		PreferInstance: str(req.header("Fly-Prefer-Instance-Id")),
		ForceInstance:  str(req.header("Fly-Force-Instance-Id")),
		Rand:           p.seq.Add(0x9e3779b97f4a7c15),
	}
	cands := st.table.Select(appName, q, routeInput{p}, lc.cands[:0])
	if len(cands) == 0 || cands[0].ForceHTTPS || p.allOverSoft(cands) {
		lc.toGoroutine(nil)
		return false
	}
	lc.o = order{p: p}
	tg, probe, ok := lc.o.next(cands)
	if !ok {
		lc.toGoroutine(nil)
		return false
	}
	if !tg.OnSelf {
		p.release(tg, probe)
		lc.toGoroutine(nil) // the backhaul's acknowledgements and hedges are the goroutine's
		return false
	}
	if lc.bodyN > 0 {
		if !p.buffered.take(int64(lc.bodyN)) {
			p.release(tg, probe)
			lc.toGoroutine(nil)
			return false
		}
		lc.held = int64(lc.bodyN)
	}
	lc.state.Store(connActive)
	lc.rst, lc.appName, lc.nc = st, appName, len(cands)
	lc.tg, lc.probe = tg, probe
	lc.raw = req.headLen + lc.bodyN
	lc.newID()
	p.load.add(tg.MachineID, 1)
	lc.counted = tg.MachineID
	lc.connect(false)
	return lc.st == lsIdle
}

// connect sends the request on a pooled connection to the machine, or
// dials one (fresh: a new one, the pooled one having failed).
func (lc *lconn) connect(fresh bool) {
	l, tg := lc.l, lc.tg
	key := upKey{addr: tg.Addr, port: tg.Port}
	if !fresh {
		if u := l.getUp(key); u != nil {
			lc.send(u, false)
			return
		}
	}
	lc.st = lsDial
	lc.due = time.Time{} // the dial has its budget
	e := l.e
	dial, budget := e.dialer(tg), l.p.connectBudget(tg)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		uc, err := e.pool.dial(dial, key, budget)
		if !l.post(loopMsg{client: lc, uc: uc, err: err, fresh: fresh}) && uc != nil {
			uc.c.Close()
		}
	}()
}

// dialed continues the request once its dial is done.
func (lc *lconn) dialed(uc *upConn, err error, fresh bool) {
	l := lc.l
	if lc.st != lsDial {
		if uc != nil {
			uc.c.Close() // the client left meanwhile
		}
		return
	}
	if err != nil {
		lc.st = lsIdle
		lc.handFailure(err)
		return
	}
	fd, serr := stealFD(uc.c)
	if serr != nil {
		// Not a plain socket (a simulated network's): the goroutine path
		// takes the request, and this connection from the pool, and the
		// connections accepted from now on.
		l.ls.notRaw.Store(true)
		lc.unbegin()
		lc.e.pool.put(uc)
		lc.toGoroutine(nil)
		return
	}
	u := &lup{uc: upConn{key: uc.key, buf: uc.buf}, fd: fd, l: l}
	l.socks[int32(fd)] = lsock{u: u}
	if err := l.add(fd); err != nil {
		l.closeUp(u)
		lc.st = lsIdle
		lc.handFailure(err)
		return
	}
	lc.send(u, fresh)
}

// unbegin gives back what begin took, for a request handed over whole.
func (lc *lconn) unbegin() {
	lc.st = lsIdle
	lc.endLoad()
	lc.giveBody()
	lc.l.p.release(lc.tg, lc.probe)
	lc.tg = nil
}

// send writes the request to the machine.
func (lc *lconn) send(u *lup, fresh bool) {
	l := lc.l
	lc.up, lc.fresh, u.owner = u, fresh, lc
	b := lc.out.start(nil)
	b = lc.appendRequest(b, lc.tg, lc.body())
	b = append(b, lc.body()...)
	lc.out.b = b
	u.uc.got = 0
	lc.headIn = false
	lc.st = lsUp
	lc.sentAt = l.now
	lc.due = l.now.Add(min(l.p.cfg.ResponseHeaderTimeout, clientCheckAfter))
	k, e := sysWrite(uintptr(u.fd), b)
	switch {
	case e == syscall.EAGAIN:
		k = 0
	case e != 0:
		lc.upFailed(opError("write", e))
		return
	}
	if k < len(b) {
		u.wq = b[k:] // the rest once the socket is writable
	}
}

func opError(op string, e syscall.Errno) error {
	return &net.OpError{Op: op, Net: "tcp", Err: os.NewSyscallError(op, e)}
}

// upReadable reads the machine's answer; once its head (and body, if it
// fits) is there, it goes to the client.
func (lc *lconn) upReadable() {
	u := lc.up
	uc := &u.uc
	for {
		if uc.w == len(uc.buf) {
			if uc.r == 0 {
				lc.handWait() // a head larger than the buffer: fill grows it
				return
			}
			copy(uc.buf, uc.buf[uc.r:uc.w])
			uc.w -= uc.r
			uc.r = 0
		}
		n, e := sysRead(uintptr(u.fd), uc.buf[uc.w:])
		switch {
		case e == syscall.EAGAIN:
			return
		case e != 0:
			lc.upFailed(opError("read", e))
			return
		case n == 0:
			lc.upFailed(io.EOF)
			return
		}
		short := n < len(uc.buf)-uc.w && !u.hup
		uc.w += n
		uc.got += n
		if done := lc.parseAnswer(); done || short {
			return
		}
	}
}

// parseAnswer looks at what the machine sent: true when the request left
// the loop's wait (answered, failed or handed over).
func (lc *lconn) parseAnswer() bool {
	uc, resp := &lc.up.uc, &lc.resp
	for {
		err := parseResponseHead(uc.buf[uc.r:uc.w], 1<<20, resp)
		switch err {
		case nil:
		case errIncomplete:
			return false
		default:
			lc.upFailed(fmt.Errorf("%w: %v", errBadResponse, err))
			return true
		}
		if resp.status/100 == 1 && resp.status != http.StatusSwitchingProtocols {
			uc.r += resp.headLen // an interim answer: not passed on
			continue
		}
		if resp.status == http.StatusSwitchingProtocols {
			lc.upFailed(fmt.Errorf("%w: 101 to a request without an upgrade", errBadResponse))
			return true
		}
		break
	}
	isHead := str(lc.req.method) == http.MethodHead
	switch {
	case resp.replay:
		lc.handAnswer()
		return true
	case bodyless(isHead, resp.status):
	case resp.contentLength >= 0 && int64(resp.headLen)+resp.contentLength <= int64(len(uc.buf)):
		if int64(uc.w-uc.r) < int64(resp.headLen)+resp.contentLength {
			lc.headIn = true
			return false // the rest of the body is on its way
		}
	default:
		lc.handAnswer() // streamed by the goroutine
		return true
	}
	lc.answer(isHead)
	return true
}

// answer passes the machine's answer, whole in its buffer, to the client.
func (lc *lconn) answer(isHead bool) {
	l, p := lc.l, lc.l.p
	u, resp := lc.up, &lc.resp
	uc := &u.uc
	p.succeeded(lc.tg)
	lc.giveBody()
	b := lc.out.start(nil)
	b = lc.appendAnswerHead(b, isHead)
	uc.r += resp.headLen
	if !bodyless(isHead, resp.status) && resp.contentLength > 0 {
		b = append(b, uc.buf[uc.r:uc.r+int(resp.contentLength)]...)
		uc.r += int(resp.contentLength)
	}
	lc.out.b = b
	lc.endLoad()
	reusable := !resp.close && uc.r == uc.w && len(u.wq) == 0
	lc.up, lc.tg = nil, nil
	if reusable {
		l.putUp(u)
	} else {
		l.closeUp(u)
	}
	lc.st = lsIdle
	lc.state.Store(connIdle)
	lc.r += lc.raw
	lc.last = lc.req.close
	lc.shrink()
	lc.wq = b
	lc.run()
}

// upFailed: the attempt failed before its answer reached the client.
func (lc *lconn) upFailed(err error) {
	u := lc.up
	lc.up = nil
	lc.l.closeUp(u)
	if lc.headIn {
		// The answer had started: as respond, the machine answered and
		// its body was cut off, which cuts the client's connection.
		lc.l.p.succeeded(lc.tg)
		lc.tg = nil
		lc.l.p.log.Debug("response cut off", "machine", lc.counted, "err", err)
		lc.close()
		return
	}
	if !lc.fresh && u.uc.got == 0 && !errors.Is(err, errBadResponse) {
		// A pooled connection the machine closed meanwhile: once more,
		// on a new one, as attempt does.
		lc.connect(true)
		return
	}
	lc.st = lsIdle
	lc.handFailure(err)
}

// expire acts on the deadline that passed.
func (lc *lconn) expire() {
	switch lc.st {
	case lsUp:
		lc.handWait() // a slow machine: the goroutine waits, watching the client
	case lsIdle:
		lc.close() // idle, a head too slow, or a client that does not read
	}
}

// close ends the connection; a request in flight is abandoned as
// forward abandons one whose client left.
func (lc *lconn) close() {
	if lc.st == lsClosed {
		return
	}
	l := lc.l
	if lc.tg != nil {
		l.p.release(lc.tg, lc.probe)
		lc.tg = nil
	}
	lc.endLoad()
	lc.giveBody()
	if lc.up != nil {
		l.closeUp(lc.up)
		lc.up = nil
	}
	lc.st = lsClosed
	lc.state.Store(connClosed)
	delete(l.conns, lc)
	if lc.fd >= 0 {
		delete(l.socks, int32(lc.fd))
		syscall.Close(lc.fd)
		lc.fd = -1
	}
	lc.wq = nil
	lc.release()
	l.nlive.Add(-1)
}

// toGoroutine moves the connection to a goroutine of its own, which runs
// first (nil: serve reads the request at lc.r as if it had read it);
// false when it could not (out of descriptors): the connection is closed,
// and what the request held that first would have ended is the caller's.
func (lc *lconn) toGoroutine(first func() action) bool {
	l, e := lc.l, lc.e
	c, err := l.toConn(lc.fd)
	lc.fd = -1 // closed by toConn, either way
	if err != nil {
		l.p.log.Warn("edge event loop: a connection could not move to a goroutine", "err", err)
		lc.close()
		return false
	}
	delete(l.conns, lc)
	lc.st = lsClosed // the loop is done with it
	fc := &lc.fastConn
	fc.c, fc.dl, fc.resume = c, deadlines{}, first
	if first != nil {
		fc.state.Store(connActive)
	} else {
		fc.state.Store(connIdle)
	}
	e.mu.Lock()
	e.conns[fc] = struct{}{}
	e.wg.Add(1)
	e.mu.Unlock()
	l.nlive.Add(-1)
	l.handed.Add(1)
	go fc.serve()
	return true
}

// upToGoroutine gives the machine connection in use back to Go's poller.
func (lc *lconn) upToGoroutine() (*upConn, error) {
	u := lc.up
	lc.up = nil
	uc := &u.uc
	c, err := lc.l.toConn(u.fd)
	u.fd = -1
	if err != nil {
		return nil, err
	}
	uc.c, uc.io, uc.dl = c, newSockIO(c), deadlines{}
	uc.rc = uc.io.rc
	return uc, nil
}

// handFailure hands over an attempt that failed before its answer
// started: the goroutine records it and tries the next candidates.
func (lc *lconn) handFailure(err error) {
	fc := &lc.fastConn
	tg, probe, raw := lc.tg, lc.probe, lc.raw
	st, appName, cands, o := lc.rst, lc.appName, lc.cands[:lc.nc], &lc.o
	lc.tg = nil
	fc.endLoad()
	if !lc.toGoroutine(func() action {
		var tried []string
		act, done := fc.attemptFailed(tg, probe, err, &tried)
		if !done {
			act = fc.deliver(st, appName, cands, o, (*fc.buf)[fc.r+fc.req.headLen:fc.r+raw], tried)
		}
		fc.giveBody()
		return fc.served(act, raw)
	}) {
		lc.l.p.release(tg, probe)
	}
}

// handWait hands over a request whose machine has not answered yet: the
// goroutine waits for the answer until the response header timeout, with
// the client watched, then goes on as attempt does.
func (lc *lconn) handWait() {
	fc := &lc.fastConn
	uc, err := lc.upToGoroutine()
	if err != nil {
		lc.st = lsIdle
		lc.handFailure(err)
		return
	}
	tg, probe, raw := lc.tg, lc.probe, lc.raw
	st, appName, cands, o := lc.rst, lc.appName, lc.cands[:lc.nc], &lc.o
	deadline := lc.sentAt.Add(lc.l.p.cfg.ResponseHeaderTimeout)
	lc.tg = nil
	if !lc.toGoroutine(func() action {
		fc.setUp(uc)
		act, err := fc.awaitAnswer(uc, deadline)
		if err == nil {
			act, err = fc.answered(uc, tg, probe)
		} else {
			fc.setUp(nil)
			uc.c.Close()
		}
		fc.endLoad()
		if err != nil {
			var tried []string
			var done bool
			if act, done = fc.attemptFailed(tg, probe, err, &tried); !done {
				act = fc.deliver(st, appName, cands, o, (*fc.buf)[fc.r+fc.req.headLen:fc.r+raw], tried)
			}
		}
		fc.giveBody()
		return fc.served(act, raw)
	}) {
		uc.c.Close()
		lc.l.p.release(tg, probe)
	}
}

// handAnswer hands over an answer the loop does not pass on itself (a
// stream, a large body, a fly-replay).
func (lc *lconn) handAnswer() {
	fc := &lc.fastConn
	uc, err := lc.upToGoroutine()
	if err != nil {
		lc.st = lsIdle
		lc.handFailure(err)
		return
	}
	tg, probe, raw := lc.tg, lc.probe, lc.raw
	lc.tg = nil
	if !lc.toGoroutine(func() action {
		fc.setUp(uc)
		act, err := fc.answered(uc, tg, probe)
		fc.endLoad()
		if err != nil {
			act = actClose // a machine on this host has no far host's word to give
		}
		fc.giveBody()
		return fc.served(act, raw)
	}) {
		uc.c.Close()
		lc.l.p.release(tg, probe)
	}
}

// awaitAnswer reads the head of the machine's answer to the request the
// loop sent, until deadline, watching the client.
func (fc *fastConn) awaitAnswer(uc *upConn, deadline time.Time) (action, error) {
	stop := fc.watchClient(uc)
	defer stop()
	uc.dl.read(uc.c, deadline, 0)
	for {
		err := parseResponseHead(uc.buf[uc.r:uc.w], 1<<20, &fc.resp)
		switch err {
		case nil:
			if fc.resp.status/100 == 1 && fc.resp.status != http.StatusSwitchingProtocols {
				uc.r += fc.resp.headLen
				continue
			}
			if fc.resp.status == http.StatusSwitchingProtocols {
				return actKeep, fmt.Errorf("%w: 101 to a request without an upgrade", errBadResponse)
			}
			return actKeep, nil
		case errIncomplete:
			if err := uc.fill(); err != nil {
				return actKeep, err
			}
		default:
			return actKeep, fmt.Errorf("%w: %v", errBadResponse, err)
		}
	}
}
