package demoapp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the server's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type server struct {
	url    string
	out    *syncBuffer
	result chan error
	cancel context.CancelFunc
}

func serve(t *testing.T, env map[string]string) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{url: "http://" + ln.Addr().String(), out: &syncBuffer{}, result: make(chan error, 1), cancel: cancel}
	go func() { s.result <- Serve(ctx, ln, func(k string) string { return env[k] }, s.out) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-s.result:
		case <-time.After(10 * time.Second):
			t.Error("server did not stop")
		}
	})
	return s
}

func (s *server) do(t *testing.T, method, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, s.url+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestIdentity(t *testing.T) {
	s := serve(t, map[string]string{
		"FLY_APP_NAME":   "demo",
		"FLY_MACHINE_ID": "0123456789abcd",
		"FLY_REGION":     "ams",
		"PRIMARY_REGION": "ams",
		"SECRET":         "not reported",
	})
	req, _ := http.NewRequest("GET", s.url+"/", nil)
	req.Header.Set("Fly-Client-IP", "203.0.113.7")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("content type %q", ct)
	}
	var got struct {
		Env      map[string]string `json:"env"`
		Hostname string            `json:"hostname"`
		Pid      int               `json:"pid"`
		Uptime   string            `json:"uptime"`
		Request  struct {
			Headers map[string]string `json:"headers"`
		} `json:"request"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"FLY_APP_NAME": "demo", "FLY_MACHINE_ID": "0123456789abcd", "FLY_REGION": "ams", "PRIMARY_REGION": "ams"}
	if len(got.Env) != len(want) {
		t.Fatalf("env = %v, want %v", got.Env, want)
	}
	for k, v := range want {
		if got.Env[k] != v {
			t.Fatalf("env = %v, want %v", got.Env, want)
		}
	}
	if got.Pid != os.Getpid() || got.Hostname == "" || got.Uptime == "" {
		t.Fatalf("identity = %+v", got)
	}
	if got.Request.Headers["Fly-Client-Ip"] != "203.0.113.7" {
		t.Fatalf("headers = %v", got.Request.Headers)
	}
	out := s.out.String()
	if !strings.Contains(out, "listening on 127.0.0.1:") || !strings.Contains(out, "machine 0123456789abcd") {
		t.Fatalf("no listening line in %q", out)
	}
	if !strings.Contains(out, "GET / 200 ") || !strings.Contains(out, "from 203.0.113.7") {
		t.Fatalf("no request line in %q", out)
	}
}

func TestHealthFailAndRecover(t *testing.T) {
	s := serve(t, nil)
	steps := []struct {
		method, path string
		status       int
	}{
		{"GET", "/health", 200},
		{"GET", "/fail", 405},
		{"POST", "/fail", 200},
		{"GET", "/health", 500},
		{"POST", "/fail?off=1", 200},
		{"GET", "/health", 200},
		{"POST", "/fail", 200},
		{"POST", "/recover", 200},
		{"GET", "/health", 200},
		{"GET", "/nope", 404},
	}
	for _, st := range steps {
		if code, body := s.do(t, st.method, st.path); code != st.status {
			t.Fatalf("%s %s = %d %q, want %d", st.method, st.path, code, body, st.status)
		}
	}
}

func TestDelays(t *testing.T) {
	s := serve(t, nil)
	const d = 50 * time.Millisecond
	t0 := time.Now()
	if code, _ := s.do(t, "GET", "/health?delay=50ms"); code != 200 || time.Since(t0) < d {
		t.Fatalf("delayed request: %d after %v", code, time.Since(t0))
	}
	if code, _ := s.do(t, "GET", "/?delay=soon"); code != 400 {
		t.Fatalf("bad delay: %d", code)
	}
	if code, _ := s.do(t, "POST", "/slow?delay=50ms"); code != 200 {
		t.Fatalf("slow: %d", code)
	}
	t0 = time.Now()
	if code, _ := s.do(t, "GET", "/health"); code != 200 || time.Since(t0) < d {
		t.Fatalf("slowed request: %d after %v", code, time.Since(t0))
	}
	if code, _ := s.do(t, "POST", "/slow?delay=0"); code != 200 {
		t.Fatalf("slow off: %d", code)
	}
	if code, _ := s.do(t, "POST", "/slow"); code != 400 {
		t.Fatalf("slow without delay: %d", code)
	}
}

func TestExit(t *testing.T) {
	s := serve(t, nil)
	if code, _ := s.do(t, "POST", "/exit?code=300"); code != 400 {
		t.Fatalf("bad code: %d", code)
	}
	code, body := s.do(t, "POST", "/exit?code=3")
	if code != 200 || !strings.Contains(body, "code 3") {
		t.Fatalf("exit = %d %q", code, body)
	}
	select {
	case err := <-s.result:
		var ee ExitError
		if !errors.As(err, &ee) || ee.Code != 3 {
			t.Fatalf("serve = %v, want ExitError{3}", err)
		}
		s.result <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("server did not exit")
	}
}

func TestRunUsesPort(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, "", func(k string) string {
			if k == "PORT" {
				return "0"
			}
			return ""
		}, out)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "listening on ") {
		if time.Now().After(deadline) {
			t.Fatalf("never listened: %q", out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run = %v, want nil after ctx ended", err)
	}
	if err := Run(context.Background(), "bad address", func(string) string { return "" }, io.Discard); err == nil {
		t.Fatal("run on a bad address succeeded")
	}
}
