package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The fast path's connections to machines and to other hosts' backhaul
// listeners: kept alive and pooled per address, each with its own read
// buffer.

// upKey names a pool of upstream connections: a machine's address and
// port, or a host's backhaul address (port 0).
type upKey struct {
	addr string
	port int
}

// upConn is a keep-alive connection to a machine or a far proxy, with its
// read buffer.
type upConn struct {
	c    net.Conn
	rc   syscall.RawConn // c's socket (nil: not one of the net package's; rawio_linux.go)
	raw  sendState
	io   sockIO // c, for the reads of answers
	key  upKey
	buf  []byte
	r, w int
	got  int // bytes read of the current answer
	idle time.Time
	dl   deadlines // as set; they stand between requests
	// client is the client whose answer's body is being read, watched
	// once the body pauses (stop ends the watch).
	client *fastConn
	stop   func()
}

// watchBody has the client watched while the body pauses, until
// endWatch.
func (uc *upConn) watchBody(fc *fastConn) {
	uc.client = fc
}

func (uc *upConn) endWatch() {
	if uc.stop != nil {
		uc.stop()
	}
	uc.client, uc.stop = nil, nil
}

const upBufSize = 16 << 10

// fill reads more of the answer.
func (uc *upConn) fill() error {
	if uc.r == uc.w {
		uc.r, uc.w = 0, 0
	} else if uc.w == len(uc.buf) {
		if uc.r > 0 {
			copy(uc.buf, uc.buf[uc.r:uc.w])
			uc.w -= uc.r
			uc.r = 0
		} else {
			if len(uc.buf) >= 1<<20 {
				return fmt.Errorf("%w: a line or head over 1 MiB", errBadResponse)
			}
			nb := make([]byte, 2*len(uc.buf)) // a large head: rare
			copy(nb, uc.buf[:uc.w])
			uc.buf = nb
		}
	}
	if uc.client != nil && uc.stop == nil {
		uc.dl.read(uc.c, time.Now().Add(clientCheckAfter), clientCheckAfter/slackDiv)
	}
	n, err := uc.io.Read(uc.buf[uc.w:])
	if n == 0 && uc.client != nil && uc.stop == nil && isTimeout(err) {
		// A body that pauses (a stream, a long poll): the client is
		// watched until the answer ends.
		uc.stop = uc.client.watchClient(uc)
		uc.dl.read(uc.c, time.Time{}, 0)
		n, err = uc.io.Read(uc.buf[uc.w:])
	}
	uc.w += n
	uc.got += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// line returns the next CRLF-terminated line, without it.
func (uc *upConn) line() ([]byte, error) {
	for {
		if i := strings.Index(str(uc.buf[uc.r:uc.w]), "\r\n"); i >= 0 {
			l := uc.buf[uc.r : uc.r+i]
			uc.r += i + 2
			return l, nil
		}
		if uc.w-uc.r > maxChunkLine {
			return nil, errBadResponse
		}
		if err := uc.fill(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

// upPool keeps idle upstream connections, most recently used last.
type upPool struct {
	mu     sync.Mutex
	idle   map[upKey][]*upConn
	closed bool
}

// Idle upstream connections: at most maxIdlePerKey per machine or host,
// each kept upIdleTimeout.
const (
	maxIdlePerKey = 256
	upIdleTimeout = 30 * time.Second
)

func newUpPool() *upPool { return &upPool{idle: map[upKey][]*upConn{}} }

func (p *upPool) get(k upKey) *upConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	cs := p.idle[k]
	if len(cs) == 0 {
		return nil
	}
	uc := cs[len(cs)-1]
	cs[len(cs)-1] = nil
	p.idle[k] = cs[:len(cs)-1]
	return uc
}

func (p *upPool) put(uc *upConn) {
	uc.r, uc.w = 0, 0
	uc.idle = time.Now()
	p.mu.Lock()
	if p.closed || len(p.idle[uc.key]) >= maxIdlePerKey {
		p.mu.Unlock()
		uc.c.Close()
		return
	}
	p.idle[uc.key] = append(p.idle[uc.key], uc)
	p.mu.Unlock()
}

// dial opens a new connection; a failure is a connectError (nothing sent).
func (p *upPool) dial(dial DialFunc, k upKey, budget time.Duration) (*upConn, error) {
	addr := k.addr
	if k.port != 0 {
		addr = net.JoinHostPort(k.addr, strconv.Itoa(k.port))
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	c, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, &connectError{addr: addr, err: err}
	}
	uc := &upConn{c: c, io: newSockIO(c), key: k, buf: make([]byte, upBufSize)}
	uc.rc = uc.io.rc
	return uc, nil
}

// reap closes connections idle too long, until done.
func (p *upPool) reap(done <-chan struct{}) {
	t := time.NewTicker(upIdleTimeout / 4)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		cutoff := time.Now().Add(-upIdleTimeout)
		p.mu.Lock()
		for k, cs := range p.idle {
			keep := cs[:0]
			for _, uc := range cs {
				if uc.idle.Before(cutoff) {
					uc.c.Close()
				} else {
					keep = append(keep, uc)
				}
			}
			clear(cs[len(keep):])
			if len(keep) == 0 {
				delete(p.idle, k)
			} else {
				p.idle[k] = keep
			}
		}
		p.mu.Unlock()
	}
}

func (p *upPool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for k, cs := range p.idle {
		for _, uc := range cs {
			uc.c.Close()
		}
		delete(p.idle, k)
	}
}
