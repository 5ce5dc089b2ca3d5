// Package httpserve bounds how long a client may hold any HTTP server Flame
// runs: every http.Server in the code is built by New or passed through
// Apply (a test fails otherwise).
//
// The bounds are those of nginx rather than net/http's whole-request
// ReadTimeout and WriteTimeout, which would cut a followed log or an
// event stream after a fixed time however healthy:
//
//   - ReadHeader: the request line and headers, in all (a slowloris that
//     trickles header lines is cut at it).
//   - Body: between two reads of a request's body (a client that stops
//     sending its body is cut). Handlers that bound a body in all (the
//     edge's buffered bodies) set their own deadline; Body 0 leaves them be.
//   - Write: between two writes of a response, so a stream may last as
//     long as it makes progress, while a client that stops reading is cut
//     one Write after the write that blocks (plus at most Write/32, the
//     slack that keeps a deadline from moving on every write).
//   - Idle: a keep-alive connection waiting for its next request.
//
// A handler that hijacks its connection gets it with no deadline: it owns
// the connection's bounds from then on.
package httpserve

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// Limits are a server's bounds; zero fields take the defaults.
type Limits struct {
	ReadHeader time.Duration // default 10 s
	Body       time.Duration // between body reads; default 60 s; <0: none
	Write      time.Duration // between response writes; default 60 s
	Idle       time.Duration // default 120 s
	// MaxHeaderBytes bounds a request's headers (default 64 KiB).
	MaxHeaderBytes int
}

// Defaults.
const (
	DefaultReadHeader     = 10 * time.Second
	DefaultBody           = 60 * time.Second
	DefaultWrite          = 60 * time.Second
	DefaultIdle           = 120 * time.Second
	DefaultMaxHeaderBytes = 64 << 10
)

// slackDiv: a write deadline is kept while it falls within Write/slackDiv
// of the one wanted, so it moves about once per slack, not on every write.
const slackDiv = 32

// defaults are the package's defaults unless a test lowered them.
var defaults atomic.Pointer[Limits]

// SetDefaults replaces the defaults of every server built afterwards in
// this process, until restore is called: a test lowers them to see real
// servers cut slow clients in a fraction of a second. Servers already
// built keep theirs. Not for concurrent tests.
func SetDefaults(l Limits) (restore func()) {
	old := defaults.Swap(&l)
	return func() { defaults.Store(old) }
}

// WithDefaults returns l with every zero field set to its default.
func (l Limits) WithDefaults() Limits {
	d := Limits{ReadHeader: DefaultReadHeader, Body: DefaultBody, Write: DefaultWrite,
		Idle: DefaultIdle, MaxHeaderBytes: DefaultMaxHeaderBytes}
	if p := defaults.Load(); p != nil {
		d = *p
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&l.ReadHeader, d.ReadHeader)
	def(&l.Body, d.Body)
	def(&l.Write, d.Write)
	def(&l.Idle, d.Idle)
	if l.MaxHeaderBytes == 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	return l
}

// New returns a server for h with l's bounds.
func New(h http.Handler, l Limits) *http.Server {
	return Apply(&http.Server{Handler: h}, l)
}

// Apply sets l's bounds on srv (built with its other fields) and returns
// it: the header, idle and header-size bounds as net/http's, the body and
// write bounds by wrapping its handler. It clears ReadTimeout and
// WriteTimeout, whose whole-request bounds would cut streams.
func Apply(srv *http.Server, l Limits) *http.Server {
	l = l.WithDefaults()
	srv.ReadHeaderTimeout, srv.IdleTimeout, srv.MaxHeaderBytes = l.ReadHeader, l.Idle, l.MaxHeaderBytes
	srv.ReadTimeout, srv.WriteTimeout = 0, 0
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	srv.Handler = Handler(h, l)
	return srv
}

// Handler wraps h so each request's body reads and response writes are
// bounded by l.Body and l.Write (defaults for zero fields).
func Handler(h http.Handler, l Limits) http.Handler {
	l = l.WithDefaults()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dw := &writer{ResponseWriter: w, rc: http.NewResponseController(w), write: l.Write}
		dw.extend()
		var b *body
		if l.Body > 0 && r.Body != nil && r.Body != http.NoBody {
			b = &body{ReadCloser: r.Body, rc: dw.rc, idle: l.Body, w: dw}
			b.arm()
			r.Body = b
		}
		defer func() {
			// The server discards a body the handler left unread, and
			// sends what the handler left buffered, after it returns:
			// under these deadlines.
			if b != nil && !b.done {
				b.arm()
			}
			dw.extend()
		}()
		h.ServeHTTP(dw, r)
	})
}

// writer moves the connection's write deadline ahead of each write.
type writer struct {
	http.ResponseWriter
	rc       *http.ResponseController
	write    time.Duration
	at       time.Time // the deadline as last set
	hijacked bool
}

// extend makes the write deadline fall within [now+write, now+write+slack].
func (w *writer) extend() {
	if w.hijacked {
		return
	}
	want := time.Now().Add(w.write)
	if !w.at.Before(want) && w.at.Sub(want) <= w.write/slackDiv {
		return
	}
	w.at = want.Add(w.write / slackDiv)
	w.rc.SetWriteDeadline(w.at)
}

func (w *writer) Write(b []byte) (int, error) {
	w.extend()
	return w.ResponseWriter.Write(b)
}

func (w *writer) FlushError() error {
	w.extend()
	return w.rc.Flush()
}

func (w *writer) Flush() { _ = w.FlushError() }

// Hijack hands over the connection with its deadlines cleared.
func (w *writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := w.rc.Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.hijacked = true
	if err := c.SetDeadline(time.Time{}); err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, brw, nil
}

// Unwrap lets http.ResponseController reach the server's writer.
func (w *writer) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// body sets a read deadline ahead of each read of a request's body and
// clears it at the end, so the server's watch for the client going away
// (a read left pending after the body) is not cut by it.
type body struct {
	io.ReadCloser
	rc   *http.ResponseController
	idle time.Duration
	w    *writer
	done bool
}

// arm sets the read deadline one Body from now.
func (b *body) arm() {
	if !b.w.hijacked {
		b.rc.SetReadDeadline(time.Now().Add(b.idle))
	}
}

func (b *body) Read(p []byte) (int, error) {
	if b.done || b.w.hijacked {
		return b.ReadCloser.Read(p)
	}
	b.arm()
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.done = true
		if errors.Is(err, io.EOF) {
			b.rc.SetReadDeadline(time.Time{})
		}
	}
	return n, err
}
