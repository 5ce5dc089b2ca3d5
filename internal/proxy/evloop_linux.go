//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// The edge's event loops (on by default; Config.DisableEventLoop). A
// goroutine per connection costs, per request, a read in vain before the
// client's goroutine parks, and a park and a wake-up through Go's netpoller on
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
