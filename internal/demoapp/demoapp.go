// Package demoapp is the built-in demo app users run first: a tiny HTTP
// server that answers with the identity of the machine it runs on and can be
// told to fail its health check, slow down or exit, to watch the platform
// react.
//
//	GET  /                 identity: FLY_* variables, hostname, pid, uptime
//	GET  /health           200, or 500 while failing
//	POST /fail             start failing health checks (?off=1 stops)
//	POST /recover          stop failing
//	POST /slow?delay=250ms delay every request (delay=0 stops)
//	POST /exit?code=N      answer, then exit with code N
//	any  ?delay=250ms      delay this request
//
// It logs one line per request to stdout.
package demoapp

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/httpserve"
)

// IdentityVars are the variables GET / reports, when set.
var IdentityVars = []string{
	"FLY_APP_NAME", "FLY_MACHINE_ID", "FLY_ALLOC_ID", "FLY_REGION",
	"FLY_PUBLIC_IP", "FLY_IMAGE_REF", "FLY_MACHINE_VERSION", "FLY_PRIVATE_IP",
	"FLY_PROCESS_GROUP", "FLY_VM_MEMORY_MB", "PRIMARY_REGION",
}

// ExitError is returned by Run when a client asked the app to exit; the
// caller should exit the process with Code.
type ExitError struct{ Code int }

func (e ExitError) Error() string { return fmt.Sprintf("exit requested with code %d", e.Code) }

// Run listens on addr (default ":$PORT", else ":8080") and serves until ctx
// ends (nil) or a client asks for an exit (ExitError).
func Run(ctx context.Context, addr string, env func(string) string, stdout io.Writer) error {
	if addr == "" {
		addr = ":8080"
		if port := env("PORT"); port != "" {
			addr = ":" + port
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("demo app: %w", err)
	}
	return Serve(ctx, ln, env, stdout)
}

// Serve is Run on a listener it takes over and closes.
func Serve(ctx context.Context, ln net.Listener, env func(string) string, stdout io.Writer) error {
	a := newApp(env, stdout, time.Now())
	srv := httpserve.New(a, httpserve.Limits{})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	a.printf("demo app listening on %s (app %s, machine %s, region %s)",
		ln.Addr(), orNone(env("FLY_APP_NAME")), orNone(env("FLY_MACHINE_ID")), orNone(env("FLY_REGION")))

	var result error
	select {
	case <-ctx.Done():
	case code := <-a.exit:
		result = ExitError{Code: code}
	case err := <-served:
		return fmt.Errorf("demo app: %w", err)
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		srv.Close()
	}
	<-served
	a.printf("demo app stopped")
	return result
}

// app is the demo app's handler and state.
type app struct {
	env     func(string) string
	started time.Time
	exit    chan int // a requested exit code

	outMu sync.Mutex
	out   io.Writer

	mu      sync.Mutex
	failing bool
	delay   time.Duration
}

func newApp(env func(string) string, out io.Writer, started time.Time) *app {
	return &app{env: env, out: out, started: started, exit: make(chan int, 1)}
}

func (a *app) printf(format string, args ...any) {
	a.outMu.Lock()
	defer a.outMu.Unlock()
	fmt.Fprintf(a.out, format+"\n", args...)
}

// statusWriter remembers the status a handler answered.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (a *app) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t0 := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	a.serve(sw, r)
	a.printf("%s %s %d %s from %s", r.Method, r.URL.RequestURI(), sw.status,
		time.Since(t0).Round(time.Microsecond), clientIP(r))
}

func (a *app) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	delay := a.delay
	a.mu.Unlock()
	if d := r.URL.Query().Get("delay"); d != "" && r.URL.Path != "/slow" {
		var err error
		if delay, err = time.ParseDuration(d); err != nil || delay < 0 {
			http.Error(w, "bad delay: want a duration like 250ms", http.StatusBadRequest)
			return
		}
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}

	switch r.URL.Path {
	case "/":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			methodNotAllowed(w)
			return
		}
		a.identity(w, r)
	case "/health":
		a.mu.Lock()
		failing := a.failing
		a.mu.Unlock()
		if failing {
			http.Error(w, "failing", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	case "/fail", "/recover":
		if r.Method != http.MethodPost {
			methodNotAllowed(w)
			return
		}
		fail := r.URL.Path == "/fail" && !truthy(r.URL.Query().Get("off"))
		a.mu.Lock()
		a.failing = fail
		a.mu.Unlock()
		if fail {
			fmt.Fprintln(w, "health checks now fail")
		} else {
			fmt.Fprintln(w, "health checks now pass")
		}
	case "/slow":
		if r.Method != http.MethodPost {
			methodNotAllowed(w)
			return
		}
		d, err := time.ParseDuration(r.URL.Query().Get("delay"))
		if err != nil || d < 0 {
			http.Error(w, "bad delay: want a duration like 250ms", http.StatusBadRequest)
			return
		}
		a.mu.Lock()
		a.delay = d
		a.mu.Unlock()
		fmt.Fprintf(w, "every request now waits %s\n", d)
	case "/exit":
		if r.Method != http.MethodPost {
			methodNotAllowed(w)
			return
		}
		code, err := strconv.Atoi(r.URL.Query().Get("code"))
		if r.URL.Query().Get("code") == "" {
			code, err = 0, nil
		}
		if err != nil || code < 0 || code > 255 {
			http.Error(w, "bad code: want 0 to 255", http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "exiting with code %d\n", code)
		select {
		case a.exit <- code:
		default: // an exit is already under way
		}
	default:
		http.NotFound(w, r)
	}
}

func (a *app) identity(w http.ResponseWriter, r *http.Request) {
	vars := make(map[string]string)
	for _, k := range IdentityVars {
		if v := a.env(k); v != "" {
			vars[k] = v
		}
	}
	headers := make(map[string]string)
	for k, v := range r.Header {
		if strings.HasPrefix(k, "Fly-") || strings.HasPrefix(k, "X-Forwarded-") {
			headers[k] = strings.Join(v, ", ")
		}
	}
	hostname, _ := os.Hostname()
	a.mu.Lock()
	failing, delay := a.failing, a.delay
	a.mu.Unlock()
	uptime := time.Since(a.started)
	body := map[string]any{
		"env":            vars,
		"hostname":       hostname,
		"pid":            os.Getpid(),
		"started_at":     a.started.UTC().Format(time.RFC3339Nano),
		"uptime":         uptime.Round(time.Millisecond).String(),
		"uptime_seconds": uptime.Seconds(),
		"failing":        failing,
		"delay":          delay.String(),
		"request": map[string]any{
			"method":      r.Method,
			"uri":         r.URL.RequestURI(),
			"host":        r.Host,
			"remote_addr": r.RemoteAddr,
			"headers":     headers,
		},
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(body)
}

func methodNotAllowed(w http.ResponseWriter) {
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
}

func truthy(s string) bool {
	b, err := strconv.ParseBool(s)
	return err == nil && b
}

func clientIP(r *http.Request) string {
	if ip := r.Header.Get("Fly-Client-IP"); ip != "" {
		return ip
	}
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return host
	}
	return r.RemoteAddr
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
