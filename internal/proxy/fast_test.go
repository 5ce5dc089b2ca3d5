package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

func TestParseRequestHead(t *testing.T) {
	const limit = 1 << 10
	for _, tc := range []struct {
		name, in string
		err      error
		method   string
		target   string
		host     string
		length   int64
		chunked  bool
		close    bool
		upgrade  bool
		headLen  int
	}{
		{name: "get", in: "GET /a?b=1 HTTP/1.1\r\nHost: demo.localhost\r\nX-A:  v w \r\n\r\n", method: "GET", target: "/a?b=1", host: "demo.localhost", length: -1},
		{name: "pipelined: the first only", in: "GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n", method: "GET", target: "/1", host: "h", length: -1, headLen: 28},
		{name: "leading empty lines", in: "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", method: "GET", target: "/", host: "h", length: -1},
		{name: "content length", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", method: "POST", target: "/", host: "h", length: 5},
		{name: "same length twice", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", method: "POST", target: "/", host: "h", length: 5},
		{name: "chunked", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n", method: "POST", target: "/", host: "h", length: -1, chunked: true},
		{name: "close", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, close\r\n\r\n", method: "GET", target: "/", host: "h", length: -1, close: true},
		{name: "upgrade", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", method: "GET", target: "/", host: "h", length: -1, upgrade: true},
		{name: "incomplete", in: "GET / HTTP/1.1\r\nHost: h\r\n", err: errIncomplete},
		{name: "too large", in: "GET / HTTP/1.1\r\nHost: h\r\nX: " + strings.Repeat("x", limit), err: errTooLarge},
		{name: "too large, complete", in: "GET / HTTP/1.1\r\nHost: h\r\nX: " + strings.Repeat("x", limit) + "\r\n\r\n", err: errTooLarge},
		{name: "length and chunked", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", err: errMalformed},
		{name: "chunked and length", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", err: errMalformed},
		{name: "two lengths", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", err: errMalformed},
		{name: "signed length", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", err: errMalformed},
		{name: "huge length", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", err: errMalformed},
		{name: "no host", in: "GET / HTTP/1.1\r\nX: y\r\n\r\n", err: errMalformed},
		{name: "two hosts", in: "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", err: errMalformed},
		{name: "space before colon", in: "GET / HTTP/1.1\r\nHost : h\r\n\r\n", err: errMalformed},
		{name: "folded line", in: "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", err: errMalformed},
		{name: "bare LF", in: "GET / HTTP/1.1\nHost: h\n\n", err: errMalformed},
		{name: "bare CR in a value", in: "GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", err: errMalformed},
		{name: "NUL in a value", in: "GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", err: errMalformed},
		{name: "bad method", in: "G(T / HTTP/1.1\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "bad version", in: "GET / HTTP/1.2\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "no version", in: "GET /\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "bad escape in the path", in: "GET /a%zz HTTP/1.1\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "short escape", in: "GET /a%4 HTTP/1.1\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "escapes", in: "GET /a%2Fb?q=%zz HTTP/1.1\r\nHost: h\r\n\r\n", method: "GET", target: "/a%2Fb?q=%zz", host: "h", length: -1},
		{name: "two spaces", in: "GET  / HTTP/1.1\r\nHost: h\r\n\r\n", err: errMalformed},
		{name: "h2 preface", in: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", err: errHandOff},
		{name: "absolute form", in: "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", err: errHandOff},
		{name: "connect", in: "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", err: errHandOff},
		{name: "gzip coding", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", err: errHandOff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r h1Request
			err := parseRequestHead([]byte(tc.in), limit, &r)
			if err != tc.err {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			if string(r.method) != tc.method || string(r.target) != tc.target || string(r.host) != tc.host ||
				r.contentLength != tc.length || r.chunked != tc.chunked || r.close != tc.close || r.upgrade != tc.upgrade {
				t.Errorf("got %s %s host %q length %d chunked %v close %v upgrade %v", r.method, r.target, r.host, r.contentLength, r.chunked, r.close, r.upgrade)
			}
			if tc.headLen != 0 && r.headLen != tc.headLen {
				t.Errorf("head of %d bytes, want %d", r.headLen, tc.headLen)
			}
		})
	}
}

func TestDecodeChunked(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		max            int64
		err            error
		n              int
	}{
		{name: "two chunks", in: "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT", want: "hello world", n: 32},
		{name: "trailers", in: "1\r\na\r\n0\r\nX-T: 1\r\n\r\n", want: "a", n: 19},
		{name: "empty", in: "0\r\n\r\n", want: "", n: 5},
		{name: "incomplete data", in: "5\r\nhel", err: errIncomplete},
		{name: "incomplete end", in: "1\r\na\r\n0\r\n", err: errIncomplete},
		{name: "over the limit", in: "5\r\nhello\r\n", max: 4, err: errTooLarge},
		{name: "bad size", in: "x\r\nhello\r\n", err: errMalformed},
		{name: "no CRLF after data", in: "1\r\nab\r\n0\r\n\r\n", err: errMalformed},
		{name: "size overflow", in: "ffffffffffffffffff\r\n", err: errMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			max := tc.max
			if max == 0 {
				max = 1 << 20
			}
			out, n, err := decodeChunked([]byte(tc.in), max, nil)
			if err != tc.err {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			if err == nil && (string(out) != tc.want || n != tc.n) {
				t.Errorf("decoded %q in %d bytes, want %q in %d", out, n, tc.want, tc.n)
			}
		})
	}
}

// FuzzParseRequestHead: no input panics the parser, and what it accepts
// net/http reads as the same request.
func FuzzParseRequestHead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
		"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x\r\nX: \t1\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var r h1Request
		err := parseRequestHead(in, 4096, &r)
		if err != nil {
			return
		}
		if r.headLen > len(in) {
			t.Fatalf("head of %d bytes in %d", r.headLen, len(in))
		}
		if r.chunked {
			decodeChunked(in[r.headLen:], 1<<20, nil)
		}
		hr, herr := http.ReadRequest(bufio.NewReader(bytes.NewReader(in[:r.headLen])))
		if herr != nil {
			t.Fatalf("accepted what net/http refuses (%v): %q", herr, in[:r.headLen])
		}
		if hr.Method != string(r.method) || hr.RequestURI != string(r.target) || hr.Host != string(r.host) {
			t.Fatalf("read %s %s host %q, net/http %s %s host %q", r.method, r.target, r.host, hr.Method, hr.RequestURI, hr.Host)
		}
	})
}

// rawExchange writes raw bytes to the edge and reads the responses that
// come back until the connection closes or n were read.
func rawExchange(t *testing.T, addr, in string, n int) ([]*http.Response, []string, bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, in); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // only a broken proxy waits this long
	br := bufio.NewReader(c)
	var resps []*http.Response
	var bodies []string
	for len(resps) < n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", len(resps)+1, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resps = append(resps, resp)
		bodies = append(bodies, string(b))
	}
	_, err = br.ReadByte()
	return resps, bodies, err == io.EOF
}

// TestFastPathFraming: pipelined requests are answered in order on one
// connection; chunked bodies are decoded and sent on with their length;
// bad framing is answered 400 and oversized heads 431, and the
// connection closes.
func TestFastPathFraming(t *testing.T) {
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1", MaxHeaderBytes: 1024})
	p.setState(factsOne(b), nil)

	resps, bodies, closed := rawExchange(t, p.EdgeAddr(),
		"GET /1 HTTP/1.1\r\nHost: demo.localhost\r\n\r\n"+
			"POST /2 HTTP/1.1\r\nHost: demo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"+
			"POST /3 HTTP/1.1\r\nHost: demo.localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\nxy", 3)
	for i, want := range []struct{ uri, body string }{{"/1", ""}, {"/2", "abcde"}, {"/3", "xy"}} {
		s := decode(t, bodies[i])
		if resps[i].StatusCode != 200 || s.URI != want.uri || s.Body != want.body || s.Header.Get("Transfer-Encoding") != "" {
			t.Errorf("request %d: %d, machine saw %s %q %v", i+1, resps[i].StatusCode, s.URI, s.Body, s.Header)
		}
	}
	if !closed || !resps[2].Close {
		t.Errorf("Connection: close not honoured (closed %v, %v)", closed, resps[2].Header)
	}

	hits := b.hits.Load()
	for _, tc := range []struct {
		name, in string
		status   int
	}{
		{"length and chunked", "POST / HTTP/1.1\r\nHost: demo.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"bad chunk", "POST / HTTP/1.1\r\nHost: demo.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400},
		{"folded header", "GET / HTTP/1.1\r\nHost: demo.localhost\r\nX: a\r\n b\r\n\r\n", 400},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"oversized head", "GET / HTTP/1.1\r\nHost: demo.localhost\r\nX: " + strings.Repeat("x", 8<<10) + "\r\n\r\n", 431},
	} {
		resps, _, closed := rawExchange(t, p.EdgeAddr(), tc.in, 1)
		if resps[0].StatusCode != tc.status || !closed {
			t.Errorf("%s: %d (closed %v), want %d and closed", tc.name, resps[0].StatusCode, closed, tc.status)
		}
	}
	if b.hits.Load() != hits {
		t.Errorf("a bad request reached the machine")
	}
}

// TestFastPathSlowloris: a client that trickles its head is cut off at the
// header timeout, one that never sends another request at the idle
// timeout.
func TestFastPathSlowloris(t *testing.T) {
	const timeout = 300 * time.Millisecond
	p := startProxy(t, Config{HostID: "ams-1", ReadHeaderTimeout: timeout, IdleTimeout: 2 * timeout})
	for _, tc := range []struct {
		name, in string
		atLeast  time.Duration
	}{
		{"trickled head", "GET / HTTP/1.1\r\nHost: demo.localhost\r\nX-Slow: ", timeout},
		{"idle", "", 2 * timeout},
	} {
		start := time.Now() // before the edge can have accepted: its timeouts start later
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, tc.in)
		stop := make(chan struct{})
		go func() { // the trickle: a byte now and then, never the end
			for tc.in != "" {
				select {
				case <-stop:
					return
				case <-time.After(timeout / 5):
					if _, err := io.WriteString(c, "x"); err != nil {
						return
					}
				}
			}
		}()
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err = c.Read(make([]byte, 1))
		close(stop)
		took := time.Since(start)
		c.Close()
		if ne, ok := err.(net.Error); ok && ne.Timeout() || err == nil || took < tc.atLeast {
			t.Errorf("%s: read %v after %v, want closed after %v", tc.name, err, took, tc.atLeast)
		}
	}
}

// TestFastPathMatchesNetHTTP: the same requests through the fast path and
// through net/http alone get the same status, headers and body, and the
// machine sees the same request.
func TestFastPathMatchesNetHTTP(t *testing.T) {
	b := startBackend(t, "m1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	streamer := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Connection", "X-Drop")
		w.Header().Set("X-Drop", "1")
		w.Header().Set("Server", "machine")
		w.Header().Set("Via", "1.1 app")
		for i := range 3 {
			fmt.Fprintf(w, "part %d\n", i)
			w.(http.Flusher).Flush()
		}
	})}
	go streamer.Serve(ln)
	t.Cleanup(func() { streamer.Close() })
	sm := machine("s1", "ams-1", ln.Addr().(*net.TCPAddr))
	sm.App = "stream"
	noMachine := machine("n1", "ams-1", b.addr)
	noMachine.App, noMachine.Started = "idle", false
	facts := route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", b.addr), sm, noMachine}}
	fast := startProxy(t, Config{HostID: "ams-1"})
	slow := startProxy(t, Config{HostID: "ams-1", DisableFastPath: true})
	fast.setState(facts, nil)
	slow.setState(facts, nil)

	type req struct {
		method, host, path, body string
		hdr                      map[string]string
	}
	for _, r := range []req{
		{"GET", "demo.localhost", "/a?b=c", "", map[string]string{"X-Forwarded-For": "203.0.113.1", "Connection": "X-Hop", "X-Hop": "1", hdrToken: "x", "Fly-Replay-Src": "forged"}},
		{"POST", "demo.localhost:80", "/p", "a body", map[string]string{"Fly-Prefer-Region": "ams"}},
		{"PUT", "demo.localhost", "/empty", "", nil},
		{"HEAD", "demo.localhost", "/h", "", nil},
		{"DELETE", "Demo.Localhost", "/d", "", nil},
		{"GET", "stream.localhost", "/s", "", nil},
		{"GET", "nope.localhost", "/", "", nil},
		{"GET", "idle.localhost", "/", "", nil},
	} {
		send := func(p *Proxy) (*http.Response, string) {
			var body io.Reader
			if r.body != "" {
				body = strings.NewReader(r.body)
			}
			hdr := map[string]string{"User-Agent": "equivalence"}
			for k, v := range r.hdr {
				hdr[k] = v
			}
			return do(t, http.DefaultClient, r.method, p.EdgeAddr(), r.host, r.path, hdr, body)
		}
		fr, fb := send(fast)
		sr, sb := send(slow)
		name := r.method + " " + r.host + r.path
		if fr.StatusCode != sr.StatusCode || fr.ContentLength != sr.ContentLength || !slices.Equal(fr.TransferEncoding, sr.TransferEncoding) {
			t.Errorf("%s: fast %d (length %d %v), net/http %d (length %d %v)", name, fr.StatusCode, fr.ContentLength, fr.TransferEncoding, sr.StatusCode, sr.ContentLength, sr.TransferEncoding)
		}
		if f, s := normalHeader(fr.Header), normalHeader(sr.Header); f != s {
			t.Errorf("%s: headers differ:\nfast    %s\nnet/http %s", name, f, s)
		}
		if strings.HasPrefix(fb, "{") {
			fs, ss := decode(t, fb), decode(t, sb)
			fs.Header.Del("Fly-Request-Id")
			ss.Header.Del("Fly-Request-Id")
			if f, s := fmt.Sprintf("%s %s %s %q %s", fs.Method, fs.URI, fs.Host, fs.Body, normalHeader(fs.Header)), fmt.Sprintf("%s %s %s %q %s", ss.Method, ss.URI, ss.Host, ss.Body, normalHeader(ss.Header)); f != s {
				t.Errorf("%s: the machine saw\nfast    %s\nnet/http %s", name, f, s)
			}
			if fs.Header.Get("User-Agent") != "equivalence" {
				t.Errorf("%s: user agent %q", name, fs.Header.Get("User-Agent"))
			}
			continue
		}
		fb = regexpRequestID.ReplaceAllString(fb, "ID")
		sb = regexpRequestID.ReplaceAllString(sb, "ID")
		if fb != sb {
			t.Errorf("%s: bodies differ:\nfast    %q\nnet/http %q", name, fb, sb)
		}
	}
}

var regexpRequestID = regexp.MustCompile(`[0-9A-HJKMNP-TV-Z]{26}-[a-z]+`)

// normalHeader prints a header without what differs per request.
func normalHeader(h http.Header) string {
	h = h.Clone()
	for _, k := range []string{"Date", "Fly-Request-Id"} {
		if len(h[k]) != 1 && k == "Fly-Request-Id" {
			return fmt.Sprintf("%d request ids", len(h[k]))
		}
		delete(h, k)
	}
	var b strings.Builder
	h.Write(&b)
	return strings.ReplaceAll(b.String(), "\r\n", "; ")
}

// TestH2CEdge: a client speaking HTTP/2 with prior knowledge is answered
// in HTTP/2, through the edge's usual routing, and its connection ends
// with the proxy.
func TestH2CEdge(t *testing.T) {
	for _, disable := range []bool{false, true} {
		t.Run(fmt.Sprintf("DisableFastPath=%v", disable), func(t *testing.T) { testH2C(t, disable) })
	}
}

func testH2C(t *testing.T, disableFastPath bool) {
	b := startBackend(t, "m1")
	// The connection outlives the header timeout: it is idle between its
	// requests longer than that, and is kept.
	const headerTimeout = 100 * time.Millisecond
	p := startProxy(t, Config{HostID: "ams-1", DisableFastPath: disableFastPath, ReadHeaderTimeout: headerTimeout})
	p.setState(factsOne(b), nil)
	protos := new(http.Protocols)
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protos}
	defer tr.CloseIdleConnections()
	var conns atomic.Int64
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conns.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	client := &http.Client{Transport: tr}
	for i := range 3 {
		if i > 0 {
			time.Sleep(3 * headerTimeout)
		}
		resp, body := do(t, client, "POST", p.EdgeAddr(), "demo.localhost", "/h2", nil, strings.NewReader(fmt.Sprint("body ", i)))
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("%d over %s: %s", resp.StatusCode, resp.Proto, body)
		}
		if n := conns.Load(); n != 1 {
			t.Fatalf("request %d: %d connections, want the first kept", i, n)
		}
		s := decode(t, body)
		if s.Body != fmt.Sprint("body ", i) || s.Header.Get("Fly-Region") != "ams" || s.Header.Get("X-Forwarded-For") != "127.0.0.1" {
			t.Errorf("machine saw %+v", s)
		}
		if resp.Header.Get("Via") != "1.1 flame" || !strings.HasSuffix(resp.Header.Get("Fly-Request-Id"), "-ams") {
			t.Errorf("response headers %v", resp.Header)
		}
	}
	resp, _ := get(t, client, p.EdgeAddr(), "nope.localhost", nil)
	if resp.StatusCode != 404 || resp.ProtoMajor != 2 {
		t.Errorf("unknown host over h2c: %d %s", resp.StatusCode, resp.Proto)
	}
}

// TestFastPathCloseLeavesNothing: after Close no goroutine of the proxy's
// and no connection to a machine is left, with client connections open on
// the fast path, handed to net/http, and over h2c.
func TestFastPathCloseLeavesNothing(t *testing.T) {
	var open atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }),
		ConnState: func(c net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				open.Add(1)
			case http.StateClosed, http.StateHijacked:
				open.Add(-1)
			}
		}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)

	// A keep-alive connection on the fast path, one handed over (its first
	// request names an unknown host), one over h2c, one idle before any
	// request, and one half way through its head.
	var conns []net.Conn
	for _, in := range []string{
		"GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: nope.localhost\r\n\r\n",
		"", "GET / HTTP/1.1\r\nHost: dem",
	} {
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, in)
		if strings.HasSuffix(in, "\r\n\r\n") {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}
		conns = append(conns, c)
	}
	protos := new(http.Protocols)
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protos}
	defer tr.CloseIdleConnections()
	if resp, _ := get(t, &http.Client{Transport: tr}, p.EdgeAddr(), "demo.localhost", nil); resp.ProtoMajor != 2 {
		t.Fatalf("not h2c: %s", resp.Proto)
	}
	if open.Load() == 0 {
		t.Fatal("no connection to the machine was kept")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("Close did not return")
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.Copy(io.Discard, c); err != nil {
			t.Errorf("connection %d: %v, want closed", i, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		left := strings.Contains(stacks, "internal/proxy.(*")
		if !left && open.Load() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("left after Close: %d connections to the machine; goroutines:\n%s", open.Load(), stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFastPathClientLeaves: a client that leaves while its machine has not
// answered ends the attempt: the machine's connection is closed and the
// request no longer counts in flight.
func TestFastPathClientLeaves(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	upClosed := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(60 * time.Second)) // only a broken proxy keeps it this long
		io.Copy(io.Discard, c)                              // takes the request, never answers
		close(upClosed)
	}()
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
	deadline := time.Now().Add(30 * time.Second)
	for p.InFlight()["m1"] != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the request never reached the machine")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Close()
	select {
	case <-upClosed:
	case <-time.After(30 * time.Second):
		t.Fatal("the machine's connection stayed open after the client left")
	}
	for len(p.InFlight()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still in flight: %v", p.InFlight())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFastPathClientLeavesAStream: a client that leaves a streamed answer
// while the machine is silent ends it too.
func TestFastPathClientLeavesAStream(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select { // silent until the client's leaving reaches here
		case <-r.Context().Done():
			close(ended)
		case <-time.After(60 * time.Second):
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "first\n" || resp.TransferEncoding == nil {
		t.Fatalf("first chunk %q %v (%v)", line, err, resp.TransferEncoding)
	}
	c.Close()
	select {
	case <-ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the machine's stream went on after the client left")
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(p.InFlight()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still in flight: %v", p.InFlight())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFastPathAllocatesNothing: a GET through the fast path to a machine
// on this host allocates nothing in the process (client and machine
// allocate nothing either), once its connections are open.
func TestFastPathAllocatesNothing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go leanBackend(ln)
	p := startProxy(t, Config{HostID: "ams-1", Logger: slog.New(slog.DiscardHandler)})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)
	requestsAllocateNothing(t, p.EdgeAddr())
}

// requestsAllocateNothing sends GETs on one connection to the edge at addr
// and fails t unless, once the first has opened the connections, a request
// allocates nothing in the process.
func requestsAllocateNothing(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := []byte("GET /x?y=1 HTTP/1.1\r\nHost: demo.localhost\r\nUser-Agent: t\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
	br := bufio.NewReaderSize(c, 16<<10)
	var failed error
	one := func() {
		if _, err := c.Write(req); err != nil {
			failed = err
			return
		}
		if err := readLeanResponse(br); err != nil {
			failed = err
		}
	}
	one() // the pooled connection to the machine opens here
	if n := testing.AllocsPerRun(500, one); n != 0 || failed != nil {
		t.Errorf("%v allocations per request (err %v)", n, failed)
	}
}

// TestFastPathCloseCutsHangingRequests: a request still waiting on its
// machine when Close's grace ends is cut, and not sent on to the next
// candidate.
func TestFastPathCloseCutsHangingRequests(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // takes requests, never answers
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(60 * time.Second))
				io.Copy(io.Discard, c)
			}()
		}
	}()
	good := startBackend(t, "good")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{
		machine("hang", "ams-1", ln.Addr().(*net.TCPAddr)), machine("good", "ams-1", good.addr),
	}, Load: map[string]int{"good": 5}}, nil) // hang first
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
	deadline := time.Now().Add(30 * time.Second)
	for p.InFlight()["hang"] != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the request never reached the hanging machine")
		}
		time.Sleep(5 * time.Millisecond)
	}
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(60 * time.Second):
		t.Fatal("Close did not return")
	}
	if n := good.hits.Load(); n != 0 {
		t.Errorf("the cut request went on to the next machine (%d)", n)
	}
}
