// Package httpapi serves Fly's Machines API over HTTP for any api.Backend.
//
// It turns requests into Backend calls and their results back into Fly's
// JSON shapes, and it owns everything that is about HTTP rather than about
// machines: authentication, routing, strict decoding of bodies and query
// parameters, error rendering, panic recovery and request logging. Semantic
// checks (is this image valid, is this signal known, is the lease held) are
// the Backend's; it answers them with *api.Error values, which travel to the
// client with their status and message.
//
// Routes, under /v1/apps/{app}/machines (M is /{id} below it):
//
//	GET    /                  list: ?region= ?include_deleted= ?metadata.{key}= ?state=
//	POST   /                  create (api.LaunchMachineInput)
//	GET    M                  get
//	POST   M                  update (api.LaunchMachineInput, whole config)
//	DELETE M                  destroy: ?force=true or ?kill=true for a running one
//	POST   M/start            → api.StartResponse
//	POST   M/stop             optional {signal, timeout}
//	POST   M/restart          ?force_stop= ?timeout= ?signal=
//	POST   M/signal           {signal} (a name, or a number as Fly's client sends)
//	POST   M/suspend
//	GET    M/wait             ?state= (repeatable) ?timeout=<s, ≤60> ?instance_id= (or ?version=)
//	GET    M/lease            POST M/lease ({ttl, description} or ?ttl=); DELETE M/lease
//	POST   M/cordon           POST M/uncordon
//	GET    M/events           GET M/versions; GET M/ps
//	POST   M/exec             {command: [...]} or {cmd: "a shell-style line"}
//	GET    M/logs             ?tail= ?follow= → application/x-ndjson, one api.LogEntry a line
//	GET    M/metadata         GET, POST {value}, DELETE M/metadata/{key}
//
// Calls that answer nothing else answer {"ok": true}; metadata writes answer
// 204. Errors are {"error": "message"}. The lease nonce header
// (api.LeaseNonceHeader) reaches the Backend on every call in api.MachineRef.
package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/flamehq/flame/api"
)

// DefaultMaxBodyBytes caps a request body when Config.MaxBodyBytes is zero.
const DefaultMaxBodyBytes = 1 << 20

// Config wires a Server.
type Config struct {
	// Backend answers every call. Required.
	Backend api.Backend
	// Authenticate vets each request before it is routed and returns the
	// context the request goes on with (it may carry who is calling, for the
	// Backend to check what they may see). An error answers 401 with the
	// error's message, or the status of an *api.Error it returns (401 or
	// 403). Nil lets every request in.
	Authenticate func(r *http.Request) (context.Context, error)
	// Logger receives one debug line per request and an error line per
	// failure the client cannot see the cause of. Nil discards.
	Logger *slog.Logger
	// MaxBodyBytes caps a request body (413 beyond it); 0 means
	// DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// MapError, if set, may turn an error a backend or route returned into
	// an *api.Error (a store that is unavailable into 503, say) before it
	// is answered.
	MapError func(error) error
	// Follows counts followed log streams against their limits; nil
	// makes one with the defaults. FollowKey names whose streams a
	// request's are (from the context Authenticate returned); nil or ""
	// counts them only against the total.
	Follows   *Follows
	FollowKey func(context.Context) string
}

// Validate reports a Config that New cannot use.
func (c Config) Validate() error {
	if c.Backend == nil {
		return errors.New("httpapi: no backend")
	}
	if c.MaxBodyBytes < 0 {
		return fmt.Errorf("httpapi: negative body limit %d", c.MaxBodyBytes)
	}
	return nil
}

// Server serves the Machines API. It is an http.Handler.
type Server struct {
	backend  api.Backend
	mapError func(error) error
	auth     func(*http.Request) (context.Context, error)
	log      *slog.Logger
	maxBody  int64
	mux      *http.ServeMux
	follows  *Follows
	followBy func(context.Context) string
}

// New builds a Server from cfg.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Server{
		backend:  cfg.Backend,
		mapError: cfg.MapError,
		auth:     cfg.Authenticate,
		log:      cfg.Logger,
		maxBody:  cfg.MaxBodyBytes,
		mux:      http.NewServeMux(),
		follows:  cfg.Follows,
		followBy: cfg.FollowKey,
	}
	if s.follows == nil {
		s.follows = NewFollows(FollowLimits{})
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "httpapi")
	if s.maxBody == 0 {
		s.maxBody = DefaultMaxBodyBytes
	}
	s.routes()
	return s, nil
}

// Handler returns the Server as an http.Handler.
func (s *Server) Handler() http.Handler { return s }

func (s *Server) routes() {
	const m = "/v1/apps/{app}/machines/{id}"
	s.route("GET /v1/apps/{app}/machines", s.listMachines)
	s.route("POST /v1/apps/{app}/machines", s.createMachine)
	s.route("GET "+m, s.getMachine)
	s.route("POST "+m, s.updateMachine)
	s.route("DELETE "+m, s.destroyMachine)

	s.route("POST "+m+"/start", s.startMachine)
	s.route("POST "+m+"/stop", s.stopMachine)
	s.route("POST "+m+"/restart", s.restartMachine)
	s.route("POST "+m+"/signal", s.signalMachine)
	s.route("POST "+m+"/suspend", s.suspendMachine)
	s.route("GET "+m+"/wait", s.waitMachine)

	s.route("GET "+m+"/lease", s.getLease)
	s.route("POST "+m+"/lease", s.acquireLease)
	s.route("DELETE "+m+"/lease", s.releaseLease)

	s.route("POST "+m+"/cordon", s.cordon(true))
	s.route("POST "+m+"/uncordon", s.cordon(false))
	s.route("GET "+m+"/events", s.events)
	s.route("GET "+m+"/versions", s.versions)
	s.route("GET "+m+"/ps", s.processes)
	s.route("POST "+m+"/exec", s.exec)
	s.route("GET "+m+"/logs", s.logs)

	s.route("GET "+m+"/metadata", s.metadata)
	s.route("GET "+m+"/metadata/{key}", s.getMetadataKey)
	s.route("POST "+m+"/metadata/{key}", s.setMetadataKey)
	s.route("DELETE "+m+"/metadata/{key}", s.deleteMetadataKey)
}

// Handle adds a route beside the Machines API's (a control plane serves its
// apps, secrets and regions this way), with the same authentication, body
// limit, error rendering, panic recovery and logging. Register routes
// before serving.
func (s *Server) Handle(pattern string, h func(http.ResponseWriter, *http.Request) error) {
	s.route(pattern, h)
}

// route registers h for pattern; an error h returns becomes the response.
func (s *Server) route(pattern string, h func(http.ResponseWriter, *http.Request) error) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if err := h(w, r); err != nil {
			s.fail(w, r, err)
		}
	})
}

// ServeHTTP recovers panics, logs the request, authenticates it, caps its
// body and routes it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rw := &responseWriter{ResponseWriter: w}
	defer func() {
		v := recover()
		abort := v == http.ErrAbortHandler || (v != nil && rw.wroteHeader)
		if v != nil && v != http.ErrAbortHandler {
			s.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path,
				"panic", v, "stack", string(debug.Stack()))
			if !rw.wroteHeader {
				writeError(rw, http.StatusInternalServerError, "internal error")
			}
		}
		s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery,
			"status", rw.status, "bytes", rw.bytes, "duration", time.Since(start))
		if abort {
			// Part of a response is out: cut the connection so the
			// client sees it truncated rather than complete.
			panic(http.ErrAbortHandler)
		}
	}()

	if s.auth != nil {
		ctx, err := s.auth(r)
		if err != nil {
			s.unauthorized(rw, err)
			return
		}
		r = r.WithContext(ctx)
	}
	// The underlying writer, so the server also closes the connection after
	// an oversized body.
	r.Body = http.MaxBytesReader(w, r.Body, s.maxBody)

	if h, pattern := s.mux.Handler(r); pattern == "" {
		s.unrouted(rw, r, h)
		return
	}
	s.mux.ServeHTTP(rw, r)
}

func (s *Server) unauthorized(w http.ResponseWriter, err error) {
	var ae *api.Error
	if errors.As(err, &ae) && ae.Status >= 500 && ae.Status <= 599 {
		// The authenticator could not decide (its store is unavailable):
		// that is not the client's fault, and it may retry.
		s.log.Warn("authentication unavailable", "err", err)
		writeError(w, ae.Status, ae.Error())
		return
	}
	if errors.As(err, &ae) && (ae.Status == http.StatusUnauthorized || ae.Status == http.StatusForbidden) {
		if ae.Status == http.StatusUnauthorized {
			w.Header().Set("WWW-Authenticate", `Bearer realm="flame"`)
		}
		writeError(w, ae.Status, ae.Error())
		return
	}
	// Whatever else went wrong is the authenticator's business, not the
	// client's.
	s.log.Debug("authentication failed", "err", err)
	w.Header().Set("WWW-Authenticate", `Bearer realm="flame"`)
	writeError(w, http.StatusUnauthorized, "unauthorized")
}

// unrouted answers a request no route matches: it lets the mux decide
// between a redirect (unclean path), 404 and 405, then answers in JSON.
func (s *Server) unrouted(w http.ResponseWriter, r *http.Request, h http.Handler) {
	c := &captureWriter{header: make(http.Header)}
	h.ServeHTTP(c, r)
	switch {
	case c.status >= 300 && c.status < 400:
		w.Header().Set("Location", c.header.Get("Location"))
		w.WriteHeader(c.status)
	case c.status == http.StatusMethodNotAllowed:
		w.Header().Set("Allow", c.header.Get("Allow"))
		writeError(w, c.status, fmt.Sprintf("method %s not allowed on %s", clip(r.Method), clip(r.URL.Path)))
	default:
		writeError(w, http.StatusNotFound, fmt.Sprintf("no route for %s %s", clip(r.Method), clip(r.URL.Path)))
	}
}

// responseWriter records what a handler wrote, for logging and for deciding
// whether an error can still be answered with a status.
type responseWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func (w *responseWriter) WriteHeader(status int) {
	if !w.wroteHeader {
		w.status, w.wroteHeader = status, true
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.status, w.wroteHeader = http.StatusOK, true
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the connection's flusher.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *responseWriter) committed() bool { return w.wroteHeader }

// captureWriter keeps the status and headers the mux's own answers set.
type captureWriter struct {
	header http.Header
	status int
}

func (c *captureWriter) Header() http.Header { return c.header }

func (c *captureWriter) WriteHeader(status int) {
	if c.status == 0 {
		c.status = status
	}
}

func (c *captureWriter) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	return io.Discard.Write(b)
}
