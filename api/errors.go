package api

import (
	"fmt"
	"net/http"
)

// Error is an API error: an HTTP status and a message. It travels as
// {"error": "message"} and comes back from the client as the same *Error, so
// callers on both sides test it with errors.Is against the sentinels below.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return http.StatusText(e.Status)
	}
	return e.Message
}

// Is reports whether target is a sentinel (an *Error without message) of the
// same status.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Status == e.Status
}

// Errorf returns an *Error with the given status and a formatted message.
func Errorf(status int, format string, args ...any) *Error {
	return &Error{Status: status, Message: fmt.Sprintf(format, args...)}
}

// Sentinels, one per status the Machines API answers with.
var (
	ErrBadRequest     = &Error{Status: http.StatusBadRequest}          // malformed input
	ErrUnauthorized   = &Error{Status: http.StatusUnauthorized}        // no or bad token
	ErrForbidden      = &Error{Status: http.StatusForbidden}           // token lacks the right
	ErrNotFound       = &Error{Status: http.StatusNotFound}            // no such app or machine
	ErrTimeout        = &Error{Status: http.StatusRequestTimeout}      // a wait ran out
	ErrConflict       = &Error{Status: http.StatusConflict}            // lease held, wrong state
	ErrPrecondition   = &Error{Status: http.StatusPreconditionFailed}  // version mismatch
	ErrUnprocessable  = &Error{Status: http.StatusUnprocessableEntity} // invalid config
	ErrNotImplemented = &Error{Status: http.StatusNotImplemented}      // not supported here
	ErrInternal       = &Error{Status: http.StatusInternalServerError}
	ErrUnavailable    = &Error{Status: http.StatusServiceUnavailable}
)

// ErrorBody is the JSON shape of an error response.
type ErrorBody struct {
	Error string `json:"error"`
}
