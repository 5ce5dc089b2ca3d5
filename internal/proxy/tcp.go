package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// DefaultTCPIdleTimeout ends a spliced raw TCP connection on which no byte
// moved either way for that long.
const DefaultTCPIdleTimeout = 10 * time.Minute

// tcpUpgrade is the protocol an edge asks the far proxy to switch a
// backhaul connection to: raw bytes to and from one machine.
const tcpUpgrade = "flame-tcp"

// Headers of a raw TCP hop on the backhaul, besides the token, app, machine
// and port: the client's address and the edge's, for a PROXY protocol
// header.
const (
	hdrClientAddr = "Flame-Proxy-Client"
	hdrEdgeAddr   = "Flame-Proxy-Edge"
)

// PortRange is an inclusive range of ports; the zero value is empty.
type PortRange struct{ Lo, Hi int }

// Empty reports whether the range holds no port.
func (r PortRange) Empty() bool { return r.Lo == 0 && r.Hi == 0 }

// Contains reports whether port is in the range.
func (r PortRange) Contains(port int) bool { return !r.Empty() && r.Lo <= port && port <= r.Hi }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }

// ParsePortRange reads "lo-hi" or a single port; "" is the empty range.
func ParsePortRange(s string) (PortRange, error) {
	if s == "" {
		return PortRange{}, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := strconv.Atoi(lo)
	h, err2 := strconv.Atoi(hi)
	r := PortRange{Lo: l, Hi: h}
	if err1 != nil || err2 != nil {
		return PortRange{}, fmt.Errorf("port range %q: want lo-hi, like 10000-10999", s)
	}
	return r, r.validate()
}

func (r PortRange) validate() error {
	if r.Empty() {
		return nil
	}
	if r.Lo < 1 || r.Hi > 65535 || r.Lo > r.Hi {
		return fmt.Errorf("port range %s: want 1 <= lo <= hi <= 65535", r)
	}
	return nil
}

// tcpEdge is the edge's raw TCP side: one listener per raw TCP public port
// the route table shows in the configured range, and the connections
// spliced through them.
type tcpEdge struct {
	p      *Proxy
	ctx    context.Context // ends at Close: dials in progress stop
	cancel context.CancelFunc

	mu        sync.Mutex
	started   bool
	closed    bool
	listeners map[int]net.Listener
	failed    map[int]bool   // ports whose listener could not open (logged once)
	conflicts map[int]string // ports two apps declare (logged once)
	wg        sync.WaitGroup // the accept loops
	// conns are the connections being served, which Close cuts.
	conns upgrades
}

func newTCPEdge(p *Proxy) *tcpEdge {
	ctx, cancel := context.WithCancel(context.Background())
	return &tcpEdge{p: p, ctx: ctx, cancel: cancel, listeners: map[int]net.Listener{},
		failed: map[int]bool{}, conflicts: map[int]string{}}
}

// start opens the listeners the current table asks for.
func (e *tcpEdge) start() {
	e.mu.Lock()
	e.started = true
	e.mu.Unlock()
	e.sync(e.p.state.Load().table)
}

// sync opens a listener for every raw TCP port of the table inside the
// range that one app declares, and closes those no longer wanted.
func (e *tcpEdge) sync(t *route.Table) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started || e.closed {
		return
	}
	want, conflicts := tcpPlan(t, e.p.cfg.TCPPorts)
	for port, apps := range conflicts {
		if names := strings.Join(apps, ","); e.conflicts[port] != names {
			e.conflicts[port] = names
			e.p.log.Error("raw TCP port declared by more than one app: serving none of them", "port", port, "apps", apps)
		}
	}
	for port := range e.conflicts {
		if conflicts[port] == nil {
			delete(e.conflicts, port)
		}
	}
	for port, ln := range e.listeners {
		if !want[port] {
			ln.Close()
			delete(e.listeners, port)
			e.p.log.Info("raw TCP port closed", "port", port)
		}
	}
	for port := range want {
		if e.listeners[port] != nil {
			continue
		}
		ln, err := e.p.cfg.ListenTCP(port)
		if err != nil {
			if !e.failed[port] {
				e.failed[port] = true
				e.p.log.Error("raw TCP port: listen", "port", port, "err", err)
			}
			continue
		}
		delete(e.failed, port)
		e.listeners[port] = ln
		e.p.log.Info("raw TCP port open", "port", port, "addr", ln.Addr().String())
		e.wg.Add(1)
		go e.accept(ln, port)
	}
	for port := range e.failed {
		if !want[port] {
			delete(e.failed, port)
		}
	}
}

// tcpPlan decides which raw TCP ports of a table an edge serves: those in
// its range that exactly one app declares. The others in range are
// conflicts, with the apps that declare them.
func tcpPlan(t *route.Table, rng PortRange) (want map[int]bool, conflicts map[int][]string) {
	want, conflicts = map[int]bool{}, map[int][]string{}
	for port, apps := range t.TCPPorts() {
		switch {
		case !rng.Contains(port):
		case len(apps) == 1:
			want[port] = true
		default:
			conflicts[port] = apps
		}
	}
	return want, conflicts
}

// addrs returns the open raw TCP listeners' addresses by public port.
func (e *tcpEdge) addrs() map[int]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[int]string, len(e.listeners))
	for port, ln := range e.listeners {
		out[port] = ln.Addr().String()
	}
	return out
}

func (e *tcpEdge) accept(ln net.Listener, port int) {
	defer e.wg.Done()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || e.ctx.Err() != nil {
				return
			}
			// Out of file descriptors and the like: wait and go on, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			e.p.log.Warn("raw TCP port: accept", "port", port, "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-e.ctx.Done():
				return
			}
		}
		backoff = 0
		if !e.conns.add(c) {
			c.Close()
			return
		}
		go func() {
			defer e.conns.done(c)
			defer c.Close()
			e.p.serveTCP(e.ctx, c, port)
		}()
	}
}

// close stops the listeners, cuts every connection and waits for their
// goroutines.
func (e *tcpEdge) close() {
	e.mu.Lock()
	e.closed = true
	for port, ln := range e.listeners {
		ln.Close()
		delete(e.listeners, port)
	}
	e.mu.Unlock()
	e.cancel()
	e.conns.closeAll()
	e.wg.Wait()
}

// serveTCP routes a raw TCP connection on a public port to the best machine
// of the app that holds the port and splices the two. A connect that fails
// moves to the next candidate: nothing of the client's was sent yet.
func (p *Proxy) serveTCP(ctx context.Context, c net.Conn, port int) {
	st := p.state.Load()
	apps := st.table.TCPPorts()[port]
	if len(apps) != 1 {
		return
	}
	appName := apps[0]
	q := route.Query{Port: port, TCP: true, Rand: p.seq.Add(0x9e3779b97f4a7c15)}
	var buf [route.MaxCandidates]*route.Target
	cands := st.table.Select(appName, q, routeInput{p}, buf[:0])
	// As for HTTP: with no machine running the connection is held while
	// the nearest stopped one starts; with every one at its soft limit,
	// one starts behind it. Nothing of the client's is read meanwhile.
	cands, why := p.autostart(ctx, st, appName, q, cands)
	if len(cands) == 0 {
		if why == "" {
			why = st.table.Explain(appName, q, routeInput{p})
		}
		p.log.Debug("raw TCP: no candidate", "app", appName, "port", port, "client", c.RemoteAddr().String(), "reason", why)
		return
	}
	client, edge := addrPortOf(c.RemoteAddr()), addrPortOf(c.LocalAddr())
	var tried []string
	o := order{p: p}
	for tg, probe, ok := o.next(cands); ok; tg, probe, ok = o.next(cands) {
		// Counted from the connect on, so connections racing for a
		// machine's last place see each other.
		p.load.add(tg.MachineID, 1)
		back, fromBack, err := p.dialTCP(ctx, st, tg, port, client, edge)
		if err != nil {
			p.load.add(tg.MachineID, -1)
			if ctx.Err() != nil {
				p.release(tg, probe)
				return
			}
			p.strike(tg, err)
			p.release(tg, probe)
			p.log.Debug("raw TCP: candidate failed", "app", appName, "machine", tg.MachineID, "host", tg.Host, "err", err)
			tried = append(tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
			continue
		}
		p.succeeded(tg)
		p.release(tg, probe)
		splice(c, c, back, fromBack, p.cfg.TCPIdleTimeout)
		p.load.add(tg.MachineID, -1)
		return
	}
	p.log.Warn("raw TCP connection failed on every candidate", "app", appName, "port", port, "tried", strings.Join(tried, "; "))
}

// dialTCP connects to a target for a raw TCP connection: straight to a
// machine of this host, or through its host's backhaul, switched to raw
// bytes. It returns the connection and where to read it from.
func (p *Proxy) dialTCP(ctx context.Context, st *state, tg *route.Target, port int, client, edge netip.AddrPort) (net.Conn, io.Reader, error) {
	budget := p.connectBudget(tg)
	if tg.OnSelf {
		return p.dialMachineTCP(ctx, tg, budget, client, edge)
	}
	addr := st.backhaul[tg.Host]
	if addr == "" {
		return nil, nil, fmt.Errorf("host %s advertises no proxy address", tg.Host)
	}
	dctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	c, err := p.dialHost(dctx, "tcp", addr)
	if err != nil {
		return nil, nil, &connectError{addr: addr, err: err}
	}
	// The far proxy connects to its machine within its own connect
	// timeout and answers: the handshake is bounded by both.
	c.SetDeadline(time.Now().Add(budget + p.cfg.ConnectTimeout))
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	req := &http.Request{
		Method: http.MethodGet, URL: &url.URL{Path: "/"}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Host: tg.App + ".tcp", Header: http.Header{
			"Connection":  {"Upgrade"},
			"Upgrade":     {tcpUpgrade},
			hdrToken:      {p.cfg.Token},
			hdrApp:        {tg.App},
			hdrMachine:    {tg.MachineID},
			hdrPort:       {strconv.Itoa(port)},
			hdrClientAddr: {client.String()},
			hdrEdgeAddr:   {edge.String()},
		},
	}
	if err := req.Write(c); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("host %s: %w", tg.Host, err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("host %s: %w", tg.Host, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		c.Close()
		why := resp.Header.Get(hdrRetry)
		if why == "" {
			why = resp.Status
		}
		err := fmt.Errorf("host %s: %s", tg.Host, why)
		if resp.Header.Get(hdrRetryKind) == retryNotReached {
			err = fmt.Errorf("%w: %w", errNotReached, err)
		}
		return nil, nil, err
	}
	c.SetDeadline(time.Time{})
	return c, br, nil
}

// dialMachineTCP connects to a machine of this host and, for a port with
// the proxy_proto handler, sends the PROXY header first.
func (p *Proxy) dialMachineTCP(ctx context.Context, tg *route.Target, budget time.Duration, client, edge netip.AddrPort) (net.Conn, io.Reader, error) {
	addr := net.JoinHostPort(tg.Addr, strconv.Itoa(tg.Port))
	dctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	c, err := p.cfg.DialMachine(dctx, "tcp", addr)
	if err != nil {
		return nil, nil, &connectError{addr: addr, err: err}
	}
	var hdr []byte
	switch tg.Handler {
	case route.HandlerProxyProto:
		hdr = proxyHeaderV1(client, edge)
	case route.HandlerProxyProtoV2:
		hdr = proxyHeaderV2(client, edge)
	}
	if hdr != nil {
		c.SetWriteDeadline(time.Now().Add(p.cfg.ConnectTimeout))
		if _, err := c.Write(hdr); err != nil {
			c.Close()
			return nil, nil, fmt.Errorf("machine %s: send the PROXY header: %w", tg.MachineID, err)
		}
		c.SetWriteDeadline(time.Time{})
	}
	return c, c, nil
}

// serveBackhaulTCP is the far end of a raw TCP hop: it connects to its own
// machine, answers 101 and splices the hop to it. The token was checked.
func (p *Proxy) serveBackhaulTCP(w http.ResponseWriter, r *http.Request) {
	appName, machineID := r.Header.Get(hdrApp), r.Header.Get(hdrMachine)
	port, _ := strconv.Atoi(r.Header.Get(hdrPort))
	tg := p.state.Load().table.OnSelf(appName, port, machineID)
	if tg == nil || tg.Excluded == route.NotStarted || tg.Excluded == route.NoAddress || !tg.Handler.Raw() {
		why := "not running here"
		switch {
		case tg != nil && !tg.Handler.Raw():
			why = "not serving port " + strconv.Itoa(port) + " as raw TCP"
		case tg != nil:
			why = tg.Excluded.String()
		}
		w.Header().Set(hdrRetry, "machine "+machineID+" "+why)
		w.Header().Set(hdrRetryKind, retryNotReached)
		p.fail(w, "", http.StatusServiceUnavailable, codeNotHere, fmt.Sprintf("machine %q of app %q is %s on host %s", machineID, appName, why, p.cfg.HostID))
		return
	}
	// Bad addresses make an UNKNOWN header, never a forged one.
	client, _ := netip.ParseAddrPort(r.Header.Get(hdrClientAddr))
	edge, _ := netip.ParseAddrPort(r.Header.Get(hdrEdgeAddr))
	p.load.add(machineID, 1)
	defer p.load.add(machineID, -1)
	mc, _, err := p.dialMachineTCP(r.Context(), tg, p.cfg.MinConnectTimeout, client, edge)
	if err != nil {
		w.Header().Set(hdrRetry, "machine "+machineID+": "+err.Error())
		if ce := (*connectError)(nil); errors.As(err, &ce) {
			w.Header().Set(hdrRetryKind, retryNotReached)
		}
		p.fail(w, "", http.StatusBadGateway, codeAllFailed, fmt.Sprintf("machine %q: %v", machineID, err))
		return
	}
	defer mc.Close()
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		p.log.Debug("raw TCP hop: take the connection", "err", err)
		return
	}
	defer conn.Close()
	if !p.upgraded.add(conn, mc) {
		return // the proxy is closing
	}
	defer p.upgraded.done(conn, mc)
	if _, err := brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + tcpUpgrade + "\r\n\r\n"); err != nil {
		return
	}
	if err := brw.Flush(); err != nil {
		return
	}
	splice(conn, brw.Reader, mc, mc, p.cfg.TCPIdleTimeout)
}

// isTCPHop reports whether a backhaul request asks for a raw TCP hop.
func isTCPHop(r *http.Request) bool { return strings.EqualFold(upgradeOf(r.Header), tcpUpgrade) }

// splice copies bytes both ways between a and b (read from ra and rb,
// which may hold bytes already buffered) until both directions end. One
// side's end of stream is passed on as a half close where the connection
// allows it, else ends both; an error, or idle both ways for idle, ends
// both. Both are closed when it returns.
func splice(a net.Conn, ra io.Reader, b net.Conn, rb io.Reader, idle time.Duration) {
	var last atomic.Int64
	touch := func() { last.Store(time.Now().UnixNano()) }
	touch()
	cut := sync.OnceFunc(func() {
		a.Close()
		b.Close()
	})
	one := func(dst, src net.Conn, r io.Reader, done chan<- struct{}) {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 32<<10)
		for {
			src.SetReadDeadline(time.Now().Add(idle))
			n, err := r.Read(buf)
			if n > 0 {
				touch()
				dst.SetWriteDeadline(time.Now().Add(idle))
				if _, werr := dst.Write(buf[:n]); werr != nil {
					cut()
					return
				}
			}
			switch {
			case err == nil:
			case errors.Is(err, io.EOF):
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
					return
				}
				cut()
				return
			case isTimeout(err) && time.Since(time.Unix(0, last.Load())) < idle:
				// The other way is busy: the connection is not idle.
			default:
				cut()
				return
			}
		}
	}
	done := make(chan struct{}, 2)
	go one(b, a, ra, done)
	one(a, b, rb, done)
	<-done
	<-done
	cut()
}

// listenTCP listens on a raw TCP public port at the edge listener's IP.
func (c *Config) listenTCP(port int) (net.Listener, error) {
	host := ""
	if c.Edge != nil {
		if ta, ok := c.Edge.Addr().(*net.TCPAddr); ok && !ta.IP.IsUnspecified() {
			host = ta.IP.String()
		}
	}
	return net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
}

// TCPAddrs returns the addresses of the raw TCP listeners open now, by
// public port.
func (p *Proxy) TCPAddrs() map[int]string { return p.tcp.addrs() }
