package httpserve_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/httpserve"
	"github.com/flamehq/flame/internal/httpserve/httpservetest"
)

// small are bounds short enough for tests; each check below derives its
// deadline from them (the bound, plus httpservetest.Allowance for a busy
// machine) and checks the lower side too: nothing is cut early.
var small = httpserve.Limits{ReadHeader: 300 * time.Millisecond, Body: 300 * time.Millisecond,
	Write: 300 * time.Millisecond, Idle: 300 * time.Millisecond}

func serve(t *testing.T, h http.Handler, l httpserve.Limits) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httpserve.New(h, l)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func within(t *testing.T, what string, got time.Duration, err error, limit time.Duration) {
	t.Helper()
	switch {
	case err != nil:
		t.Fatalf("%s: %v after %v (limit %v)", what, err, got, limit)
	case got < limit-limit/8:
		// The client's clock starts a little before the server's.
		t.Fatalf("%s: cut after %v, before its limit %v", what, got, limit)
	}
	t.Logf("%s: cut after %v (limit %v)", what, got, limit)
}

func echo(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	fmt.Fprintf(w, "read %d bytes", len(b))
}

func TestSlowClientsAreCut(t *testing.T) {
	addr := serve(t, http.HandlerFunc(echo), small)
	t.Run("slowloris", func(t *testing.T) {
		d, err := httpservetest.Slowloris(addr, small.ReadHeader, small.ReadHeader/6)
		within(t, "slowloris", d, err, small.ReadHeader)
	})
	t.Run("body that stops", func(t *testing.T) {
		d, err := httpservetest.SlowBody(addr, "/", small.Body)
		within(t, "slow body", d, err, small.Body)
	})
	t.Run("idle keep-alive", func(t *testing.T) {
		d, err := httpservetest.Idle(addr, "/", small.Idle)
		within(t, "idle", d, err, small.Idle)
	})
}

// TestUnreadBodyIsCut: a handler that answers without reading the body
// leaves the server to discard it; a client that stops sending is cut
// then too (net/http alone would wait for the rest forever).
func TestUnreadBodyIsCut(t *testing.T) {
	addr := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no", http.StatusUnauthorized)
	}), small)
	d, err := httpservetest.SlowBody(addr, "/", small.Body)
	within(t, "unread slow body", d, err, small.Body)
}

// TestReaderThatStopsIsCut: a client that stops reading a response is cut
// one Write after the server's write blocks.
func TestReaderThatStopsIsCut(t *testing.T) {
	blocked := make(chan time.Time, 1)
	cut := make(chan time.Time, 1)
	addr := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 64<<10)
		rc := http.NewResponseController(w)
		for {
			start := time.Now()
			_, err := w.Write(chunk)
			if err == nil {
				err = rc.Flush()
			}
			if err != nil {
				cut <- time.Now()
				return
			}
			if time.Since(start) > small.Write/4 {
				// This write waited on the client: the socket buffers are
				// full. Note when the writes began to block.
				select {
				case blocked <- start:
				default:
				}
			}
		}
	}), small)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	// Never read.
	var at time.Time
	select {
	case at = <-cut:
	case <-time.After(small.Write + httpservetest.Allowance + 5*time.Second):
		t.Fatal("a client that stopped reading was never cut")
	}
	select {
	case b := <-blocked:
		t.Logf("cut %v after the writes began to block (Write %v)", at.Sub(b), small.Write)
	default:
		// The very first blocking write was the one cut.
	}
}

// TestStreamOutlivesWrite: a stream that keeps writing lasts as long as it
// makes progress, far beyond Write: the bound is between writes.
func TestStreamOutlivesWrite(t *testing.T) {
	lines := 12
	addr := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := range lines {
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			rc.Flush()
			time.Sleep(small.Write / 3)
		}
	}), small)
	start := time.Now()
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("stream cut after %v: %v", time.Since(start), err)
	}
	if n := strings.Count(string(b), "\n"); n != lines {
		t.Fatalf("got %d lines in %v, want %d", n, time.Since(start), lines)
	}
	if d := time.Since(start); d < 3*small.Write {
		t.Fatalf("the stream took %v, not beyond Write: the test proves nothing", d)
	}
}

// TestSlowButSteadyBody: a body that keeps coming is read however long it
// takes in all.
func TestSlowButSteadyBody(t *testing.T) {
	addr := serve(t, http.HandlerFunc(echo), small)
	pr, pw := io.Pipe()
	go func() {
		for range 10 {
			pw.Write([]byte("x"))
			time.Sleep(small.Body / 3)
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", "http://"+addr+"/", pr)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "read 10 bytes" {
		t.Fatalf("got %q", b)
	}
}

// TestHijackedConnHasNoDeadline: a hijacker owns its connection's bounds.
func TestHijackedConnHasNoDeadline(t *testing.T) {
	addr := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		// Echo one line, well after every bound has passed.
		line, err := brw.ReadString('\n')
		if err != nil {
			return
		}
		c.Write([]byte(line))
	}), small)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	time.Sleep(3 * max(small.Write, small.Body, small.Idle))
	fmt.Fprintf(c, "ping\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "ping\n" {
		t.Fatalf("hijacked connection after the bounds: %q, %v", line, err)
	}
}

func TestApplyKeepsOtherFields(t *testing.T) {
	srv := httpserve.Apply(&http.Server{Handler: http.NotFoundHandler(), ReadTimeout: time.Second, WriteTimeout: time.Second,
		ErrorLog: nil, ConnState: func(net.Conn, http.ConnState) {}}, httpserve.Limits{ReadHeader: time.Second})
	if srv.ReadTimeout != 0 || srv.WriteTimeout != 0 || srv.ReadHeaderTimeout != time.Second ||
		srv.IdleTimeout != httpserve.DefaultIdle || srv.MaxHeaderBytes != httpserve.DefaultMaxHeaderBytes || srv.ConnState == nil {
		t.Fatalf("%+v", srv)
	}
}
