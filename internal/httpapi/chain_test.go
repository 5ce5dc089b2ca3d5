package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// chain returns an api.Client, as a Backend, that reaches b through a Server
// over real HTTP: what a control plane holds for a host.
func chain(t *testing.T, b api.Backend) api.Backend {
	t.Helper()
	srv := httptest.NewServer(newServer(t, b))
	t.Cleanup(srv.Close)
	return api.NewClient(srv.URL, "secret")
}

// backendCall is one Backend method called with fixed arguments, and the
// call (name and argument) the far backend must see.
type backendCall struct {
	name string
	arg  any // nil: not compared
	call func(ctx context.Context, b api.Backend) (any, error)
}

func backendCalls() []backendCall {
	ref := api.MachineRef{App: testApp, ID: testID, LeaseNonce: "nonce-1"}
	timeout := &api.Duration{Duration: 7 * time.Second}
	return []backendCall{
		{"CreateMachine", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx"}, Region: "ams", LeaseTTL: 30},
			func(ctx context.Context, b api.Backend) (any, error) {
				return b.CreateMachine(ctx, testApp, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx"}, Region: "ams", LeaseTTL: 30})
			}},
		{"GetMachine", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.GetMachine(ctx, ref) }},
		{"ListMachines", api.ListMachinesOptions{Region: "ams", IncludeDeleted: true, Metadata: map[string]string{"role": "primary"}},
			func(ctx context.Context, b api.Backend) (any, error) {
				return b.ListMachines(ctx, testApp, api.ListMachinesOptions{Region: "ams", IncludeDeleted: true, Metadata: map[string]string{"role": "primary"}})
			}},
		{"UpdateMachine", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx:2"}, CurrentVersion: "01H"},
			func(ctx context.Context, b api.Backend) (any, error) {
				return b.UpdateMachine(ctx, ref, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "nginx:2"}, CurrentVersion: "01H"})
			}},
		{"StartMachine", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.StartMachine(ctx, ref) }},
		{"StopMachine", api.StopMachineInput{Signal: "SIGTERM", Timeout: timeout},
			func(ctx context.Context, b api.Backend) (any, error) {
				return nil, b.StopMachine(ctx, ref, api.StopMachineInput{Signal: "SIGTERM", Timeout: timeout})
			}},
		{"RestartMachine", api.RestartOptions{ForceStop: true, Timeout: 3 * time.Second, Signal: "SIGUSR1"},
			func(ctx context.Context, b api.Backend) (any, error) {
				return nil, b.RestartMachine(ctx, ref, api.RestartOptions{ForceStop: true, Timeout: 3 * time.Second, Signal: "SIGUSR1"})
			}},
		{"SignalMachine", "SIGUSR2", func(ctx context.Context, b api.Backend) (any, error) {
			return nil, b.SignalMachine(ctx, ref, "SIGUSR2")
		}},
		{"SuspendMachine", nil, func(ctx context.Context, b api.Backend) (any, error) { return nil, b.SuspendMachine(ctx, ref) }},
		{"DestroyMachine", true, func(ctx context.Context, b api.Backend) (any, error) { return nil, b.DestroyMachine(ctx, ref, true) }},
		{"MachineEvents", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.MachineEvents(ctx, ref) }},
		{"MachineVersions", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.MachineVersions(ctx, ref) }},
		{"MachineProcesses", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.MachineProcesses(ctx, ref) }},
		{"ExecMachine", api.ExecRequest{Command: []string{"ls", "-l"}, Timeout: 5},
			func(ctx context.Context, b api.Backend) (any, error) {
				return b.ExecMachine(ctx, ref, api.ExecRequest{Command: []string{"ls", "-l"}, Timeout: 5})
			}},
		{"MachineLease", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.MachineLease(ctx, ref) }},
		{"AcquireMachineLease", api.LeaseInput{TTL: 30, Description: "deploy"},
			func(ctx context.Context, b api.Backend) (any, error) {
				return b.AcquireMachineLease(ctx, ref, api.LeaseInput{TTL: 30, Description: "deploy"})
			}},
		{"ReleaseMachineLease", nil, func(ctx context.Context, b api.Backend) (any, error) { return nil, b.ReleaseMachineLease(ctx, ref) }},
		{"CordonMachine", true, func(ctx context.Context, b api.Backend) (any, error) { return nil, b.CordonMachine(ctx, ref, true) }},
		{"CordonMachine", false, func(ctx context.Context, b api.Backend) (any, error) { return nil, b.CordonMachine(ctx, ref, false) }},
		{"MachineMetadata", nil, func(ctx context.Context, b api.Backend) (any, error) { return b.MachineMetadata(ctx, ref) }},
		{"SetMachineMetadata", [2]string{"role", "replica"},
			func(ctx context.Context, b api.Backend) (any, error) {
				return nil, b.SetMachineMetadata(ctx, ref, "role", "replica")
			}},
		{"DeleteMachineMetadata", "role",
			func(ctx context.Context, b api.Backend) (any, error) {
				return nil, b.DeleteMachineMetadata(ctx, ref, "role")
			}},
	}
}

// Every Backend method called on a Client reaches the backend behind the
// Server as the same call with the same arguments (the machine, its lease
// nonce, the options), and answers what the backend answered.
func TestClientBackendRoundTrip(t *testing.T) {
	ctx := t.Context()
	for _, tc := range backendCalls() {
		t.Run(tc.name, func(t *testing.T) {
			far := newFake()
			got, err := tc.call(ctx, chain(t, far))
			if err != nil {
				t.Fatal(err)
			}
			c := far.last(t)
			if c.Name != tc.name || c.App != testApp {
				t.Fatalf("far call = %s %s, want %s %s", c.Name, c.App, tc.name, testApp)
			}
			if tc.name != "CreateMachine" && tc.name != "ListMachines" {
				if want := (api.MachineRef{App: testApp, ID: testID, LeaseNonce: "nonce-1"}); c.Ref != want {
					t.Errorf("ref = %+v, want %+v", c.Ref, want)
				}
			}
			if tc.arg != nil && !reflect.DeepEqual(c.Arg, tc.arg) {
				t.Errorf("arg = %#v, want %#v", c.Arg, tc.arg)
			}
			direct, err := tc.call(ctx, newFake())
			if err != nil {
				t.Fatal(err)
			}
			if g, w := asJSON(t, got), asJSON(t, direct); g != w && !(isNil(got) && isNil(direct)) {
				t.Errorf("answer through the chain = %s, directly = %s", g, w)
			}
		})
	}
}

func asJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// isNil reports whether v holds nothing: nil, or a nil or empty slice (an
// empty history travels as [] and comes back empty).
func isNil(v any) bool {
	rv := reflect.ValueOf(v)
	return v == nil || (rv.Kind() == reflect.Slice && rv.Len() == 0) || (rv.Kind() == reflect.Pointer && rv.IsNil())
}

// A backend's *api.Error comes out of the Client as an *api.Error with the
// same status and message, for every method: errors.Is works across the
// chain.
func TestClientBackendErrors(t *testing.T) {
	ctx := t.Context()
	for _, sentinel := range []*api.Error{api.ErrBadRequest, api.ErrNotFound, api.ErrTimeout, api.ErrConflict,
		api.ErrPrecondition, api.ErrUnprocessable, api.ErrNotImplemented, api.ErrUnavailable} {
		far := newFake()
		far.err = api.Errorf(sentinel.Status, "machine says %d", sentinel.Status)
		b := chain(t, far)
		for _, tc := range backendCalls() {
			_, err := tc.call(ctx, b)
			var ae *api.Error
			if !errors.Is(err, sentinel) || !errors.As(err, &ae) || ae.Message != far.err.Error() {
				t.Errorf("%s with %d: err = %#v, want %v", tc.name, sentinel.Status, err, far.err)
			}
		}
	}
}

// A wait through the chain waits at the far end and answers the machine; a
// wait that runs out is ErrTimeout; waiting for destroyed on a machine gone
// from the far end answers it destroyed.
func TestClientBackendWait(t *testing.T) {
	ctx := t.Context()
	ref := api.MachineRef{App: testApp, ID: testID, LeaseNonce: "nonce-1"}
	far := newFake()
	far.waitErr = map[string]error{api.StateStopped: api.Errorf(http.StatusRequestTimeout, "still started")}
	b := chain(t, far)

	m, err := b.WaitMachine(ctx, ref, api.WaitOptions{States: []string{api.StateStarted, api.StateSuspended}, InstanceID: "01H", Timeout: 5 * time.Second})
	if err != nil || m.ID != testID {
		t.Fatalf("wait = %+v, %v", m, err)
	}
	calls := far.Calls()
	if len(calls) != 2 || calls[0].Name != "WaitMachine" || calls[1].Name != "GetMachine" || calls[0].Ref != ref {
		t.Fatalf("far calls = %+v, want WaitMachine then GetMachine with %+v", calls, ref)
	}
	if o := calls[0].Arg.(api.WaitOptions); !reflect.DeepEqual(o.Wanted(), []string{api.StateStarted, api.StateSuspended}) ||
		o.InstanceID != "01H" || o.Timeout != 5*time.Second {
		t.Errorf("far wait options = %+v", o)
	}

	if _, err := b.WaitMachine(ctx, ref, api.WaitOptions{State: api.StateStopped}); !errors.Is(err, api.ErrTimeout) {
		t.Errorf("wait for stopped: err = %v, want ErrTimeout", err)
	}

	far.err = api.Errorf(http.StatusNotFound, "machine gone")
	m, err = b.WaitMachine(ctx, ref, api.WaitOptions{State: api.StateDestroyed})
	if err != nil || m.State != api.StateDestroyed {
		t.Errorf("wait for destroyed of a gone machine = %+v, %v", m, err)
	}
	if _, err := b.WaitMachine(ctx, ref, api.WaitOptions{State: api.StateStopped}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("wait for stopped of a gone machine: err = %v, want ErrNotFound", err)
	}
}

// Logs through the chain: the kept lines, then with Follow each new line as
// the far end emits it, until the caller's context ends.
func TestClientBackendLogsFollow(t *testing.T) {
	far := newFake()
	far.logs = []api.LogEntry{{Message: "one", Stream: "stdout"}, {Message: "two", Stream: "stderr"}}
	far.feed = make(chan api.LogEntry)
	far.logsDone = make(chan error, 1)
	b := chain(t, far)
	ref := api.MachineRef{App: testApp, ID: testID, LeaseNonce: "nonce-1"}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	got := make(chan api.LogEntry)
	done := make(chan error, 1)
	go func() {
		done <- b.MachineLogs(ctx, ref, api.LogOptions{Tail: 2, Follow: true}, func(e api.LogEntry) error {
			got <- e
			return nil
		})
	}()
	for _, want := range far.logs {
		if e := <-got; e != want {
			t.Fatalf("line = %+v, want %+v", e, want)
		}
	}
	live := api.LogEntry{Message: "three", Stream: "stdout"}
	far.feed <- live
	if e := <-got; e != live {
		t.Fatalf("followed line = %+v, want %+v", e, live)
	}
	if c := far.last(t); c.Name != "MachineLogs" || c.Arg != (api.LogOptions{Tail: 2, Follow: true}) || c.Ref != ref {
		t.Errorf("far call = %+v", c)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("follow ended with %v, want context.Canceled", err)
	}
	if err := <-far.logsDone; err == nil {
		t.Error("the far end kept following after the caller left")
	}
}

// The nonce a call's MachineRef carries is the one sent, in place of the
// client's own; a ref without one sends the client's.
func TestClientBackendNonce(t *testing.T) {
	far := newFake()
	srv := httptest.NewServer(newServer(t, far))
	t.Cleanup(srv.Close)
	c := api.NewClient(srv.URL, "secret").WithLeaseNonce("client-nonce")
	for _, tt := range []struct{ ref, want string }{{"ref-nonce", "ref-nonce"}, {"", "client-nonce"}} {
		ref := api.MachineRef{App: testApp, ID: testID, LeaseNonce: tt.ref}
		if _, err := c.StartMachine(t.Context(), ref); err != nil {
			t.Fatal(err)
		}
		if got := far.last(t).Ref.LeaseNonce; got != tt.want {
			t.Errorf("ref nonce %q: far end saw %q, want %q", tt.ref, got, tt.want)
		}
		if err := c.MachineLogs(t.Context(), ref, api.LogOptions{}, func(api.LogEntry) error { return nil }); err != nil {
			t.Fatal(err)
		}
		if got := far.last(t).Ref.LeaseNonce; got != tt.want {
			t.Errorf("logs with ref nonce %q: far end saw %q, want %q", tt.ref, got, tt.want)
		}
	}
}
