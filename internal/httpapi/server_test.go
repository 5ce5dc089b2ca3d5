package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

const machinePath = "/v1/apps/" + testApp + "/machines/" + testID

// Body shapes a route answers with.
var (
	isOK = func(v any) bool {
		m, ok := v.(map[string]any)
		return ok && m["ok"] == true && len(m) == 1
	}
	isMachine = func(v any) bool {
		m, ok := v.(map[string]any)
		return ok && m["id"] == testID && m["state"] == api.StateStarted
	}
	isArray = func(n int) func(any) bool {
		return func(v any) bool {
			a, ok := v.([]any)
			return ok && len(a) == n
		}
	}
	hasKey = func(key string) func(any) bool {
		return func(v any) bool {
			m, ok := v.(map[string]any)
			_, has := m[key]
			return ok && has
		}
	}
)

func TestRoutes(t *testing.T) {
	ref := api.MachineRef{App: testApp, ID: testID, LeaseNonce: "nonce-1"}
	tests := []struct {
		name           string
		method, target string
		body           string
		status         int
		call           string
		arg            any // compared with the call's argument when non-nil
		shape          func(any) bool
	}{
		{"create", "POST", "/v1/apps/my-app/machines", `{"config":{"image":"nginx"},"region":"ams","lease_ttl":30}`,
			200, "CreateMachine", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx"}, Region: "ams", LeaseTTL: 30}, isMachine},
		{"list", "GET", "/v1/apps/my-app/machines", "", 200, "ListMachines", api.ListMachinesOptions{}, isArray(2)},
		{"list filtered", "GET", "/v1/apps/my-app/machines?region=ams&include_deleted=true&metadata.role=primary&summary=true", "",
			200, "ListMachines", api.ListMachinesOptions{Region: "ams", IncludeDeleted: true, Metadata: map[string]string{"role": "primary"}}, isArray(2)},
		{"list by state", "GET", "/v1/apps/my-app/machines?state=stopped,suspended", "", 200, "ListMachines", api.ListMachinesOptions{}, isArray(1)},
		{"get", "GET", machinePath, "", 200, "GetMachine", nil, isMachine},
		{"update", "POST", machinePath, `{"config":{"image":"nginx:2"},"current_version":"01H"}`,
			200, "UpdateMachine", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx:2"}, CurrentVersion: "01H"}, isMachine},
		{"destroy", "DELETE", machinePath, "", 200, "DestroyMachine", false, isOK},
		{"destroy force", "DELETE", machinePath + "?force=true", "", 200, "DestroyMachine", true, isOK},
		{"destroy kill", "DELETE", machinePath + "?kill=true", "", 200, "DestroyMachine", true, isOK},
		{"destroy kill=false", "DELETE", machinePath + "?kill=false", "", 200, "DestroyMachine", false, isOK},
		{"start", "POST", machinePath + "/start", "", 200, "StartMachine", nil, hasKey("previous_state")},
		{"stop", "POST", machinePath + "/stop", "", 200, "StopMachine", api.StopMachineInput{}, isOK},
		{"stop with body", "POST", machinePath + "/stop", `{"signal":"SIGINT","timeout":"10s"}`,
			200, "StopMachine", api.StopMachineInput{Signal: "SIGINT", Timeout: api.Dur(10 * time.Second)}, isOK},
		{"stop as fly-go sends it", "POST", machinePath + "/stop", `{"id":"` + testID + `","timeout":"0s"}`,
			200, "StopMachine", api.StopMachineInput{}, isOK},
		{"restart", "POST", machinePath + "/restart", "", 200, "RestartMachine", api.RestartOptions{}, isOK},
		{"restart with options", "POST", machinePath + "/restart?force_stop=true&timeout=10s&signal=SIGTERM", "",
			200, "RestartMachine", api.RestartOptions{Signal: "SIGTERM", Timeout: 10 * time.Second, ForceStop: true}, isOK},
		{"restart timeout in seconds", "POST", machinePath + "/restart?force_stop=false&timeout=7&signal=15", "",
			200, "RestartMachine", api.RestartOptions{Signal: "SIGTERM", Timeout: 7 * time.Second}, isOK},
		{"signal", "POST", machinePath + "/signal", `{"signal":"SIGUSR1"}`, 200, "SignalMachine", "SIGUSR1", isOK},
		{"signal by number", "POST", machinePath + "/signal", `{"signal":9}`, 200, "SignalMachine", "SIGKILL", isOK},
		{"suspend", "POST", machinePath + "/suspend", "", 200, "SuspendMachine", nil, isOK},
		{"wait", "GET", machinePath + "/wait", "", 200, "WaitMachine",
			api.WaitOptions{States: []string{api.StateStarted}, Timeout: 60 * time.Second}, isOK},
		{"wait with options", "GET", machinePath + "/wait?state=stopped&timeout=30&instance_id=01HX", "", 200, "WaitMachine",
			api.WaitOptions{States: []string{api.StateStopped}, InstanceID: "01HX", Timeout: 30 * time.Second}, isOK},
		{"wait as fly-go sends it", "GET", machinePath + "/wait?state=destroyed&timeout=120&version=01HX&from_event_id=e1", "", 200, "WaitMachine",
			api.WaitOptions{States: []string{api.StateDestroyed}, InstanceID: "01HX", Timeout: 60 * time.Second}, isOK},
		{"lease get", "GET", machinePath + "/lease", "", 200, "MachineLease", nil, hasKey("data")},
		{"lease acquire", "POST", machinePath + "/lease", `{"ttl":30,"description":"deploy"}`,
			200, "AcquireMachineLease", api.LeaseInput{TTL: 30, Description: "deploy"}, hasKey("data")},
		{"lease acquire as fly-go sends it", "POST", machinePath + "/lease?ttl=15", "",
			200, "AcquireMachineLease", api.LeaseInput{TTL: 15}, hasKey("data")},
		{"lease release", "DELETE", machinePath + "/lease", "", 200, "ReleaseMachineLease", nil, isOK},
		{"cordon", "POST", machinePath + "/cordon", "", 200, "CordonMachine", true, isOK},
		{"uncordon", "POST", machinePath + "/uncordon", "", 200, "CordonMachine", false, isOK},
		{"events", "GET", machinePath + "/events", "", 200, "MachineEvents", nil, isArray(1)},
		{"versions", "GET", machinePath + "/versions", "", 200, "MachineVersions", nil, isArray(0)},
		{"ps", "GET", machinePath + "/ps", "", 200, "MachineProcesses", nil, isArray(1)},
		{"exec", "POST", machinePath + "/exec", `{"command":["ls","-l"],"timeout":5}`,
			200, "ExecMachine", api.ExecRequest{Command: []string{"ls", "-l"}, Timeout: 5}, hasKey("exit_code")},
		{"exec cmd string", "POST", machinePath + "/exec", `{"cmd":"sh -c 'echo \"hello world\"'"}`,
			200, "ExecMachine", api.ExecRequest{Command: []string{"sh", "-c", `echo "hello world"`}, Cmd: `sh -c 'echo "hello world"'`}, hasKey("stdout")},
		{"metadata", "GET", machinePath + "/metadata", "", 200, "MachineMetadata", nil, hasKey("role")},
		{"metadata key", "GET", machinePath + "/metadata/role", "", 200, "MachineMetadata", nil,
			func(v any) bool { m, _ := v.(map[string]any); return m["value"] == "primary" }},
		{"metadata set", "POST", machinePath + "/metadata/role", `{"value":"replica"}`, 204, "SetMachineMetadata", [2]string{"role", "replica"}, nil},
		{"metadata delete", "DELETE", machinePath + "/metadata/role", "", 204, "DeleteMachineMetadata", "role", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFake()
			s := newServer(t, b)
			w := do(t, s, tt.method, tt.target, tt.body, api.LeaseNonceHeader, "nonce-1")
			if w.Code != tt.status {
				t.Fatalf("status = %d, want %d; body %s", w.Code, tt.status, w.Body)
			}
			c := b.last(t)
			if c.Name != tt.call {
				t.Fatalf("backend call = %s, want %s", c.Name, tt.call)
			}
			if c.App != testApp {
				t.Errorf("app = %q, want %q", c.App, testApp)
			}
			if strings.HasPrefix(tt.target, machinePath) && c.Ref != ref {
				t.Errorf("ref = %+v, want %+v", c.Ref, ref)
			}
			if tt.arg != nil && !reflect.DeepEqual(c.Arg, tt.arg) {
				t.Errorf("arg = %#v, want %#v", c.Arg, tt.arg)
			}
			if tt.shape == nil {
				if w.Body.Len() != 0 {
					t.Errorf("body = %q, want none", w.Body)
				}
				return
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
			var v any
			if err := json.Unmarshal(w.Body.Bytes(), &v); err != nil {
				t.Fatalf("body is not JSON: %v: %s", err, w.Body)
			}
			if !tt.shape(v) {
				t.Errorf("unexpected body shape: %s", w.Body)
			}
		})
	}
}

func TestListIsNeverNull(t *testing.T) {
	b := newFake()
	b.machines = nil
	w := do(t, newServer(t, b), "GET", "/v1/apps/my-app/machines", "")
	if w.Code != 200 || strings.TrimSpace(w.Body.String()) != "[]" {
		t.Fatalf("got %d %q, want 200 []", w.Code, w.Body)
	}
}

func TestListStateDestroyedIncludesDeleted(t *testing.T) {
	b := newFake()
	do(t, newServer(t, b), "GET", "/v1/apps/my-app/machines?state=destroyed", "")
	if f := b.last(t).Arg.(api.ListMachinesOptions); !f.IncludeDeleted {
		t.Errorf("filter = %+v, want IncludeDeleted", f)
	}
}

func TestMetadataKeyMissing(t *testing.T) {
	w := do(t, newServer(t, newFake()), "GET", machinePath+"/metadata/nope", "")
	wantError(t, w, 404, `metadata key "nope" not found`)
}

// The nonce header reaches the backend even when the header map holds it
// under the lowercase name, as Fly's client builds it.
func TestNonceUncanonicalHeader(t *testing.T) {
	b := newFake()
	s := newServer(t, b)
	r, _ := http.NewRequest("POST", machinePath+"/start", nil)
	r.Header = http.Header{"Authorization": {"FlyV1 secret"}, api.LeaseNonceHeader: {"n-lower"}}
	w := &recorder{header: http.Header{}}
	s.ServeHTTP(w, r)
	if got := b.last(t).Ref.LeaseNonce; got != "n-lower" {
		t.Errorf("nonce = %q, want n-lower", got)
	}
}

func TestAuth(t *testing.T) {
	tests := []struct {
		name   string
		header string
		status int
	}{
		{"none", "", 401},
		{"wrong token", "Bearer nope", 401},
		{"token prefix", "Bearer secre", 401},
		{"wrong scheme", "Basic secret", 401},
		{"no token", "Bearer", 401},
		{"bearer", "Bearer secret", 200},
		{"bearer lowercase", "bearer secret", 200},
		{"flyv1", "FlyV1 secret", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFake()
			s := newServer(t, b)
			r, _ := http.NewRequest("GET", machinePath, nil)
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			w := &recorder{header: http.Header{}}
			s.ServeHTTP(w, r)
			if w.status != tt.status {
				t.Fatalf("status = %d, want %d: %s", w.status, tt.status, w.body.String())
			}
			if tt.status == 401 {
				var e api.ErrorBody
				if err := json.Unmarshal(w.body.Bytes(), &e); err != nil || e.Error == "" {
					t.Errorf("body %q is not an error", w.body.String())
				}
				if w.header.Get("WWW-Authenticate") == "" {
					t.Error("no WWW-Authenticate header")
				}
				if n := len(b.Calls()); n != 0 {
					t.Errorf("backend called %d times", n)
				}
			}
		})
	}
	if _, err := TokenAuth("")(httptestRequest("Bearer x")); err == nil {
		t.Error("an empty token accepted a request")
	}
}

func TestAuthenticateForbidden(t *testing.T) {
	s, err := New(Config{Backend: newFake(), Logger: testLogger(t),
		Authenticate: func(*http.Request) (context.Context, error) { return nil, api.Errorf(403, "read-only token") }})
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, do(t, s, "GET", machinePath, ""), 403, "read-only token")
}

func TestErrorMapping(t *testing.T) {
	routes := []struct{ method, target, body string }{
		{"POST", "/v1/apps/my-app/machines", `{"config":{"image":"x"}}`},
		{"GET", "/v1/apps/my-app/machines", ""},
		{"GET", machinePath, ""},
		{"POST", machinePath + "/stop", ""},
		{"GET", machinePath + "/wait?state=stopped&state=suspended", ""},
		{"POST", machinePath + "/lease", ""},
		{"GET", machinePath + "/logs", ""},
		{"GET", machinePath + "/logs?follow=true", ""},
		{"POST", machinePath + "/metadata/k", `{"value":"v"}`},
	}
	for _, status := range []int{400, 403, 404, 408, 409, 412, 422, 501, 503} {
		for _, rt := range routes {
			t.Run(fmt.Sprintf("%d %s %s", status, rt.method, rt.target), func(t *testing.T) {
				b := newFake()
				b.err = fmt.Errorf("context: %w", api.Errorf(status, "failure %d", status))
				w := do(t, newServer(t, b), rt.method, rt.target, rt.body)
				wantError(t, w, status, fmt.Sprintf("failure %d", status))
			})
		}
	}

	t.Run("sentinel", func(t *testing.T) {
		b := newFake()
		b.err = api.ErrNotFound
		wantError(t, do(t, newServer(t, b), "GET", machinePath, ""), 404, "Not Found")
	})
	t.Run("plain error", func(t *testing.T) {
		b := newFake()
		b.err = errors.New("disk on fire at /var/lib/flame")
		w := do(t, newServer(t, b), "GET", machinePath, "")
		wantError(t, w, 500, "internal error")
		if strings.Contains(w.Body.String(), "disk") {
			t.Errorf("internal detail leaked: %s", w.Body)
		}
	})
	t.Run("no result", func(t *testing.T) {
		b := newFake()
		b.machine = nil
		wantError(t, do(t, newServer(t, b), "GET", machinePath, ""), 500, "internal error")
	})
}

func TestPanicRecovered(t *testing.T) {
	b := newFake()
	b.panicMsg = "backend bug"
	s := newServer(t, b)
	wantError(t, do(t, s, "GET", machinePath, ""), 500, "internal error")
	b.panicMsg = ""
	if w := do(t, s, "GET", machinePath, ""); w.Code != 200 {
		t.Fatalf("after a panic: status %d", w.Code)
	}
}

func TestWaitAnyState(t *testing.T) {
	b := newFake()
	w := do(t, newServer(t, b), "GET", machinePath+"/wait?state=stopped&state=suspended,destroyed&timeout=5", "")
	if w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	calls := b.Calls()
	if len(calls) != 1 {
		t.Fatalf("%d backend calls, want 1", len(calls))
	}
	o := calls[0].Arg.(api.WaitOptions)
	if strings.Join(o.States, ",") != "stopped,suspended,destroyed" {
		t.Errorf("states = %v", o.States)
	}
}

func TestNewValidates(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New accepted a config without a backend")
	}
	if _, err := New(Config{Backend: newFake(), MaxBodyBytes: -1}); err == nil {
		t.Error("New accepted a negative body limit")
	}
	s, err := New(Config{Backend: newFake()})
	if err != nil {
		t.Fatal(err)
	}
	if s.Handler() == nil || s.maxBody != DefaultMaxBodyBytes {
		t.Errorf("defaults not applied: maxBody %d", s.maxBody)
	}
}

// wantError checks that w is an {"error": ...} answer with status whose
// message contains msg.
func wantError(t *testing.T, w interface {
	Result() *http.Response
}, status int, msg string) {
	t.Helper()
	res := w.Result()
	defer res.Body.Close()
	var e api.ErrorBody
	if err := json.NewDecoder(res.Body).Decode(&e); err != nil {
		t.Fatalf("status %d, body is not an error: %v", res.StatusCode, err)
	}
	if res.StatusCode != status || !strings.Contains(e.Error, msg) {
		t.Fatalf("got %d %q, want %d containing %q", res.StatusCode, e.Error, status, msg)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q", ct)
	}
}

func httptestRequest(auth string) *http.Request {
	r, _ := http.NewRequest("GET", "/", nil)
	r.Header.Set("Authorization", auth)
	return r
}

// recorder is a minimal ResponseWriter for requests whose headers must not
// be canonicalized the way httptest.NewRequest does.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(s int) {
	if r.status == 0 {
		r.status = s
	}
}
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = 200
	}
	return r.body.Write(b)
}

// An authenticator's own failure answers 401 without its details.
func TestAuthenticateOtherError(t *testing.T) {
	s, err := New(Config{Backend: newFake(), Logger: testLogger(t),
		Authenticate: func(*http.Request) (context.Context, error) {
			return nil, errors.New("token store at 10.0.0.7 unreachable")
		}})
	if err != nil {
		t.Fatal(err)
	}
	w := do(t, s, "GET", machinePath, "")
	wantError(t, w, 401, "unauthorized")
	if strings.Contains(w.Body.String(), "10.0.0.7") {
		t.Errorf("detail leaked: %s", w.Body)
	}
}
