package httpapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/flamehq/flame/api"
)

// statusClientClosed is logged (and nominally answered) when the client went
// away before its call finished; nobody is left to read it.
const statusClientClosed = 499

// writeJSON answers v as JSON with the given status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only a value the API types cannot hold gets here.
		writeError(w, http.StatusInternalServerError, "internal error: encoding response")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// writeOK answers {"ok": true}.
func writeOK(w http.ResponseWriter) { WriteJSON(w, http.StatusOK, api.OK{OK: true}) }

// writeError answers {"error": msg} with status, unless a response is
// already under way.
func writeError(w http.ResponseWriter, status int, msg string) {
	if c, ok := w.(interface{ committed() bool }); ok && c.committed() {
		return
	}
	WriteJSON(w, status, api.ErrorBody{Error: msg})
}

// fail answers err: an *api.Error with its own status and message, an
// oversized body with 413, anything else with 500 and a generic message
// (the real error goes to the log).
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	if s.mapError != nil {
		err = s.mapError(err)
	}
	var (
		ae  *api.Error
		mbe *http.MaxBytesError
	)
	switch {
	case errors.As(err, &mbe):
		writeError(w, http.StatusRequestEntityTooLarge,
			fmt.Sprintf("request body larger than %d bytes", mbe.Limit))
	case errors.As(err, &ae) && ae.Status >= 400 && ae.Status <= 599:
		if ae.Status >= 500 {
			s.log.Error("backend failed", "method", r.Method, "path", r.URL.Path, "status", ae.Status, "err", err)
		}
		writeError(w, ae.Status, ae.Error())
	case r.Context().Err() != nil && errors.Is(err, r.Context().Err()):
		s.log.Debug("client went away", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, statusClientClosed, "client closed request")
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "internal error")
	}
}

// badRequest is a 400 with a formatted message.
func badRequest(format string, args ...any) error {
	return api.Errorf(http.StatusBadRequest, format, args...)
}

// clip shortens client-supplied text echoed in messages.
func clip(s string) string { return api.Clip(s, 80) }
