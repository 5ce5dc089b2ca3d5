//go:build !linux

package proxy

import (
	"errors"
	"net"
)

// evloops: the edge's event loops are Linux's (evloop_linux.go); elsewhere
// every connection has a goroutine.
type evloops struct{}

func newEvloops(*edgeServer, int) (*evloops, error) {
	return nil, errors.New("the edge's event loops need Linux")
}

func (*evloops) start()                        {}
func (*evloops) adopt(net.Conn) bool           { return false }
func (*evloops) live() int                     { return 0 }
func (*evloops) drain()                        {}
func (*evloops) cut()                          {}
func (*evloops) stats() (stalls, handed int64) { return 0, 0 }
