//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// rawConnOf: elsewhere than Linux the fast path reads and writes through
// the plain connection (rawio_linux.go).
func rawConnOf(net.Conn) syscall.RawConn { return nil }

func (uc *upConn) sendThenRead(b []byte) error {
	if _, err := uc.c.Write(b); err != nil {
		return err
	}
	return uc.fill()
}

type sendState struct{}

func (s *sockIO) rawRead(b []byte) (int, error)  { return s.c.Read(b) }
func (s *sockIO) rawWrite(b []byte) (int, error) { return s.c.Write(b) }
