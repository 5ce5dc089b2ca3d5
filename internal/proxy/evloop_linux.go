//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/flamehq/flame/internal/proxy/route"
)

// The edge's event loops (Config.EdgeEventLoop). A goroutine per
// connection costs, per request, a read in vain before the client's
// goroutine parks, and a park and a wake-up through Go's netpoller on
// each side (client and machine). An event loop instead owns many plain
// TCP sockets, client and machine alike, in an epoll set of its own
// (edge-triggered: EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET), reads a socket
// only when readiness says it has bytes, and serves every socket that is
// ready with one epoll_wait.
//
// One loop per GOMAXPROCS, each one goroutine. Its epoll descriptor is
// itself on Go's netpoller (an epoll set is readable when it has events),
// so a loop with nothing to do parks like any goroutine, the thread is
// never blocked in a system call, and the loop's timer is a read deadline
// on that descriptor. The sockets are taken out of Go's poller (their
// descriptor duplicated, the net.Conn closed) when a loop adopts them.
//
// A loop serves the common case only: a request whose head and body are
// in its buffer (no chunked body, no upgrade, no Expect, HTTP/1.1), for a
// machine on this host, answered with a head and a body that fit the
// machine connection's buffer. Everything else — and every case where
// the loop would have to wait on a peer in a way it does not model —
// moves the connection (and the machine connection in use, if any) to a
// goroutine of its own, which serves it from exactly where the loop left
// it with the fast path's code (fastconn.go, fast.go), and keeps it:
//
//   - a request the loop does not take (see begin) is served from its
//     first byte by fastConn.serve, which decides as it always does (the
//     net/http handover, 400/431 answers, autostart, redirects, …);
//   - a machine that has not answered within clientCheckAfter: the wait
//     goes on in the goroutine (awaitAnswer), with the client watched;
//   - an answer that is streamed (chunked, no length, larger than the
//     buffer) or a fly-replay: the goroutine passes it on (answered);
//   - an attempt that failed after the request was sent: the goroutine
//     records it and tries the next candidates (attemptFailed, deliver);
//   - a machine connection whose dial is not a plain TCP socket.
//
// A loop never blocks: a dial runs in a goroutine of its own and reports
// back through the loop's inbox; a write the peer cannot take yet is kept
// (at most one answer per client, which fits the machine buffer, and one
// request per machine connection) and finished when the socket says it is
// writable; a client that does not read its answers holds only that
// buffer and is cut after IdleTimeout. No socket read or write waits, so
// the time a loop spends on one client between two epoll_waits is bounded
// by a few system calls and the parse of one request and answer per ready
// socket, whatever the other clients do.

// Event flags (EPOLLET is negative in package syscall).
const (
	evIn    = syscall.EPOLLIN
	evOut   = syscall.EPOLLOUT
	evErr   = syscall.EPOLLERR
	evHup   = syscall.EPOLLHUP
	evRdHup = syscall.EPOLLRDHUP
	evET    = 1 << 31
	evRead  = evIn | evRdHup | evHup | evErr
)

// loopTick is how often a loop with connections looks at their
// deadlines: each fires at most this late.
const loopTick = 25 * time.Millisecond

// evloops are the edge's loops; connections are dealt to them in turn.
type evloops struct {
	e     *edgeServer
	loops []*evloop
	rr    atomic.Uint32
	// notRaw: the machines' dialer gave a connection that is not a plain
	// socket (a simulated network's); the loops then adopt nothing more.
	notRaw atomic.Bool
}

func newEvloops(e *edgeServer, n int) (*evloops, error) {
	ls := &evloops{e: e}
	for range max(n, 1) {
		l, err := newEvloop(e)
		if l != nil {
			l.ls = ls
		}
		if err != nil {
			for _, l := range ls.loops {
				l.closeFDs()
			}
			return nil, err
		}
		ls.loops = append(ls.loops, l)
	}
	return ls, nil
}

func (ls *evloops) start() {
	if ls == nil {
		return
	}
	for _, l := range ls.loops {
		ls.e.wg.Add(1)
		go l.run()
	}
}

// adopt gives c to a loop, if it is a plain TCP connection; false: it
// stays the caller's.
func (ls *evloops) adopt(c net.Conn) bool {
	if ls == nil {
		return false
	}
	tc, ok := c.(*net.TCPConn)
	if !ok || ls.notRaw.Load() {
		return false
	}
	return ls.loops[ls.rr.Add(1)%uint32(len(ls.loops))].adopt(tc)
}

// live is the number of client connections the loops serve.
func (ls *evloops) live() int {
	if ls == nil {
		return 0
	}
	n := 0
	for _, l := range ls.loops {
		n += int(l.nlive.Load())
	}
	return n
}

// drain closes idle connections and each busy one once its answer is
// out; the loops end when they have none left.
func (ls *evloops) drain() {
	if ls == nil {
		return
	}
	for _, l := range ls.loops {
		l.draining.Store(true)
		l.wake()
	}
}

// cut closes every connection, answered or not; the loops end.
func (ls *evloops) cut() {
	if ls == nil {
		return
	}
	for _, l := range ls.loops {
		l.cutting.Store(true)
		l.wake()
	}
}

// stats sums the loops' counters (tests).
func (ls *evloops) stats() (stalls, handed int64) {
	if ls == nil {
		return 0, 0
	}
	for _, l := range ls.loops {
		stalls += l.stalls.Load()
		handed += l.handed.Load()
	}
	return stalls, handed
}

// evloop is one loop: an epoll set and the sockets in it.
type evloop struct {
	ls   *evloops
	e    *edgeServer
	p    *Proxy
	epfd int
	efd  int      // an eventfd in the set: wakes the loop for its inbox
	file *os.File // epfd on Go's poller
	rc   syscall.RawConn
	step func(uintptr) bool
	ev   [256]syscall.EpollEvent
	full bool // the last epoll_wait filled ev
	werr syscall.Errno

	socks map[int32]lsock
	conns map[*lconn]struct{}
	pool  map[upKey][]*lup
	nup   int // machine connections in pool
	now   time.Time
	next  time.Time // the next look at the deadlines (zero: none set)

	mu     sync.Mutex
	inbox  []loopMsg
	exited bool
	woke   atomic.Bool

	draining, cutting atomic.Bool
	nlive             atomic.Int64 // client connections, from adopt to close or handover

	stalls atomic.Int64 // writes to a client that would have blocked
	handed atomic.Int64 // client connections moved to a goroutine
}

// lsock is what a descriptor in the set is: a client or a machine
// connection.
type lsock struct {
	c *lconn
	u *lup
}

// loopMsg is what other goroutines hand a loop: a connection to adopt,
// or a dial's outcome for a client.
type loopMsg struct {
	adopt  *lconn
	client *lconn
	uc     *upConn
	err    error
	fresh  bool
}

func newEvloop(e *edgeServer) (*evloop, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	efd, _, errno := syscall.RawSyscall(syscall.SYS_EVENTFD2, 0, syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if errno != 0 {
		syscall.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", errno)
	}
	l := &evloop{e: e, p: e.p, epfd: epfd, efd: int(efd),
		socks: map[int32]lsock{}, conns: map[*lconn]struct{}{}, pool: map[upKey][]*lup{}}
	if err := l.add(l.efd); err != nil {
		l.closeFDs()
		return nil, err
	}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	// A non-blocking descriptor becomes a pollable file: the loop waits
	// on it through Go's netpoller, with deadlines.
	l.file = os.NewFile(uintptr(epfd), "edge-epoll")
	if err := l.file.SetReadDeadline(time.Time{}); err != nil {
		l.file.Close()
		syscall.Close(l.efd)
		return nil, fmt.Errorf("epoll descriptor not pollable: %w", err)
	}
	if l.rc, err = l.file.SyscallConn(); err != nil {
		l.file.Close()
		syscall.Close(l.efd)
		return nil, err
	}
	l.step = l.onReady
	return l, nil
}

func (l *evloop) closeFDs() {
	if l.file != nil {
		l.file.Close()
	} else {
		syscall.Close(l.epfd)
	}
	syscall.Close(l.efd)
}

func (l *evloop) add(fd int) error {
	ev := syscall.EpollEvent{Events: evIn | evOut | evRdHup | evET, Fd: int32(fd)}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("epoll add: %w", err)
	}
	return nil
}

// wake makes the loop look at its inbox and flags.
func (l *evloop) wake() {
	if l.woke.CompareAndSwap(false, true) {
		one := [8]byte{1}
		syscall.RawSyscall(syscall.SYS_WRITE, uintptr(l.efd), uintptr(unsafe.Pointer(&one[0])), 8)
	}
}

// post hands m to the loop; false when the loop has ended.
func (l *evloop) post(m loopMsg) bool {
	l.mu.Lock()
	if l.exited {
		l.mu.Unlock()
		return false
	}
	l.inbox = append(l.inbox, m)
	l.mu.Unlock()
	l.wake()
	return true
}

// adopt takes c's socket out of Go's poller for the loop.
func (l *evloop) adopt(tc *net.TCPConn) bool {
	ip := tc.RemoteAddr().String()
	if h, _, err := net.SplitHostPort(ip); err == nil {
		ip = h
	}
	fd, err := stealFD(tc)
	if err != nil {
		return false
	}
	lc := &lconn{l: l, fd: fd}
	lc.e, lc.clientIP = l.e, ip
	l.nlive.Add(1)
	if !l.post(loopMsg{adopt: lc}) {
		syscall.Close(fd)
		l.nlive.Add(-1)
	}
	return true
}

// stealFD duplicates c's socket and closes c (which takes it off Go's
// poller): the duplicate is the caller's, still non-blocking.
func stealFD(c net.Conn) (int, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return -1, errors.New("not a TCP connection")
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		r, _, e := syscall.RawSyscall(syscall.SYS_FCNTL, fd, syscall.F_DUPFD_CLOEXEC, 0)
		nfd, errno = int(r), e
	}); err != nil {
		return -1, err
	}
	if errno != 0 {
		return -1, errno
	}
	c.Close()
	return nfd, nil
}

// toConn takes fd out of the loop's set and gives it back to Go's poller
// as a net.Conn (fd itself is closed).
func (l *evloop) toConn(fd int) (net.Conn, error) {
	delete(l.socks, int32(fd))
	syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, fd, nil)
	f := os.NewFile(uintptr(fd), "")
	c, err := net.FileConn(f)
	f.Close()
	return c, err
}

// run is the loop's goroutine.
func (l *evloop) run() {
	defer l.e.wg.Done()
	defer l.shut()
	for !l.done() {
		err := l.rc.Read(l.step)
		if l.werr != 0 {
			l.p.log.Error("edge event loop stopped", "err", os.NewSyscallError("epoll_wait", l.werr))
			return
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			l.p.log.Error("edge event loop stopped", "err", err)
			return
		}
		l.tick()
		if l.full {
			runtime.Gosched() // the goroutines the loop handed work to run too
		}
	}
}

// onReady is called by the poller when the set may have events: it
// serves one epoll_wait's worth and asks to park (false) unless there
// may be more or the loop must look at something else.
func (l *evloop) onReady(uintptr) bool {
	n, errno := epollWait(l.epfd, l.ev[:])
	if errno != 0 && errno != syscall.EINTR {
		l.werr = errno
		return true
	}
	if n > 0 {
		l.now = time.Now()
	}
	for i := range n {
		l.event(l.ev[i].Fd, l.ev[i].Events)
	}
	l.full = n == len(l.ev)
	return l.full || l.done() || !l.next.IsZero() && !l.now.Before(l.next)
}

func epollWait(epfd int, ev []syscall.EpollEvent) (int, syscall.Errno) {
	r, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&ev[0])), uintptr(len(ev)), 0, 0, 0)
	return int(r), e
}

func (l *evloop) done() bool {
	return l.cutting.Load() || l.draining.Load() && len(l.conns) == 0
}

func (l *evloop) event(fd int32, evs uint32) {
	if fd == int32(l.efd) {
		l.inboxReady()
		return
	}
	s, ok := l.socks[fd]
	switch {
	case !ok:
	case s.c != nil:
		s.c.onEvent(evs)
	default:
		s.u.onEvent(evs)
	}
}

// inboxReady takes the inbox and acts on the flags.
func (l *evloop) inboxReady() {
	var b [8]byte
	syscall.RawSyscall(syscall.SYS_READ, uintptr(l.efd), uintptr(unsafe.Pointer(&b[0])), 8)
	l.woke.Store(false)
	l.mu.Lock()
	msgs := l.inbox
	l.inbox = nil
	l.mu.Unlock()
	for _, m := range msgs {
		if m.adopt != nil {
			l.welcome(m.adopt)
		} else {
			m.client.dialed(m.uc, m.err, m.fresh)
		}
	}
	if l.cutting.Load() {
		for lc := range l.conns {
			lc.close()
		}
		return
	}
	if l.draining.Load() {
		for lc := range l.conns {
			if lc.st == lsIdle && len(lc.wq) == 0 {
				lc.close()
			}
		}
	}
}

// welcome puts an adopted client connection in the set.
func (l *evloop) welcome(lc *lconn) {
	l.socks[int32(lc.fd)] = lsock{c: lc}
	l.conns[lc] = struct{}{}
	lc.buf = smallBufs.Get().(*[]byte)
	lc.state.Store(connIdle)
	if err := l.add(lc.fd); err != nil || l.draining.Load() {
		lc.close()
		return
	}
	l.arm()
	lc.due = l.now.Add(l.p.cfg.IdleTimeout)
	lc.more = true // bytes may be there already
	lc.run()
}

// arm sets the loop's timer if none is set.
func (l *evloop) arm() {
	if l.next.IsZero() {
		if l.now.IsZero() {
			l.now = time.Now()
		}
		l.next = l.now.Add(loopTick)
		l.file.SetReadDeadline(l.next)
	}
}

// tick looks at the deadlines once the timer is due, and sets the next.
func (l *evloop) tick() {
	if l.next.IsZero() {
		return
	}
	now := time.Now()
	if now.Before(l.next) {
		return
	}
	l.now = now
	for lc := range l.conns {
		if !lc.due.IsZero() && !now.Before(lc.due) {
			lc.expire()
		}
	}
	cutoff := now.Add(-upIdleTimeout)
	for k, us := range l.pool {
		keep := us[:0]
		for _, u := range us {
			if u.uc.idle.Before(cutoff) {
				l.closeUp(u)
				l.nup--
			} else {
				keep = append(keep, u)
			}
		}
		clear(us[len(keep):])
		if len(keep) == 0 {
			delete(l.pool, k)
		} else {
			l.pool[k] = keep
		}
	}
	l.next = time.Time{}
	if len(l.conns) > 0 || l.nup > 0 {
		l.arm()
	} else {
		l.file.SetReadDeadline(time.Time{})
	}
}

// shut ends the loop: every socket it holds is closed, and what its inbox
// still holds.
func (l *evloop) shut() {
	l.mu.Lock()
	l.exited = true
	msgs := l.inbox
	l.inbox = nil
	l.mu.Unlock()
	for _, m := range msgs {
		if m.adopt != nil {
			syscall.Close(m.adopt.fd)
			l.nlive.Add(-1)
		} else if m.uc != nil {
			m.uc.c.Close()
		}
	}
	for lc := range l.conns {
		lc.close()
	}
	for _, us := range l.pool {
		for _, u := range us {
			l.closeUp(u)
		}
	}
	clear(l.pool)
	l.nup = 0
	l.closeFDs()
}

// ---- machine connections ------------------------------------------------

// lup is a connection to a machine held by a loop.
type lup struct {
	uc    upConn // its buffer, key and idle time; uc.c is nil on the loop
	fd    int
	l     *evloop
	owner *lconn // the client whose request it carries (nil: in the pool)
	hup   bool   // the machine shut its side: read to the end
	wq    []byte // the request's bytes the machine has not taken yet
}

func (l *evloop) getUp(k upKey) *lup {
	us := l.pool[k]
	if len(us) == 0 {
		return nil
	}
	u := us[len(us)-1]
	us[len(us)-1] = nil
	l.pool[k] = us[:len(us)-1]
	l.nup--
	return u
}

func (l *evloop) putUp(u *lup) {
	u.owner, u.wq = nil, nil
	u.uc.r, u.uc.w = 0, 0
	u.uc.idle = l.now
	if l.draining.Load() || len(l.pool[u.uc.key]) >= maxIdlePerKey {
		l.closeUp(u)
		return
	}
	l.pool[u.uc.key] = append(l.pool[u.uc.key], u)
	l.nup++
}

func (l *evloop) closeUp(u *lup) {
	if u.fd >= 0 {
		delete(l.socks, int32(u.fd))
		syscall.Close(u.fd)
		u.fd = -1
	}
}

// dropIdle closes a pooled connection the machine closed (or wrote to
// unasked).
func (l *evloop) dropIdle(u *lup) {
	us := l.pool[u.uc.key]
	for i, x := range us {
		if x == u {
			copy(us[i:], us[i+1:])
			us[len(us)-1] = nil
			l.pool[u.uc.key] = us[:len(us)-1]
			l.nup--
			break
		}
	}
	l.closeUp(u)
}

func (u *lup) onEvent(evs uint32) {
	lc := u.owner
	if lc == nil {
		if evs&evRead != 0 {
			// An idle connection has nothing to say: a read that finds
			// anything but nothing (EOF, bytes, an error) ends it.
			var b [1]byte
			if _, e := sysRead(uintptr(u.fd), b[:]); e != syscall.EAGAIN {
				u.l.dropIdle(u)
			}
		}
		return
	}
	if len(u.wq) > 0 && evs&(evOut|evErr|evHup) != 0 {
		k, e := sysWrite(uintptr(u.fd), u.wq)
		switch {
		case e == syscall.EAGAIN:
		case e != 0:
			lc.upFailed(opError("write", e))
			return
		default:
			u.wq = u.wq[k:]
		}
	}
	if evs&(evRdHup|evHup|evErr) != 0 {
		u.hup = true
	}
	if evs&evRead != 0 {
		lc.upReadable()
	}
}

// ---- client connections -------------------------------------------------

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
	delete(l.socks, int32(lc.fd))
	delete(l.conns, lc)
	syscall.Close(lc.fd)
	lc.fd = -1
	lc.wq = nil
	lc.release()
	l.nlive.Add(-1)
}

// toGoroutine moves the connection to a goroutine of its own, which runs
// first (nil: serve reads the request at lc.r as if it had read it).
func (lc *lconn) toGoroutine(first func() action) {
	l, e := lc.l, lc.e
	c, err := l.toConn(lc.fd)
	delete(l.conns, lc)
	if err != nil {
		l.p.log.Debug("edge event loop: handover failed", "err", err)
		syscall.Close(lc.fd)
		lc.st = lsClosed
		lc.state.Store(connClosed)
		if first != nil {
			first() // ends what the request holds (its writes fail)
		}
		lc.release()
		l.nlive.Add(-1)
		return
	}
	lc.fd = -1
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
	lc.toGoroutine(func() action {
		var tried []string
		act, done := fc.attemptFailed(tg, probe, err, &tried)
		if !done {
			act = fc.deliver(st, appName, cands, o, (*fc.buf)[fc.r+fc.req.headLen:fc.r+raw], tried)
		}
		fc.giveBody()
		return fc.served(act, raw)
	})
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
	lc.toGoroutine(func() action {
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
	})
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
	lc.toGoroutine(func() action {
		fc.setUp(uc)
		act, err := fc.answered(uc, tg, probe)
		fc.endLoad()
		if err != nil {
			act = actClose // a machine on this host has no far host's word to give
		}
		fc.giveBody()
		return fc.served(act, raw)
	})
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
