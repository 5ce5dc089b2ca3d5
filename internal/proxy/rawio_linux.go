package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Reads and writes of the fast path's sockets that skip what Go's
// netpoller does before it waits. A goroutine's Read first tries the socket
// and only then waits on epoll, so every read that comes before its bytes
// is a system call in vain (EAGAIN): one per request on the machine's side,
// where the answer never comes before the request is written. sendThenRead
// writes the request and then waits for the answer without that read, as
// an event loop does: the poller's readiness is reset before the write, so
// an answer arriving any time after it wakes the wait. The calls themselves
// go to the kernel directly (RawSyscall): the sockets are non-blocking, so
// none of them can block the thread, and the scheduler need not hand the
// P away around them.

// rawConnOf is c's raw connection, or nil when c is not a socket of the
// net package (a simulated network's, a TLS connection): then the plain
// Read and Write are used.
func rawConnOf(c net.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

func sysRead(fd uintptr, b []byte) (int, syscall.Errno) {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(sliceAddr(b)), uintptr(len(b)))
		if e != syscall.EINTR {
			return int(n), e
		}
	}
}

func sysWrite(fd uintptr, b []byte) (int, syscall.Errno) {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(sliceAddr(b)), uintptr(len(b)))
		if e != syscall.EINTR {
			return int(n), e
		}
	}
}

// sendState is the state of one sendThenRead, kept in the upConn so its
// callback (made once per connection) allocates nothing per request.
type sendState struct {
	out        []byte // the request
	sent, n    int
	werr, rerr syscall.Errno
	eof        bool
	fn         func(fd uintptr) bool // uc.onSocket
}

// sendThenRead writes b to the machine, then reads the start of its answer
// into uc.buf, waiting (under the read deadline set) without a read in
// vain first. What it cannot write at once is written with the plain
// Write (under the write deadline), and the answer then read by fill.
func (uc *upConn) sendThenRead(b []byte) error {
	x := &uc.raw
	if x.fn == nil {
		x.fn = uc.onSocket
	}
	x.out, x.sent, x.n, x.werr, x.rerr, x.eof = b, 0, 0, 0, 0, false
	err := uc.rc.Read(x.fn)
	x.out = nil
	switch {
	case x.werr != 0:
		return &net.OpError{Op: "write", Net: "tcp", Addr: uc.c.RemoteAddr(), Err: os.NewSyscallError("write", x.werr)}
	case x.sent < len(b):
		// Not all written at once, or not at all (a deadline that passed
		// before, a closed connection): as the plain connection does it.
		if _, err := uc.c.Write(b[x.sent:]); err != nil {
			return err
		}
		return uc.fill()
	case err != nil:
		return err
	case x.rerr != 0:
		return &net.OpError{Op: "read", Net: "tcp", Addr: uc.c.RemoteAddr(), Err: os.NewSyscallError("read", x.rerr)}
	case x.eof:
		return io.EOF
	}
	uc.w += x.n
	uc.got += x.n
	return nil
}

// onSocket is sendThenRead's step, called by the poller: first the write,
// then (once the socket is readable) the read; true ends the step.
func (uc *upConn) onSocket(fd uintptr) bool {
	x := &uc.raw
	if x.sent < len(x.out) {
		k, e := sysWrite(fd, x.out[x.sent:])
		if e != 0 {
			if e != syscall.EAGAIN {
				x.werr = e
			}
			return true
		}
		x.sent += k
		// All written: wait, as the answer cannot have come yet; else the
		// rest goes through Write.
		return x.sent < len(x.out)
	}
	k, e := sysRead(fd, uc.buf[uc.w:])
	switch {
	case e == syscall.EAGAIN:
		return false
	case e != 0:
		x.rerr = e
	case k == 0:
		x.eof = true
	}
	x.n = k
	return true
}

// rawRead is a Read of the socket: tried at once, then waited for on the
// poller (under the read deadline) while it would block.
func (s *sockIO) rawRead(b []byte) (int, error) {
	if s.rd == nil {
		s.rd = s.readStep
	}
	s.b, s.n, s.errno, s.eof = b, 0, 0, false
	err := s.rc.Read(s.rd)
	s.b = nil
	switch {
	case err != nil:
		return 0, err
	case s.errno != 0:
		return 0, &net.OpError{Op: "read", Net: "tcp", Addr: s.c.RemoteAddr(), Err: os.NewSyscallError("read", s.errno)}
	case s.eof:
		return 0, io.EOF
	}
	return s.n, nil
}

func (s *sockIO) readStep(fd uintptr) bool {
	if len(s.b) == 0 {
		return true
	}
	n, e := sysRead(fd, s.b)
	switch {
	case e == syscall.EAGAIN:
		return false
	case e != 0:
		s.errno = e
	case n == 0:
		s.eof = true
	default:
		s.n = n
	}
	return true
}

// rawWrite is a Write of the socket: all of b, waiting on the poller
// (under the write deadline) while the socket's buffer is full.
func (s *sockIO) rawWrite(b []byte) (int, error) {
	if s.wr == nil {
		s.wr = s.writeStep
	}
	s.b, s.n, s.errno = b, 0, 0
	err := s.rc.Write(s.wr)
	s.b = nil
	switch {
	case s.errno != 0:
		return s.n, &net.OpError{Op: "write", Net: "tcp", Addr: s.c.RemoteAddr(), Err: os.NewSyscallError("write", s.errno)}
	case err != nil:
		return s.n, err
	}
	return s.n, nil
}

func (s *sockIO) writeStep(fd uintptr) bool {
	for s.n < len(s.b) {
		n, e := sysWrite(fd, s.b[s.n:])
		switch {
		case e == syscall.EAGAIN:
			return false
		case e != 0:
			s.errno = e
			return true
		}
		s.n += n
	}
	return true
}

func sliceAddr(b []byte) unsafe.Pointer { return unsafe.Pointer(unsafe.SliceData(b)) }
