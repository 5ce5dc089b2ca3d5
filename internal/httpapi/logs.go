package httpapi

import (
	"encoding/json"
	"errors"
	"net/http"
	"sync"

	"github.com/flamehq/flame/api"
)

// errStreamClosed is what emit answers once the handler has returned.
var errStreamClosed = errors.New("log stream closed")

// logs answers GET .../logs?tail=N&follow=true as newline-delimited JSON, one
// api.LogEntry per line.
//
// Without follow, the status waits for the first line, so a backend error
// before any output still answers with its own status. With follow, the
// machine is looked up first (so a missing one is a 404), then the 200 goes
// out at once and every line is flushed as it comes, until the client goes
// away. A backend error after output has begun ends the stream with a last
// line {"error": "..."}.
func (s *Server) logs(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	var o api.LogOptions
	if o.Tail, err = parseUint(q, "tail", 0); err != nil {
		return err
	}
	if o.Follow, err = parseBool(q, "follow"); err != nil {
		return err
	}

	ctx := r.Context()
	st := &logStream{w: w, rc: http.NewResponseController(w), flush: o.Follow}
	if o.Follow {
		if _, err := s.backend.GetMachine(ctx, ref); err != nil {
			return err
		}
		key := ""
		if s.followBy != nil {
			key = s.followBy(ctx)
		}
		var done func()
		if ctx, done, err = s.follows.Admit(w, r, key); err != nil {
			return err
		}
		defer done()
		st.mu.Lock()
		st.begin()
		st.mu.Unlock()
	}
	err = s.backend.MachineLogs(ctx, ref, o, st.emit)

	st.mu.Lock()
	defer st.mu.Unlock()
	st.closed = true
	switch {
	case st.writeErr != nil || ctx.Err() != nil:
		// The client went away; that ends a stream normally.
		return nil
	case err == nil:
		st.begin()
		return nil
	case !st.began:
		return err
	}
	s.log.Error("log stream failed", "app", ref.App, "machine", ref.ID, "err", err)
	msg := "log stream failed"
	var ae *api.Error
	if errors.As(err, &ae) {
		msg = ae.Error()
	}
	b, _ := json.Marshal(api.ErrorBody{Error: msg})
	st.write(b)
	return nil
}

// logStream writes log lines to a response. The backend may call emit from
// any goroutine, but never after the handler has returned.
type logStream struct {
	mu       sync.Mutex
	w        http.ResponseWriter
	rc       *http.ResponseController
	flush    bool
	began    bool
	closed   bool
	writeErr error
}

// begin sends the status and headers if they have not gone yet. Callers
// hold mu.
func (st *logStream) begin() {
	if st.began {
		return
	}
	st.began = true
	st.w.Header().Set("Content-Type", "application/x-ndjson")
	st.w.Header().Set("Cache-Control", "no-store")
	st.w.Header().Set("X-Content-Type-Options", "nosniff")
	st.w.WriteHeader(http.StatusOK)
	st.flushNow()
}

// flushNow pushes what is buffered to the client when following. Callers
// hold mu.
func (st *logStream) flushNow() {
	if !st.flush || st.writeErr != nil {
		return
	}
	if err := st.rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		st.writeErr = err
	}
}

// write sends one line. Callers hold mu.
func (st *logStream) write(line []byte) {
	st.begin()
	if st.writeErr != nil {
		return
	}
	if _, err := st.w.Write(append(line, '\n')); err != nil {
		st.writeErr = err
		return
	}
	st.flushNow()
}

func (st *logStream) emit(e api.LogEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return errStreamClosed
	}
	st.write(b)
	return st.writeErr
}
