package httpapi

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/flamehq/flame/api"
)

// call is one Backend call the double saw.
type call struct {
	Name string
	App  string
	Ref  api.MachineRef
	Arg  any
}

// fakeBackend records calls and answers canned values, or err for every
// call when set.
type fakeBackend struct {
	mu    sync.Mutex
	calls []call

	err      error
	panicMsg string // panic with this in every call when set
	machine  *api.Machine
	machines []*api.Machine
	metadata map[string]string

	// waitErr fails WaitMachine per state; waitBlock makes it wait for
	// cancellation instead. Other states are reached at once.
	waitErr   map[string]error
	waitBlock map[string]bool
	// logs are emitted by every Logs call; with Follow and a non-nil feed,
	// Logs then emits what arrives on feed until ctx ends.
	logs     []api.LogEntry
	logsErr  error // returned after the logs are emitted
	feed     chan api.LogEntry
	logsDone chan error // receives what Logs returns, when non-nil
}

func newFake() *fakeBackend {
	return &fakeBackend{
		machine: &api.Machine{ID: testID, State: api.StateStarted, Region: "ams",
			Config: &api.MachineConfig{Image: "nginx"}},
		machines: []*api.Machine{
			{ID: testID, State: api.StateStarted, Region: "ams"},
			{ID: "0123456789abcd", State: api.StateStopped, Region: "fra"},
		},
		metadata: map[string]string{"role": "primary"},
	}
}

const (
	testApp = "my-app"
	testID  = "e784079b449483"
)

func (b *fakeBackend) record(name, app string, ref api.MachineRef, arg any) error {
	b.mu.Lock()
	b.calls = append(b.calls, call{Name: name, App: app, Ref: ref, Arg: arg})
	err, msg := b.err, b.panicMsg
	b.mu.Unlock()
	if msg != "" {
		panic(msg)
	}
	return err
}

func (b *fakeBackend) Calls() []call {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]call(nil), b.calls...)
}

func (b *fakeBackend) reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = nil
}

// last is the last call, failing t when there was none.
func (b *fakeBackend) last(t *testing.T) call {
	t.Helper()
	cs := b.Calls()
	if len(cs) == 0 {
		t.Fatal("backend was not called")
	}
	return cs[len(cs)-1]
}

func (b *fakeBackend) CreateMachine(ctx context.Context, app string, in api.LaunchMachineInput) (*api.Machine, error) {
	if err := b.record("CreateMachine", app, api.MachineRef{}, in); err != nil {
		return nil, err
	}
	return b.machine, nil
}

func (b *fakeBackend) GetMachine(ctx context.Context, ref api.MachineRef) (*api.Machine, error) {
	if err := b.record("GetMachine", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return b.machine, nil
}

func (b *fakeBackend) ListMachines(ctx context.Context, app string, f api.ListMachinesOptions) ([]*api.Machine, error) {
	if err := b.record("ListMachines", app, api.MachineRef{}, f); err != nil {
		return nil, err
	}
	return b.machines, nil
}

func (b *fakeBackend) UpdateMachine(ctx context.Context, ref api.MachineRef, in api.LaunchMachineInput) (*api.Machine, error) {
	if err := b.record("UpdateMachine", ref.App, ref, in); err != nil {
		return nil, err
	}
	return b.machine, nil
}

func (b *fakeBackend) StartMachine(ctx context.Context, ref api.MachineRef) (*api.StartResponse, error) {
	if err := b.record("StartMachine", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return &api.StartResponse{Status: "ok", PreviousState: api.StateStopped}, nil
}

func (b *fakeBackend) StopMachine(ctx context.Context, ref api.MachineRef, in api.StopMachineInput) error {
	return b.record("StopMachine", ref.App, ref, in)
}

func (b *fakeBackend) RestartMachine(ctx context.Context, ref api.MachineRef, o api.RestartOptions) error {
	return b.record("RestartMachine", ref.App, ref, o)
}

func (b *fakeBackend) SignalMachine(ctx context.Context, ref api.MachineRef, signal string) error {
	return b.record("SignalMachine", ref.App, ref, signal)
}

func (b *fakeBackend) SuspendMachine(ctx context.Context, ref api.MachineRef) error {
	return b.record("SuspendMachine", ref.App, ref, nil)
}

func (b *fakeBackend) WaitMachine(ctx context.Context, ref api.MachineRef, o api.WaitOptions) (*api.Machine, error) {
	if err := b.record("WaitMachine", ref.App, ref, o); err != nil {
		return nil, err
	}
	b.mu.Lock()
	var err error
	block := true
	for _, st := range o.States { // like the real thing: the first state reachable answers
		if !b.waitBlock[st] {
			block = false
			if err = b.waitErr[st]; err == nil {
				break
			}
		}
	}
	b.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	return b.machine, nil
}

func (b *fakeBackend) DestroyMachine(ctx context.Context, ref api.MachineRef, force bool) error {
	return b.record("DestroyMachine", ref.App, ref, force)
}

func (b *fakeBackend) MachineEvents(ctx context.Context, ref api.MachineRef) ([]*api.MachineEvent, error) {
	if err := b.record("MachineEvents", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return []*api.MachineEvent{{Type: api.EventStart, Status: "started", Source: api.SourceUser, Timestamp: 1700000000000}}, nil
}

func (b *fakeBackend) MachineVersions(ctx context.Context, ref api.MachineRef) ([]*api.MachineVersion, error) {
	if err := b.record("MachineVersions", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return nil, nil // an empty history must still answer []
}

func (b *fakeBackend) MachineProcesses(ctx context.Context, ref api.MachineRef) ([]api.ProcessStat, error) {
	if err := b.record("MachineProcesses", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return []api.ProcessStat{{Pid: 1, Command: "nginx"}}, nil
}

func (b *fakeBackend) ExecMachine(ctx context.Context, ref api.MachineRef, in api.ExecRequest) (*api.ExecResponse, error) {
	if err := b.record("ExecMachine", ref.App, ref, in); err != nil {
		return nil, err
	}
	return &api.ExecResponse{ExitCode: 0, Stdout: "hi\n"}, nil
}

func (b *fakeBackend) MachineLogs(ctx context.Context, ref api.MachineRef, o api.LogOptions, emit func(api.LogEntry) error) (err error) {
	if b.logsDone != nil {
		defer func() { b.logsDone <- err }()
	}
	if err := b.record("MachineLogs", ref.App, ref, o); err != nil {
		return err
	}
	for _, e := range b.logs {
		if err := emit(e); err != nil {
			return err
		}
	}
	if !o.Follow || b.feed == nil {
		return b.logsErr
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case e := <-b.feed:
			if err := emit(e); err != nil {
				return err
			}
		}
	}
}

func (b *fakeBackend) MachineLease(ctx context.Context, ref api.MachineRef) (*api.Lease, error) {
	if err := b.record("MachineLease", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return &api.Lease{Status: "success", Data: &api.LeaseData{Nonce: "n1", ExpiresAt: 1700000000}}, nil
}

func (b *fakeBackend) AcquireMachineLease(ctx context.Context, ref api.MachineRef, in api.LeaseInput) (*api.Lease, error) {
	if err := b.record("AcquireMachineLease", ref.App, ref, in); err != nil {
		return nil, err
	}
	return &api.Lease{Status: "success", Data: &api.LeaseData{Nonce: "n1", ExpiresAt: 1700000000}}, nil
}

func (b *fakeBackend) ReleaseMachineLease(ctx context.Context, ref api.MachineRef) error {
	return b.record("ReleaseMachineLease", ref.App, ref, nil)
}

func (b *fakeBackend) CordonMachine(ctx context.Context, ref api.MachineRef, on bool) error {
	return b.record("CordonMachine", ref.App, ref, on)
}

func (b *fakeBackend) MachineMetadata(ctx context.Context, ref api.MachineRef) (map[string]string, error) {
	if err := b.record("MachineMetadata", ref.App, ref, nil); err != nil {
		return nil, err
	}
	return b.metadata, nil
}

func (b *fakeBackend) SetMachineMetadata(ctx context.Context, ref api.MachineRef, key, value string) error {
	return b.record("SetMachineMetadata", ref.App, ref, [2]string{key, value})
}

func (b *fakeBackend) DeleteMachineMetadata(ctx context.Context, ref api.MachineRef, key string) error {
	return b.record("DeleteMachineMetadata", ref.App, ref, key)
}

// testLogger sends a server's logs to t.Log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newServer builds a Server over b with token auth ("secret").
func newServer(t testing.TB, b api.Backend) *Server {
	t.Helper()
	s, err := New(Config{Backend: b, Authenticate: TokenAuth("secret"), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// do sends one authenticated request through h, with optional headers given
// as name, value pairs.
func do(t testing.TB, h http.Handler, method, target, body string, headers ...string) *httptest.ResponseRecorder {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := httptest.NewRequest(method, target, rd)
	r.Header.Set("Authorization", "Bearer secret")
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Set(headers[i], headers[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}
