package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
)

const (
	// tcpIdle is how long a TCP connection may sit without a query.
	tcpIdle = 10 * time.Second
	// tcpWrite bounds writing one answer over TCP.
	tcpWrite = 5 * time.Second
	// maxTCPConns bounds the TCP connections served at once; more are
	// closed on accept.
	maxTCPConns = 256
)

// Config is what a Server needs. The sockets are inputs: the caller opens
// them (on fdaa::3 or wherever the host answers) and the server owns them
// from New on, closing them on Close.
type Config struct {
	// Source is the host's view of the cluster. Required.
	Source Source
	// PacketConn serves queries over UDP; Listener over TCP. At least one.
	PacketConn net.PacketConn
	Listener   net.Listener
	// Logger defaults to discarding.
	Logger *slog.Logger
	// TTL of every answer; DefaultTTL when zero.
	TTL time.Duration
	// Machines, when set, makes this the server the machines of a network
	// ask: each query answered for its source's org (see machines.go).
	Machines *Machines
}

// Validate reports a config the server cannot run with.
func (c Config) Validate() error {
	switch {
	case c.Source == nil:
		return errors.New("dns: config: no source")
	case c.PacketConn == nil && c.Listener == nil:
		return errors.New("dns: config: neither a packet conn nor a listener")
	case c.TTL < 0:
		return fmt.Errorf("dns: config: negative ttl %s", c.TTL)
	}
	return nil
}

// Server answers .internal queries over UDP and TCP.
type Server struct {
	cfg Config
	log *slog.Logger
	ttl time.Duration

	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	state  int // stateNew, stateStarted, stateClosed
	cancel context.CancelFunc
}

const (
	stateNew = iota
	stateStarted
	stateClosed
)

// New builds a server from cfg; it serves nothing until Start.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ttl := cfg.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	return &Server{
		cfg:   cfg,
		log:   log.With("component", "dns"),
		ttl:   ttl,
		conns: map[net.Conn]struct{}{},
	}, nil
}

// Start serves queries until ctx ends or Close is called.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.state {
	case stateStarted:
		return errors.New("dns: already started")
	case stateClosed:
		return errors.New("dns: closed")
	}
	s.state = stateStarted
	ctx, s.cancel = context.WithCancel(ctx)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		<-ctx.Done()
		s.shut()
	}()
	if pc := s.cfg.PacketConn; pc != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveUDP(ctx, pc)
		}()
	}
	if ln := s.cfg.Listener; ln != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveTCP(ctx, ln)
		}()
	}
	return nil
}

// Close stops serving, closes the sockets and every TCP connection, and
// waits for all the server's goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	cancel := s.cancel
	s.state = stateClosed
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	s.shut()
	s.wg.Wait()
	return nil
}

// shut closes the sockets and the open connections, which ends every loop.
func (s *Server) shut() {
	s.mu.Lock()
	s.state = stateClosed
	conns := s.conns
	s.conns = map[net.Conn]struct{}{}
	s.mu.Unlock()
	if s.cfg.PacketConn != nil {
		s.cfg.PacketConn.Close()
	}
	if s.cfg.Listener != nil {
		s.cfg.Listener.Close()
	}
	for c := range conns {
		c.Close()
	}
}

// backoff sleeps after a transient socket error; false when ctx ended.
func backoff(ctx context.Context, d *time.Duration) bool {
	if *d == 0 {
		*d = 5 * time.Millisecond
	} else {
		*d = min(*d*2, time.Second)
	}
	t := time.NewTimer(*d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (s *Server) serveUDP(ctx context.Context, pc net.PacketConn) {
	buf := make([]byte, dns.MaxMsgSize)
	var delay time.Duration
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("read udp", "err", err)
			if !backoff(ctx, &delay) {
				return
			}
			continue
		}
		delay = 0
		src := addrOf(addr)
		view, fwd, ok := s.asker(src)
		if !ok {
			continue // not a machine of the network: not answered at all
		}
		if q := forwardable(fwd, buf[:n]); q != nil {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				if out := s.forward(ctx, fwd, q, true); out != nil {
					pc.WriteTo(out, addr)
				}
			}()
			continue
		}
		out := reply(buf[:n], staticSource{view}, s.ttl, true)
		if out == nil {
			continue
		}
		if _, err := pc.WriteTo(out, addr); err != nil && ctx.Err() == nil {
			s.log.Debug("write udp", "to", addr, "err", err)
		}
	}
}

// addrOf is the IP address of a socket address.
func addrOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap.Addr().Unmap()
}

// staticSource hands out one view.
type staticSource struct{ v View }

func (s staticSource) View() View { return s.v }

// forwardable returns b as a query when f is there to forward it: a query
// for a name outside .internal; nil otherwise (reply answers it).
func forwardable(f *Forwarder, b []byte) *dns.Msg {
	if f == nil {
		return nil
	}
	q := new(dns.Msg)
	if q.Unpack(b) != nil || q.Response || q.Opcode != dns.OpcodeQuery || internalName(q) {
		return nil
	}
	return q
}

// forward answers q from the upstream resolvers, truncated for UDP to
// what the client takes; SERVFAIL when they fail or are all busy.
func (s *Server) forward(ctx context.Context, f *Forwarder, q *dns.Msg, udp bool) []byte {
	r, err := f.exchange(ctx, q)
	if err != nil {
		s.log.Debug("forward", "name", q.Question[0].Name, "err", err)
		r = new(dns.Msg)
		r.SetRcode(q, dns.RcodeServerFailure)
	}
	r.Id = q.Id
	out, _ := packFor(q, r, udp)
	return out
}

func (s *Server) serveTCP(ctx context.Context, ln net.Listener) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("accept tcp", "err", err)
			if !backoff(ctx, &delay) {
				return
			}
			continue
		}
		delay = 0
		if !s.track(c) {
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.serveConn(c)
		}()
	}
}

// track registers c, or closes it when the server is closing or full.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == stateClosed || len(s.conns) >= maxTCPConns {
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// serveConn answers length-prefixed queries on one connection (RFC 1035
// 4.2.2, RFC 7766) until the client goes quiet or sends garbage.
func (s *Server) serveConn(c net.Conn) {
	var lenBuf [2]byte
	buf := make([]byte, dns.MaxMsgSize)
	for {
		if err := c.SetReadDeadline(time.Now().Add(tcpIdle)); err != nil {
			return
		}
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint16(lenBuf[:]))
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			return
		}
		view, fwd, ok := s.asker(addrOf(c.RemoteAddr()))
		if !ok {
			return
		}
		var out []byte
		if q := forwardable(fwd, buf[:n]); q != nil {
			out = s.forward(context.Background(), fwd, q, false)
		} else {
			out = reply(buf[:n], staticSource{view}, s.ttl, false)
		}
		if out == nil {
			return
		}
		msg := make([]byte, 2+len(out))
		binary.BigEndian.PutUint16(msg, uint16(len(out)))
		copy(msg[2:], out)
		if err := c.SetWriteDeadline(time.Now().Add(tcpWrite)); err != nil {
			return
		}
		if _, err := c.Write(msg); err != nil {
			s.log.Debug("write tcp", "to", c.RemoteAddr(), "err", err)
			return
		}
	}
}

// reply turns one wire-format query into the wire-format answer, or nil
// when it must not be answered (too short to carry an ID, or itself a
// response). A query that does not parse gets FORMERR; an answer too big for
// UDP is truncated with the TC bit set, so the client retries over TCP.
func reply(b []byte, src Source, ttl time.Duration, udp bool) []byte {
	q := new(dns.Msg)
	if err := q.Unpack(b); err != nil {
		return formErr(b)
	}
	if q.Response {
		return nil
	}
	r := answer(q, src.View(), ttl) // one view for the whole query
	if out, ok := packFor(q, r, udp); ok {
		return out
	}
	// Should not happen; answer something rather than nothing.
	f := new(dns.Msg)
	f.SetRcode(q, dns.RcodeServerFailure)
	out, _ := packFor(q, f, udp)
	return out
}

// formErr answers an unparseable query from its header alone.
func formErr(b []byte) []byte {
	const headerLen = 12
	if len(b) < headerLen || b[2]&0x80 != 0 { // too short, or QR set
		return nil
	}
	r := &dns.Msg{MsgHdr: dns.MsgHdr{
		Id:       binary.BigEndian.Uint16(b),
		Response: true,
		Opcode:   int(b[2]>>3) & 0xF,
		Rcode:    dns.RcodeFormatError,
	}}
	out, err := r.Pack()
	if err != nil {
		return nil
	}
	return out
}

// packFor packs r, the answer to q, truncated (TC set) to what q's client
// takes over UDP; ok is false (and out nil) when it cannot be.
func packFor(q, r *dns.Msg, udp bool) (out []byte, ok bool) {
	size := dns.MaxMsgSize
	if udp {
		size = dns.MinMsgSize
		if o := q.IsEdns0(); o != nil {
			size = min(max(int(o.UDPSize()), dns.MinMsgSize), ednsSize)
		}
	}
	r.Truncate(size)
	out, err := r.Pack()
	if err != nil || len(out) > size {
		return nil, false
	}
	return out, true
}
