package check

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/api"
)

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

const fast = 20 * time.Millisecond

func tcpSpec(name string, port int) Spec {
	return Spec{Name: name, Type: TypeTCP, Port: port, Interval: fast, Timeout: time.Second}
}

func httpSpec(name string, port int, path string) Spec {
	return Spec{Name: name, Type: TypeHTTP, Port: port, Interval: fast, Timeout: time.Second,
		Method: "GET", Path: path, Protocol: "http"}
}

// recorder collects OnChange calls.
type recorder struct {
	mu    sync.Mutex
	calls [][]Status
}

func (r *recorder) onChange(s []Status) {
	r.mu.Lock()
	r.calls = append(r.calls, s)
	r.mu.Unlock()
}

func (r *recorder) get() [][]Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]Status(nil), r.calls...)
}

// start runs a runner for specs against 127.0.0.1 until the test ends, and
// checks afterwards that nothing of it is left running.
func start(t *testing.T, cfg RunnerConfig) *Runner {
	t.Helper()
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	cfg.Logger = slog.New(slog.NewTextHandler(testLogWriter{t}, nil))
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Close()
		checkNoLeaks(t)
	})
	return r
}

// checkNoLeaks fails when a goroutine of this package, or an HTTP client
// connection, outlives the runner.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	var stacks string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		buf := make([]byte, 1<<20)
		stacks = string(buf[:runtime.Stack(buf, true)])
		if !leaked(stacks) {
			return
		}
	}
	t.Errorf("goroutines left after Close:\n%s", stacks)
}

func leaked(stacks string) bool {
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, "testing.tRunner") || strings.Contains(g, "checkNoLeaks") {
			continue
		}
		if strings.Contains(g, "internal/check.(*Runner)") || strings.Contains(g, "net/http.(*persistConn)") {
			return true
		}
	}
	return false
}

// waitFor polls the runner until cond holds for check name.
func waitFor(t *testing.T, r *Runner, name string, cond func(Status) bool) Status {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, s := range r.Statuses() {
			if s.Name == name && cond(s) {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("check %s never got there; statuses %+v", name, r.Statuses())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func is(status string) func(Status) bool {
	return func(s Status) bool { return s.Status == status }
}

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return n
}

// closedPort returns a loopback port nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := port(t, ln.Addr().String())
	ln.Close()
	return p
}

func TestRunnerTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	up := tcpSpec("up", port(t, ln.Addr().String()))
	up.Service = true
	r := start(t, RunnerConfig{Specs: []Spec{up, tcpSpec("down", closedPort(t))}})

	st := waitFor(t, r, "up", is(api.CheckPassing))
	if st.Output != "connected" || !st.Service {
		t.Errorf("up: %+v", st)
	}
	st = waitFor(t, r, "down", is(api.CheckCritical))
	if !strings.Contains(st.Output, "connection refused") {
		t.Errorf("down output %q", st.Output)
	}
	if st.Service {
		t.Error("down reported as a service check")
	}
}

func TestRunnerInitialStatus(t *testing.T) {
	r, err := New(RunnerConfig{Host: "127.0.0.1", Specs: []Spec{tcpSpec("a", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	st := r.Statuses()
	if len(st) != 1 || st[0].Status != api.CheckWarning || st[0].Output != OutputWaiting {
		t.Errorf("before Start: %+v", st)
	}
}

func TestRunnerHTTP(t *testing.T) {
	var seen atomic.Value
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, req *http.Request) {
		seen.Store(req.Method + " " + req.Host + " " + req.Header.Get("X-Check"))
		fmt.Fprint(w, "all\tgood\n\n  here")
	})
	mux.HandleFunc("/fail", func(w http.ResponseWriter, req *http.Request) {
		http.Error(w, "database unreachable", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("/redirect", func(w http.ResponseWriter, req *http.Request) {
		http.Redirect(w, req, "/fail", http.StatusFound)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, req *http.Request) {
		select {
		case <-req.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprint(w, strings.Repeat("x", 10000))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	p := port(t, srv.Listener.Addr().String())

	ok := httpSpec("ok", p, "/ok")
	ok.Method = "POST"
	ok.Headers = map[string][]string{"X-Check": {"yes"}, "Host": {"app.example"}}
	slow := httpSpec("slow", p, "/slow")
	slow.Timeout = 50 * time.Millisecond
	r := start(t, RunnerConfig{Specs: []Spec{
		ok,
		httpSpec("fail", p, "/fail"),
		httpSpec("redirect", p, "/redirect"),
		slow,
		httpSpec("big", p, "/big"),
		httpSpec("refused", closedPort(t), "/"),
	}})

	st := waitFor(t, r, "ok", is(api.CheckPassing))
	if st.Output != "200 OK: all good here" {
		t.Errorf("ok output %q", st.Output)
	}
	if got := seen.Load(); got != "POST app.example yes" {
		t.Errorf("server saw %q", got)
	}
	st = waitFor(t, r, "fail", is(api.CheckCritical))
	if st.Output != "503 Service Unavailable: database unreachable" {
		t.Errorf("fail output %q", st.Output)
	}
	st = waitFor(t, r, "redirect", is(api.CheckPassing))
	if !strings.HasPrefix(st.Output, "302 Found") {
		t.Errorf("redirect output %q", st.Output)
	}
	st = waitFor(t, r, "slow", is(api.CheckCritical))
	if st.Output != "timed out after 50ms" {
		t.Errorf("slow output %q", st.Output)
	}
	st = waitFor(t, r, "big", is(api.CheckPassing))
	if len(st.Output) > 200 {
		t.Errorf("big output of %d bytes", len(st.Output))
	}
	st = waitFor(t, r, "refused", is(api.CheckCritical))
	if !strings.HasSuffix(st.Output, "connect: connection refused") || strings.Contains(st.Output, "http://") {
		t.Errorf("refused output %q", st.Output)
	}
}

func TestRunnerHTTPS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprint(w, "secure")
	}))
	defer srv.Close()
	p := port(t, srv.Listener.Addr().String())
	skip := httpSpec("skip", p, "/")
	skip.Protocol, skip.TLSSkipVerify = "https", true
	verify := httpSpec("verify", p, "/")
	verify.Protocol = "https"
	r := start(t, RunnerConfig{Specs: []Spec{skip, verify}})
	if st := waitFor(t, r, "skip", is(api.CheckPassing)); st.Output != "200 OK: secure" {
		t.Errorf("skip output %q", st.Output)
	}
	if st := waitFor(t, r, "verify", is(api.CheckCritical)); !strings.Contains(st.Output, "certificate") {
		t.Errorf("verify output %q", st.Output)
	}
}

func TestRunnerDial(t *testing.T) {
	var calls atomic.Int32
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		calls.Add(1)
		if addr != "[fdaa::5]:8080" {
			return nil, fmt.Errorf("unexpected address %s", addr)
		}
		return nil, errors.New("no route to machine")
	}
	r := start(t, RunnerConfig{Host: "fdaa::5", Dial: dial, Specs: []Spec{tcpSpec("a", 8080), httpSpec("b", 8080, "/")}})
	if st := waitFor(t, r, "a", is(api.CheckCritical)); st.Output != "no route to machine" {
		t.Errorf("a output %q", st.Output)
	}
	if st := waitFor(t, r, "b", is(api.CheckCritical)); st.Output != "dial tcp: no route to machine" && st.Output != "no route to machine" {
		t.Errorf("b output %q", st.Output)
	}
	if calls.Load() < 2 {
		t.Errorf("dial called %d times", calls.Load())
	}
}

// flipServer answers 200 or 500 as told.
type flipServer struct {
	healthy atomic.Bool
	hits    atomic.Int32
}

func (f *flipServer) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	f.hits.Add(1)
	if f.healthy.Load() {
		fmt.Fprint(w, "ok")
		return
	}
	http.Error(w, "sick", http.StatusInternalServerError)
}

// waitHits waits until the server has been probed n more times.
func (f *flipServer) waitHits(t *testing.T, n int32) {
	t.Helper()
	want := f.hits.Load() + n
	for deadline := time.Now().Add(5 * time.Second); f.hits.Load() < want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d probes", f.hits.Load())
		}
	}
}

func TestRunnerTransitionsAndCoalescing(t *testing.T) {
	f := &flipServer{}
	srv := httptest.NewServer(f)
	defer srv.Close()
	rec := &recorder{}
	r := start(t, RunnerConfig{Specs: []Spec{httpSpec("h", port(t, srv.Listener.Addr().String()), "/")}, OnChange: rec.onChange})

	waitFor(t, r, "h", is(api.CheckCritical))
	f.waitHits(t, 5) // many probes, one change
	f.healthy.Store(true)
	waitFor(t, r, "h", is(api.CheckPassing))
	f.waitHits(t, 5)
	f.healthy.Store(false)
	waitFor(t, r, "h", is(api.CheckCritical))
	f.waitHits(t, 5)

	var got []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		got = got[:0]
		for _, c := range rec.get() {
			got = append(got, c[0].Status+" "+c[0].Output)
		}
		if len(got) >= 3 || time.Now().After(deadline) {
			break
		}
	}
	want := []string{
		"critical 500 Internal Server Error: sick",
		"passing 200 OK: ok",
		"critical 500 Internal Server Error: sick",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("OnChange calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	calls := rec.get()
	for i := 1; i < len(calls); i++ {
		if !calls[i][0].UpdatedAt.After(calls[i-1][0].UpdatedAt) && !calls[i][0].UpdatedAt.Equal(calls[i-1][0].UpdatedAt) {
			t.Errorf("UpdatedAt went backwards: %v then %v", calls[i-1][0].UpdatedAt, calls[i][0].UpdatedAt)
		}
	}
}

func TestRunnerGracePeriod(t *testing.T) {
	// A check failing from the start is warning during its grace period and
	// turns critical when it ends, even though the next probe is far off.
	// On a virtual clock, with a dialer that refuses (no socket): the first
	// probe, due within maxFirstDelay, lands in a grace period twice that
	// however busy the machine, and the turn to critical comes exactly when
	// the grace period ends.
	synctest.Test(t, func(t *testing.T) {
		refuse := func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
		}
		s := tcpSpec("boot", 80)
		s.Interval = time.Hour // one probe (the first), then none
		s.GracePeriod = 2 * maxFirstDelay
		began := time.Now()
		r := start(t, RunnerConfig{Specs: []Spec{s}, Dial: refuse})

		st := waitFor(t, r, "boot", func(s Status) bool { return s.Output != OutputWaiting })
		if st.Status != api.CheckWarning || st.UpdatedAt.After(began.Add(maxFirstDelay)) {
			t.Errorf("first probe, failed, at %v: %s, want warning within %v", st.UpdatedAt.Sub(began), st.Status, maxFirstDelay)
		}
		st = waitFor(t, r, "boot", is(api.CheckCritical))
		if at := st.UpdatedAt.Sub(began); at != s.GracePeriod {
			t.Errorf("critical after %v, want when the grace period ends (%v)", at, s.GracePeriod)
		}
		if !strings.Contains(st.Output, "connection refused") {
			t.Errorf("output %q", st.Output)
		}
	})
}

func TestRunnerGracePassesEarly(t *testing.T) {
	// A machine ready within its grace period passes at once.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := tcpSpec("ready", port(t, ln.Addr().String()))
	s.GracePeriod = time.Hour
	r := start(t, RunnerConfig{Specs: []Spec{s}})
	waitFor(t, r, "ready", is(api.CheckPassing))
}

func TestRunnerFakeClock(t *testing.T) {
	// Statuses are stamped by the configured clock.
	t0 := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	r := start(t, RunnerConfig{Specs: []Spec{tcpSpec("a", port(t, ln.Addr().String()))}, Now: func() time.Time { return t0 }})
	if st := waitFor(t, r, "a", is(api.CheckPassing)); !st.UpdatedAt.Equal(t0) {
		t.Errorf("UpdatedAt %v, want %v", st.UpdatedAt, t0)
	}
}

func TestRunnerCloseMidProbe(t *testing.T) {
	// Close returns promptly while an HTTP probe is blocked, and reports
	// nothing afterwards.
	block := make(chan struct{})
	arrived := make(chan struct{}, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		select {
		case arrived <- struct{}{}:
		default:
		}
		select {
		case <-block:
		case <-req.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(block)
	rec := &recorder{}
	s := httpSpec("h", port(t, srv.Listener.Addr().String()), "/")
	s.Timeout = time.Minute
	r, err := New(RunnerConfig{Host: "127.0.0.1", Specs: []Spec{s}, OnChange: rec.onChange})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The probe is in flight: the server has its request.
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("no probe reached the server")
	}
	done := make(chan struct{})
	go func() { r.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on a probe")
	}
	if n := len(rec.get()); n != 0 {
		t.Errorf("%d OnChange calls for a probe cut short", n)
	}
	if err := r.Start(context.Background()); err == nil {
		t.Error("Start after Close succeeded")
	}
	checkNoLeaks(t)
}

func TestRunnerContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r, err := New(RunnerConfig{Host: "127.0.0.1", Specs: []Spec{tcpSpec("a", closedPort(t))}, OnChange: func([]Status) {}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("goroutines still running after the context ended")
	}
	r.Close()
}

func TestRunnerConfigValidate(t *testing.T) {
	good := tcpSpec("a", 80)
	for _, cfg := range []RunnerConfig{
		{Specs: []Spec{good}},
		{Host: "127.0.0.1", Specs: []Spec{good, good}},
		{Host: "127.0.0.1", Specs: []Spec{{Name: "bad"}}},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

func TestExcerpt(t *testing.T) {
	if got := excerpt([]byte("a\x00b\r\n\tc \xff")); got != "a b c ?" {
		t.Errorf("excerpt = %q", got)
	}
}
