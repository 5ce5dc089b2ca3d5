package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		bad  string // a word of the usage error; "" when the line is good
	}{
		{[]string{"-backend", "127.0.0.1:8080"}, ""},
		{[]string{"-backend", "[::1]:8080", "-hops", "2", "-limit", "50"}, ""},
		{[]string{}, "-backend is required"},
		{[]string{"-backend", "localhost:8080"}, "want ip:port"},
		{[]string{"-backend", "127.0.0.1"}, "want ip:port"},
		{[]string{"-backend", "127.0.0.1:0"}, "want ip:port"},
		{[]string{"-backend", "127.0.0.1:8080", "-hops", "3"}, "must be 1 or 2"},
		{[]string{"-backend", "127.0.0.1:8080", "-limit", "0"}, "-limit 0"},
		{[]string{"-backend", "127.0.0.1:8080", "-ready-wait", "0s"}, "must be positive"},
		{[]string{"-backend", "127.0.0.1:8080", "extra"}, "unexpected argument"},
		{[]string{"-nope"}, "not defined"},
	} {
		o, err := parseFlags(tc.args, io.Discard)
		switch {
		case tc.bad == "" && err != nil:
			t.Errorf("%q: %v", tc.args, err)
		case tc.bad == "" && (!o.backend.IsValid() || o.hops < 1):
			t.Errorf("%q: parsed as %+v", tc.args, o)
		case tc.bad != "" && (!errors.As(err, new(usageError)) || !strings.Contains(err.Error(), tc.bad)):
			t.Errorf("%q: error %v, want a usage error naming %q", tc.args, err, tc.bad)
		}
	}
	if _, err := parseFlags([]string{"-h"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v, want flag.ErrHelp", err)
	}
}

// TestEdgeAnswers runs the program as the script does, with one and with
// two hosts, in front of a real HTTP server on loopback, and sends
// requests through the edge it reports.
func TestEdgeAnswers(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var hits atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "hello from the backend\n")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	for _, hops := range []string{"1", "2"} {
		t.Run("hops="+hops, func(t *testing.T) {
			before := hits.Load()
			addrFile := filepath.Join(t.TempDir(), "edge")
			ctx, cancel := context.WithCancel(context.Background())
			var stdout, stderr syncBuffer
			done := make(chan error, 1)
			go func() {
				done <- run(ctx, []string{"-backend", ln.Addr().String(), "-hops", hops, "-addr-file", addrFile}, &stdout, &stderr)
			}()
			// The program waits for its own first answer (bounded by
			// -ready-wait, 30 s) before it writes the file.
			var edge string
			deadline := time.Now().Add(40 * time.Second)
			for edge == "" {
				select {
				case err := <-done:
					cancel()
					t.Fatalf("edgebench ended before it was ready: %v\n%s", err, stderr.String())
				case <-time.After(10 * time.Millisecond):
				}
				if b, err := os.ReadFile(addrFile); err == nil {
					edge = strings.TrimSpace(string(b))
				}
				if time.Now().After(deadline) {
					cancel()
					t.Fatalf("no edge address after 40 s\n%s", stderr.String())
				}
			}
			client := &http.Client{Timeout: 10 * time.Second}
			for range 20 {
				req, _ := http.NewRequest(http.MethodGet, "http://"+edge+"/", nil)
				req.Host = "demo.localhost"
				resp, err := client.Do(req)
				if err != nil {
					cancel()
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(body) != "hello from the backend\n" || resp.Header.Get("Via") == "" {
					cancel()
					t.Fatalf("through the edge: %d %q, Via %q", resp.StatusCode, body, resp.Header.Get("Via"))
				}
			}
			// An unknown app is the edge's own answer, not the backend's.
			req, _ := http.NewRequest(http.MethodGet, "http://"+edge+"/", nil)
			req.Host = "other.localhost"
			if resp, err := client.Do(req); err != nil || resp.StatusCode != http.StatusNotFound {
				t.Errorf("unknown app: %v %v", resp, err)
			} else {
				resp.Body.Close()
			}
			client.CloseIdleConnections()
			if got := hits.Load() - before; got < 20 {
				t.Errorf("the backend saw %d requests, want at least 20", got)
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(30 * time.Second): // Close gives requests 5 s
				t.Fatal("edgebench did not stop after its context ended")
			}
			if !strings.Contains(stdout.String(), "edge "+edge+" hops "+hops) {
				t.Errorf("stdout %q does not report the edge", stdout.String())
			}
		})
	}
}

// TestTwoHopsCrossTheBackhaul checks that with two hosts the machine is
// the second host's, so every answer through the edge came over the
// backhaul.
func TestTwoHopsCrossTheBackhaul(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	o, err := parseFlags([]string{"-backend", ln.Addr().String(), "-hops", "2"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	b, err := start(context.Background(), o, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if len(b.hosts) != 2 {
		t.Fatalf("%d hosts", len(b.hosts))
	}
	edgeHost := b.hosts[0]
	m := edgeHost.cluster.Snapshot().Machine(machineID)
	if m == nil || m.Host != b.hosts[1].id {
		t.Fatalf("the edge host sees the machine as %+v, want it on %s", m, b.hosts[1].id)
	}
	if b.hosts[1].proxy.EdgeAddr() != "" {
		t.Errorf("the machine's host has an edge listener")
	}
}

// TestScript keeps bench/proxies.sh honest without the proxies or wrk: it
// parses, its usage works, and its summary renders a canned set of results
// (the same code path a real run ends in).
func TestScript(t *testing.T) {
	script := filepath.Join("..", "proxies.sh")
	if out, err := exec.Command("bash", "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("bash -n: %v\n%s", err, out)
	}
	if out, err := exec.Command("bash", script, "--help").CombinedOutput(); err != nil || !strings.Contains(string(out), "--json") {
		t.Errorf("--help: %v\n%s", err, out)
	}
	err := exec.Command("bash", script, "--no-such-flag").Run()
	if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Errorf("a bad flag: %v, want exit status 2", err)
	}

	results := filepath.Join("..", "testdata", "proxies-results.tsv")
	out, err := exec.Command("bash", script, "--render", results).CombinedOutput()
	if err != nil {
		t.Fatalf("--render: %v\n%s", err, out)
	}
	table := string(out)
	for _, want := range []string{
		// name, req/s, range, p50, p99, ×nginx, ×caddy, added p50
		"direct ", "nginx ", "haproxy ", "caddy ", "flame-1hop ", "flame-2hop ",
		"1.00", // nginx against itself
		"2.00", // flame-1hop: 30,000 req/s against caddy's 15,000
		"+60",  // flame-1hop: p50 160 µs against direct's 100 µs
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	if !strings.Contains(table, "haproxy") || !strings.Contains(table, "not installed") {
		t.Errorf("a missing proxy is not reported:\n%s", table)
	}

	out, err = exec.Command("bash", script, "--render", results, "--json").Output()
	if err != nil {
		t.Fatalf("--render --json: %v", err)
	}
	var doc struct {
		Rows []struct {
			Name       string   `json:"name"`
			Status     string   `json:"status"`
			RPS        float64  `json:"rps"`
			VsNginx    *float64 `json:"vs_nginx"`
			VsCaddy    *float64 `json:"vs_caddy"`
			AddedP50US *float64 `json:"added_p50_us"`
			Non2xx     *int     `json:"non_2xx"`
			SocketErrs *int     `json:"socket_errors"`
			Busy       *float64 `json:"proxy_cpu_busy_pct"`
		} `json:"rows"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("--json: %v\n%s", err, out)
	}
	byName := map[string]int{}
	for i, r := range doc.Rows {
		byName[r.Name] = i
	}
	f := doc.Rows[byName["flame-1hop"]]
	if len(doc.Rows) != 6 || f.Status != "ok" || f.RPS != 30000 || f.VsNginx == nil || *f.VsNginx != 0.5 ||
		*f.VsCaddy != 2 || *f.AddedP50US != 60 || *f.Non2xx != 3 || *f.SocketErrs != 4 {
		t.Errorf("--json: %s", out)
	}
	// nginx: 60,000 req/s at 12.5 and 12.7 µs per request, 75 % and 76.2 %
	// of its core.
	if n := doc.Rows[byName["nginx"]]; n.Busy == nil || math.Abs(*n.Busy-75.6) > 0.05 || doc.Rows[byName["direct"]].Busy != nil {
		t.Errorf("--json: nginx's core busy %v, want 75.6 %%; direct's %v, want null", n.Busy, doc.Rows[byName["direct"]].Busy)
	}
	if h := doc.Rows[byName["haproxy"]]; h.Status == "ok" || h.VsNginx != nil {
		t.Errorf("--json: haproxy, not installed, reads %+v", h)
	}
}

// syncBuffer is a buffer the program writes while the test reads it.
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

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}
