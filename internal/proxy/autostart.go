package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Autostart: a request that no started machine of its app can take (none
// is started, or every one is at its soft limit) starts a stopped machine
// with autostart, the nearest first (route.Table.Startable). The edge asks
// the machine's host: its own proxy's Start hook for a machine of this
// host, the far proxy over the backhaul (hdrStart) for any other — never
// the control plane. The host starts it and answers once it is ready:
// started, its services[].checks passing (in the host's own published
// facts) and its port accepting connections. Requests for the same app and
// port share one start. With no started machine the request is held until
// the machine is ready, at most AutostartTimeout, and then goes to it;
// with machines at their soft limit it is served at once and the start
// goes on behind it. A machine that fails to start makes way for the next
// startable one.

// DefaultAutostartTimeout bounds how long a request is held for a machine
// started for it.
const DefaultAutostartTimeout = 30 * time.Second

// hdrStart on a backhaul request asks the host to start the named machine
// and answer once it is ready (no request is delivered).
const hdrStart = "Flame-Proxy-Start"

// codeStartFailed: 503 when no machine could be started for the request.
const codeStartFailed = "start_failed"

// startRetryAfter keeps a finished background start from being followed at
// once by another, while the edges learn of the machine it started.
const startRetryAfter = time.Second

// tableWatch wakes whoever waits for the route table to change.
type tableWatch struct {
	mu sync.Mutex
	ch chan struct{}
}

// changed returns a channel closed at the next change.
func (w *tableWatch) changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ch == nil {
		w.ch = make(chan struct{})
	}
	return w.ch
}

func (w *tableWatch) notify() {
	w.mu.Lock()
	if w.ch != nil {
		close(w.ch)
		w.ch = nil
	}
	w.mu.Unlock()
}

// startFlight is one start shared by the requests that wait for it.
type startFlight struct {
	app     string
	waiters atomic.Int32 // requests held for it
	done    chan struct{}
	tg      *route.Target // the machine ready, when err is nil
	err     error
}

// starter owns the starts in flight; Close ends them.
type starter struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	flights map[string]*startFlight
	last    map[string]time.Time // when a background start last finished, by key
}

func newStarter() *starter {
	ctx, cancel := context.WithCancel(context.Background())
	return &starter{ctx: ctx, cancel: cancel, flights: map[string]*startFlight{}, last: map[string]time.Time{}}
}

func (s *starter) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
}

// autostart is serveEdge's step between choosing and sending: it returns
// cands unchanged while one is under its soft limit, starts a machine
// behind the request when every one is at it, and with none starts one and
// holds the request until it is ready (then it is the only candidate). why
// says what went wrong when it returns no candidate.
func (p *Proxy) autostart(ctx context.Context, st *state, appName string, q route.Query, cands []*route.Target) (_ []*route.Target, why string) {
	if len(cands) > 0 {
		if !p.overSoft(cands[0]) {
			return cands, ""
		}
		for _, tg := range cands[1:] {
			if !p.overSoft(tg) {
				return cands, ""
			}
		}
	}
	var buf [route.MaxCandidates]*route.Target
	if len(st.table.Startable(appName, q, buf[:0])) == 0 {
		return cands, ""
	}
	f := p.startFor(appName, q, len(cands) > 0)
	if len(cands) > 0 || f == nil {
		return cands, ""
	}
	f.waiters.Add(1)
	defer f.waiters.Add(-1)
	select {
	case <-f.done:
	case <-ctx.Done():
		return cands, "the client went away while a machine started"
	}
	if f.err != nil {
		return cands, f.err.Error()
	}
	return append(cands, f.tg), ""
}

// overSoft reports whether a candidate is at or over its soft limit.
func (p *Proxy) overSoft(tg *route.Target) bool {
	return max(tg.Published, p.load.InFlight(tg.MachineID)) >= tg.SoftLimit
}

// startFor joins the start in flight for the app's port (and forced
// region or instance), or begins one. A background start (background:
// the request does not wait) is not begun again within startRetryAfter of
// the last; then f is nil.
func (p *Proxy) startFor(appName string, q route.Query, background bool) *startFlight {
	key := appName + "\x00" + strconv.Itoa(q.Port) + "\x00" + q.ForceRegion + "\x00" + q.ForceInstance
	s := p.starts
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.flights[key]; f != nil {
		return f
	}
	if s.closed {
		return &startFlight{done: closedChan, err: errors.New("the proxy is closing")}
	}
	if background && p.cfg.Now().Sub(s.last[key]) < startRetryAfter {
		return nil
	}
	f := &startFlight{app: appName, done: make(chan struct{})}
	s.flights[key] = f
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(s.ctx, p.cfg.AutostartTimeout)
		defer cancel()
		f.tg, f.err = p.runStart(ctx, appName, q)
		s.mu.Lock()
		delete(s.flights, key)
		s.last[key] = p.cfg.Now()
		if len(s.last) > 4096 { // bounded: old entries only delay a start by startRetryAfter
			clear(s.last)
		}
		s.mu.Unlock()
		close(f.done)
		if f.err != nil {
			p.log.Warn("autostart failed", "app", appName, "err", f.err)
		}
	}()
	return f
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// runStart starts the nearest startable machine, or the next when one
// fails, and returns it once ready.
func (p *Proxy) runStart(ctx context.Context, appName string, q route.Query) (*route.Target, error) {
	var buf [route.MaxCandidates]*route.Target
	st := p.state.Load()
	list := st.table.Startable(appName, q, buf[:0])
	if len(list) == 0 {
		return nil, fmt.Errorf("no stopped machine of app %q with autostart is left to start", appName)
	}
	var tried []string
	for _, tg := range list {
		began := time.Now()
		ready, err := p.startOne(ctx, st, tg, q.Port)
		if err == nil {
			p.log.Info("autostarted machine", "app", appName, "machine", tg.MachineID, "host", tg.Host, "took", time.Since(began))
			return ready, nil
		}
		tried = append(tried, fmt.Sprintf("%s in %s: %v", tg.MachineID, tg.Region, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("autostart of app %q within %v failed: %s", appName, p.cfg.AutostartTimeout, strings.Join(tried, "; "))
}

// startOne has the machine's host start it and returns once it is ready.
func (p *Proxy) startOne(ctx context.Context, st *state, tg *route.Target, port int) (*route.Target, error) {
	if tg.OnSelf {
		return p.startHere(ctx, tg.App, port, tg.MachineID)
	}
	addr := st.backhaul[tg.Host]
	if addr == "" {
		return nil, fmt.Errorf("host %s advertises no proxy address", tg.Host)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, (&url.URL{Scheme: "http", Host: addr, Path: "/"}).String(), http.NoBody)
	if err != nil {
		return nil, err
	}
	req.Header.Set(hdrToken, p.cfg.Token)
	req.Header.Set(hdrApp, tg.App)
	req.Header.Set(hdrMachine, tg.MachineID)
	req.Header.Set(hdrPort, strconv.Itoa(port))
	req.Header.Set(hdrStart, "1")
	resp, err := p.toHosts.RoundTrip(req.WithContext(context.WithValue(ctx, connectBudgetKey{}, p.connectBudget(tg))))
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("not ready in time: %w", ctx.Err())
		}
		return nil, fmt.Errorf("ask host %s: %w", tg.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("host %s: %s", tg.Host, strings.TrimSpace(string(b)))
	}
	// Ready as its host reports it: the far proxy delivers to it now,
	// whatever this edge's table says until the cluster catches up.
	return tg, nil
}

// startHere starts a machine of this host through the Start hook and waits
// until it is ready: started, services[].checks passing, and accepting
// connections on the service's port. A machine autostop is draining is
// kept instead, if its stop has not begun; if it has, it is started again
// once stopped.
func (p *Proxy) startHere(ctx context.Context, appName string, port int, machineID string) (*route.Target, error) {
	// The request held for the machine counts in flight to it, so
	// autostop does not take it while it boots.
	p.load.add(machineID, 1)
	defer p.load.add(machineID, -1)
	for {
		changed := p.tables.changed()
		tg := p.state.Load().table.OnSelf(appName, port, machineID)
		switch {
		case tg == nil:
			return nil, fmt.Errorf("machine %q of app %q has no service on port %d on host %s", machineID, appName, port, p.cfg.HostID)
		case p.drain.revive(machineID):
			p.log.Info("autostop called off: a request needs the machine", "app", appName, "machine", machineID)
			p.drained()
			return tg, nil // it never stopped: in rotation again
		case p.drain.has(machineID):
			select { // stopping: start it again once it is stopped
			case <-changed:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("not ready in time (autostop was stopping it)")
			}
		case tg.Excluded == route.Cordoned && !tg.Startable():
			return nil, fmt.Errorf("machine %s is cordoned", machineID)
		case tg.Startable():
			if p.cfg.Start == nil {
				return nil, fmt.Errorf("host %s does not start machines on demand", p.cfg.HostID)
			}
			if err := p.cfg.Start(ctx, appName, machineID); err != nil {
				return nil, fmt.Errorf("start: %w", err)
			}
		}
		return p.awaitReady(ctx, appName, port, machineID)
	}
}

// awaitReady waits until this host's own table shows the machine
// routable and its port accepts a connection.
func (p *Proxy) awaitReady(ctx context.Context, appName string, port int, machineID string) (*route.Target, error) {
	for {
		changed := p.tables.changed()
		tg := p.state.Load().table.OnSelf(appName, port, machineID)
		var why string
		var retry <-chan time.Time
		switch {
		case tg == nil:
			return nil, fmt.Errorf("machine %s is no longer on host %s", machineID, p.cfg.HostID)
		case tg.Excluded != route.Included:
			why = tg.Excluded.String()
		default:
			err := p.probe(ctx, tg)
			if err == nil {
				return tg, nil
			}
			// Started with its checks passing, but its port refuses
			// (Fly's PM06): try again shortly.
			why = "started, but not accepting connections: " + err.Error()
			retry = time.After(5 * time.Millisecond)
		}
		select {
		case <-changed:
		case <-retry:
		case <-ctx.Done():
			return nil, fmt.Errorf("not ready in time (%s)", why)
		}
	}
}

// probe connects to the machine's service port and closes the connection.
func (p *Proxy) probe(ctx context.Context, tg *route.Target) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.MinConnectTimeout)
	defer cancel()
	c, err := p.cfg.DialMachine(ctx, "tcp", net.JoinHostPort(tg.Addr, strconv.Itoa(tg.Port)))
	if err != nil {
		return err
	}
	return c.Close()
}

// serveStart is the backhaul's answer to another edge's start request
// (hdrStart): 200 once the machine is ready, 503 with the reason if it
// cannot be made ready within AutostartTimeout.
func (p *Proxy) serveStart(w http.ResponseWriter, r *http.Request, appName, machineID string, port int) {
	ctx, cancel := context.WithTimeout(r.Context(), p.cfg.AutostartTimeout)
	defer cancel()
	if _, err := p.startHere(ctx, appName, port, machineID); err != nil {
		if r.Context().Err() != nil {
			return
		}
		p.fail(w, "", http.StatusServiceUnavailable, codeStartFailed, err.Error())
		return
	}
	w.WriteHeader(http.StatusOK)
	io.WriteString(w, "ready\n")
}
