package proxy

import (
	"net"
	"syscall"
)

// sockIO is how the fast path reads and writes a connection: through the
// socket directly where it is one of the net package's (rawio_linux.go:
// raw system calls, waiting on the same poller), else through the
// connection. Its state lives in the connection's struct, so a read or a
// write allocates nothing.
type sockIO struct {
	c  net.Conn
	rc syscall.RawConn // nil: through c

	b      []byte // the read's or write's buffer, during it
	n      int    // bytes read or written
	errno  syscall.Errno
	eof    bool
	rd, wr func(fd uintptr) bool // the read and write steps, made once
}

func newSockIO(c net.Conn) sockIO {
	return sockIO{c: c, rc: rawConnOf(c)}
}

func (s *sockIO) Read(b []byte) (int, error) {
	if s.rc == nil {
		return s.c.Read(b)
	}
	return s.rawRead(b)
}

func (s *sockIO) Write(b []byte) (int, error) {
	if s.rc == nil {
		return s.c.Write(b)
	}
	return s.rawWrite(b)
}
