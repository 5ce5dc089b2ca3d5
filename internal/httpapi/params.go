package httpapi

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
)

// validApp reports whether s has the shape of a Fly app name: lowercase
// letters, digits and dashes, at most 63 of them, not starting or ending with
// a dash.
func validApp(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// validMachineID reports whether s has the shape of a machine id.
func validMachineID(s string) bool { return api.ValidMachineID(s) }

// validMetadataKey reports whether s is a usable metadata key.
func validMetadataKey(s string) bool { return api.ValidMetadataKey(s) }

// appParam is the request's {app}, checked for shape.
func appParam(r *http.Request) (string, error) {
	app := r.PathValue("app")
	if !validApp(app) {
		return "", badRequest("invalid app name %q: want lowercase letters, digits and dashes", clip(app))
	}
	return app, nil
}

// machineRef is the machine the request names, with the lease nonce it
// carries. An id of the wrong shape names no machine: 404.
func machineRef(r *http.Request) (api.MachineRef, error) {
	app, err := appParam(r)
	if err != nil {
		return api.MachineRef{}, err
	}
	id := r.PathValue("id")
	if !validMachineID(id) {
		return api.MachineRef{}, api.Errorf(http.StatusNotFound, "machine %q not found", clip(id))
	}
	return api.MachineRef{App: app, ID: id, LeaseNonce: leaseNonce(r)}, nil
}

// leaseNonce is the lease nonce header. Fly's client builds the header map
// itself with the lowercase name, so a request built in-process (not parsed
// off the wire) may carry it uncanonicalized.
func leaseNonce(r *http.Request) string {
	if v := r.Header.Get(api.LeaseNonceHeader); v != "" {
		return strings.TrimSpace(v)
	}
	//lint:ignore SA1008 the raw lowercase key is the point: in-process requests skip canonicalization
	if vs := r.Header[api.LeaseNonceHeader]; len(vs) > 0 {
		return strings.TrimSpace(vs[0])
	}
	return ""
}

// query parses the query string strictly.
func query(r *http.Request) (url.Values, error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, badRequest("malformed query string: %v", err)
	}
	return q, nil
}

// lastValue is the last value of query parameter name ("" when absent).
func lastValue(q url.Values, name string) string {
	vs := q[name]
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

// parseUint reads a non-negative integer query parameter (def when absent).
func parseUint(q url.Values, name string, def int) (int, error) {
	v := lastValue(q, name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, badRequest("invalid %s=%q: want a non-negative integer", name, clip(v))
	}
	return n, nil
}

// parseTimeout reads a timeout query parameter given as whole seconds ("30")
// or a Go duration ("30s", "1m0s", as Fly's client sends it); absent is 0.
func parseTimeout(q url.Values, name string) (time.Duration, error) {
	v := lastValue(q, name)
	if v == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 || n > int64(24*time.Hour/time.Second) {
			return 0, badRequest("invalid %s=%q: want seconds between 0 and 86400", name, clip(v))
		}
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, badRequest("invalid %s=%q: want seconds or a duration like \"30s\"", name, clip(v))
	}
	return d, nil
}

// waitStates are the states a wait may wait for.
var waitStates = map[string]bool{
	api.StateCreated:   true,
	api.StateStarted:   true,
	api.StateStopped:   true,
	api.StateSuspended: true,
	api.StateFailed:    true,
	api.StateDestroyed: true,
	api.StateReplaced:  true,
}

// machineStates are every state a machine can be in, for list filters:
// the lifecycle's list.
var machineStates = func() map[string]bool {
	out := map[string]bool{}
	for _, st := range machine.States() {
		out[string(st)] = true
	}
	return out
}()

// parseStates reads a state parameter, repeated or comma-separated, checking
// every value against allowed. Duplicates are dropped; order is kept.
func parseStates(q url.Values, name string, allowed map[string]bool) ([]string, error) {
	var out []string
	seen := make(map[string]bool)
	for _, v := range q[name] {
		for s := range strings.SplitSeq(v, ",") {
			s = strings.TrimSpace(s)
			if s == "" {
				continue
			}
			if !allowed[s] {
				return nil, badRequest("invalid %s=%q: not a state this call knows", name, clip(s))
			}
			if !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
	}
	return out, nil
}

// signalNames maps the signal numbers clients send to the names the backend
// takes (Linux numbering).
var signalNames = map[int]string{
	1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
	7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
	13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 17: "SIGCHLD", 18: "SIGCONT",
	19: "SIGSTOP", 20: "SIGTSTP", 28: "SIGWINCH",
}

// normalizeSignal turns a signal number into its name; names, and numbers
// without one, pass through for the backend to judge.
func normalizeSignal(s string) string {
	s = strings.TrimSpace(s)
	if n, err := strconv.Atoi(s); err == nil {
		if name, ok := signalNames[n]; ok {
			return name
		}
	}
	return s
}

// signal is a signal in a request body: a name ("SIGTERM") or, as Fly's
// client sends for kill, a number (9).
type signal string

// UnmarshalJSON reads a signal name or number.
func (s *signal) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch x := v.(type) {
	case nil:
		*s = ""
	case string:
		*s = signal(normalizeSignal(x))
	case float64:
		if x < 1 || x > 64 || x != math.Trunc(x) {
			return fmt.Errorf("invalid signal %s: want a name like \"SIGTERM\" or a number from 1 to 64", b)
		}
		*s = signal(normalizeSignal(strconv.Itoa(int(x))))
	default:
		return fmt.Errorf("invalid signal %s: want a name like \"SIGTERM\" or a number", b)
	}
	return nil
}
