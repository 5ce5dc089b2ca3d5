package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"
)

var _ Backend = (*Client)(nil)

// call performs one request against /v1/apps/{app}/machines.
func (c *Client) call(ctx context.Context, method, app string, query url.Values, body, out any) error {
	p, err := machinesPath(app)
	if err != nil {
		return err
	}
	return c.do(ctx, request{method: method, path: p, query: query, body: body}, out)
}

// machineCall performs one request about the machine ref names, against
// /v1/apps/{app}/machines/{id}/{segments...}. The ref's lease nonce, when it
// has one, is sent instead of the client's own.
func (c *Client) machineCall(ctx context.Context, method string, ref MachineRef, segments []string, query url.Values, body, out any) error {
	p, err := machinesPath(ref.App, append([]string{ref.ID}, segments...)...)
	if err != nil {
		return err
	}
	r := request{method: method, path: p, query: query, body: body}
	if ref.LeaseNonce != "" {
		r.header = http.Header{}
		r.header.Set(LeaseNonceHeader, ref.LeaseNonce)
	}
	return c.do(ctx, r, out)
}

// CreateMachine launches a new machine (POST /v1/apps/{app}/machines).
func (c *Client) CreateMachine(ctx context.Context, app string, in LaunchMachineInput) (*Machine, error) {
	m := new(Machine)
	if err := c.call(ctx, http.MethodPost, app, nil, in, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Create is CreateMachine.
func (c *Client) Create(ctx context.Context, app string, in LaunchMachineInput) (*Machine, error) {
	return c.CreateMachine(ctx, app, in)
}

// ListMachines returns an app's machines (GET /v1/apps/{app}/machines).
func (c *Client) ListMachines(ctx context.Context, app string, o ListMachinesOptions) ([]*Machine, error) {
	q := url.Values{}
	if o.Region != "" {
		q.Set("region", o.Region)
	}
	if o.IncludeDeleted {
		q.Set("include_deleted", "true")
	}
	for k, v := range o.Metadata {
		q.Set("metadata."+k, v)
	}
	var out []*Machine
	if err := c.call(ctx, http.MethodGet, app, q, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// List is ListMachines.
func (c *Client) List(ctx context.Context, app string, o ListMachinesOptions) ([]*Machine, error) {
	return c.ListMachines(ctx, app, o)
}

// GetMachine returns one machine.
func (c *Client) GetMachine(ctx context.Context, ref MachineRef) (*Machine, error) {
	m := new(Machine)
	if err := c.machineCall(ctx, http.MethodGet, ref, nil, nil, nil, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Get returns machine id of app.
func (c *Client) Get(ctx context.Context, app, id string) (*Machine, error) {
	return c.GetMachine(ctx, MachineRef{App: app, ID: id})
}

// UpdateMachine replaces a machine's configuration (POST .../machines/{id});
// in carries the whole new config. The machine gets a new instance_id.
func (c *Client) UpdateMachine(ctx context.Context, ref MachineRef, in LaunchMachineInput) (*Machine, error) {
	m := new(Machine)
	if err := c.machineCall(ctx, http.MethodPost, ref, nil, nil, in, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Update is UpdateMachine for machine id of app.
func (c *Client) Update(ctx context.Context, app, id string, in LaunchMachineInput) (*Machine, error) {
	return c.UpdateMachine(ctx, MachineRef{App: app, ID: id}, in)
}

// DestroyMachine removes a machine (DELETE .../machines/{id}?kill=). A
// running machine is only destroyed with force, which stops it with SIGKILL
// first.
func (c *Client) DestroyMachine(ctx context.Context, ref MachineRef, force bool) error {
	q := url.Values{"kill": {strconv.FormatBool(force)}}
	return c.machineCall(ctx, http.MethodDelete, ref, nil, q, nil, nil)
}

// Destroy is DestroyMachine for machine id of app.
func (c *Client) Destroy(ctx context.Context, app, id string, kill bool) error {
	return c.DestroyMachine(ctx, MachineRef{App: app, ID: id}, kill)
}

// StartMachine starts a stopped, suspended or created machine.
func (c *Client) StartMachine(ctx context.Context, ref MachineRef) (*StartResponse, error) {
	out := new(StartResponse)
	if err := c.machineCall(ctx, http.MethodPost, ref, []string{"start"}, nil, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Start is StartMachine for machine id of app.
func (c *Client) Start(ctx context.Context, app, id string) (*StartResponse, error) {
	return c.StartMachine(ctx, MachineRef{App: app, ID: id})
}

// StopMachine stops a machine: in.Signal (default the config's stop
// signal), then SIGKILL after in.Timeout.
func (c *Client) StopMachine(ctx context.Context, ref MachineRef, in StopMachineInput) error {
	return c.machineCall(ctx, http.MethodPost, ref, []string{"stop"}, nil, in, nil)
}

// Stop is StopMachine for machine id of app.
func (c *Client) Stop(ctx context.Context, app, id string, in StopMachineInput) error {
	return c.StopMachine(ctx, MachineRef{App: app, ID: id}, in)
}

// RestartMachine stops and starts a machine in one step
// (POST .../restart?force_stop=&timeout=&signal=; the timeout is a Go
// duration string such as "10s").
func (c *Client) RestartMachine(ctx context.Context, ref MachineRef, o RestartOptions) error {
	q := url.Values{"force_stop": {strconv.FormatBool(o.ForceStop)}}
	if o.Timeout != 0 {
		q.Set("timeout", o.Timeout.String())
	}
	if o.Signal != "" {
		q.Set("signal", o.Signal)
	}
	return c.machineCall(ctx, http.MethodPost, ref, []string{"restart"}, q, nil, nil)
}

// Restart is RestartMachine for machine id of app.
func (c *Client) Restart(ctx context.Context, app, id string, o RestartOptions) error {
	return c.RestartMachine(ctx, MachineRef{App: app, ID: id}, o)
}

// SignalMachine sends a signal ("SIGUSR1") to a machine's main process.
func (c *Client) SignalMachine(ctx context.Context, ref MachineRef, signal string) error {
	return c.machineCall(ctx, http.MethodPost, ref, []string{"signal"}, nil, SignalMachineInput{Signal: signal}, nil)
}

// Signal is SignalMachine for machine id of app.
func (c *Client) Signal(ctx context.Context, app, id, signal string) error {
	return c.SignalMachine(ctx, MachineRef{App: app, ID: id}, signal)
}

// SuspendMachine snapshots a running machine and stops it; Start resumes it.
func (c *Client) SuspendMachine(ctx context.Context, ref MachineRef) error {
	return c.machineCall(ctx, http.MethodPost, ref, []string{"suspend"}, nil, nil, nil)
}

// Suspend is SuspendMachine for machine id of app.
func (c *Client) Suspend(ctx context.Context, app, id string) error {
	return c.SuspendMachine(ctx, MachineRef{App: app, ID: id})
}

// Wait blocks until the machine reaches one of o.Wanted()
// (GET .../wait?state=&timeout=<seconds>&instance_id=). When the server's
// timeout runs out first the error matches ErrTimeout.
//
// The instance id is sent both as instance_id (the documented name) and as
// version (the name Fly's own client uses).
func (c *Client) Wait(ctx context.Context, app, id string, o WaitOptions) error {
	return c.wait(ctx, MachineRef{App: app, ID: id}, o)
}

func (c *Client) wait(ctx context.Context, ref MachineRef, o WaitOptions) error {
	q := url.Values{}
	if o.State != "" {
		q.Set("state", o.State)
	}
	for _, st := range o.States {
		q.Add("state", st)
	}
	if o.Timeout > 0 {
		secs := int64((o.Timeout + time.Second - 1) / time.Second)
		q.Set("timeout", strconv.FormatInt(secs, 10))
	}
	if o.InstanceID != "" {
		q.Set("instance_id", o.InstanceID)
		q.Set("version", o.InstanceID)
	}
	if o.FromEventID != "" {
		q.Set("from_event_id", o.FromEventID)
	}
	return c.machineCall(ctx, http.MethodGet, ref, []string{"wait"}, q, nil, nil)
}

// WaitMachine waits as Wait does, then returns the machine as it is then
// (the wait itself answers only that it ended). Waiting for destroyed on a
// machine the server no longer knows answers a destroyed machine.
func (c *Client) WaitMachine(ctx context.Context, ref MachineRef, o WaitOptions) (*Machine, error) {
	gone := func(err error) bool {
		return errors.Is(err, ErrNotFound) && slices.Contains(o.Wanted(), StateDestroyed)
	}
	if err := c.wait(ctx, ref, o); err != nil {
		if gone(err) {
			return &Machine{ID: ref.ID, State: StateDestroyed}, nil
		}
		return nil, err
	}
	m, err := c.GetMachine(ctx, ref)
	if gone(err) {
		return &Machine{ID: ref.ID, State: StateDestroyed}, nil
	}
	return m, err
}

// MachineEvents returns a machine's event log, newest first as the server
// keeps it.
func (c *Client) MachineEvents(ctx context.Context, ref MachineRef) ([]*MachineEvent, error) {
	var out []*MachineEvent
	if err := c.machineCall(ctx, http.MethodGet, ref, []string{"events"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Events is MachineEvents for machine id of app.
func (c *Client) Events(ctx context.Context, app, id string) ([]*MachineEvent, error) {
	return c.MachineEvents(ctx, MachineRef{App: app, ID: id})
}

// MachineVersions returns a machine's config versions.
func (c *Client) MachineVersions(ctx context.Context, ref MachineRef) ([]*MachineVersion, error) {
	var out []*MachineVersion
	if err := c.machineCall(ctx, http.MethodGet, ref, []string{"versions"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Versions is MachineVersions for machine id of app.
func (c *Client) Versions(ctx context.Context, app, id string) ([]*MachineVersion, error) {
	return c.MachineVersions(ctx, MachineRef{App: app, ID: id})
}

// MachineProcesses lists the processes running in a machine (GET .../ps).
func (c *Client) MachineProcesses(ctx context.Context, ref MachineRef) ([]ProcessStat, error) {
	var out []ProcessStat
	if err := c.machineCall(ctx, http.MethodGet, ref, []string{"ps"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Processes is MachineProcesses for machine id of app.
func (c *Client) Processes(ctx context.Context, app, id string) ([]ProcessStat, error) {
	return c.MachineProcesses(ctx, MachineRef{App: app, ID: id})
}

// ExecMachine runs a command in a machine and returns its exit code and
// output.
func (c *Client) ExecMachine(ctx context.Context, ref MachineRef, in ExecRequest) (*ExecResponse, error) {
	out := new(ExecResponse)
	if err := c.machineCall(ctx, http.MethodPost, ref, []string{"exec"}, nil, in, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Exec is ExecMachine for machine id of app.
func (c *Client) Exec(ctx context.Context, app, id string, in ExecRequest) (*ExecResponse, error) {
	return c.ExecMachine(ctx, MachineRef{App: app, ID: id}, in)
}

// Logs returns a machine's last tail lines of output (all it keeps when tail
// is 0), oldest first. Use StreamLogs to follow.
func (c *Client) Logs(ctx context.Context, app, id string, tail int) ([]LogEntry, error) {
	var out []LogEntry
	err := c.StreamLogs(ctx, app, id, LogOptions{Tail: tail}, func(e LogEntry) error {
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// StreamLogs is MachineLogs for machine id of app.
func (c *Client) StreamLogs(ctx context.Context, app, id string, o LogOptions, fn func(LogEntry) error) error {
	return c.MachineLogs(ctx, MachineRef{App: app, ID: id}, o, fn)
}

// MachineLogs calls fn with each line of a machine's output, oldest first
// (GET .../logs?tail=&follow=, answered as newline-delimited JSON). It
// returns nil when the server ends the stream, fn's error when fn fails, and
// the context's error when ctx ends first, which is how a follow is stopped.
func (c *Client) MachineLogs(ctx context.Context, ref MachineRef, o LogOptions, fn func(LogEntry) error) error {
	p, err := machinesPath(ref.App, ref.ID, "logs")
	if err != nil {
		return err
	}
	q := url.Values{}
	if o.Tail > 0 {
		q.Set("tail", strconv.Itoa(o.Tail))
	}
	if o.Follow {
		q.Set("follow", "true")
	}
	r := request{
		method: http.MethodGet,
		path:   p,
		query:  q,
		header: http.Header{"Accept": {"application/x-ndjson, application/json"}},
	}
	if ref.LeaseNonce != "" {
		r.header.Set(LeaseNonceHeader, ref.LeaseNonce)
	}
	resp, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	err = decodeLogs(resp.Body, func(e LogEntry) error {
		if err := fn(e); err != nil {
			return callbackError{err}
		}
		return nil
	})
	var cerr callbackError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &cerr):
		return cerr.err
	case ctx.Err() != nil:
		return ctx.Err()
	default:
		return fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
}

// callbackError carries the error of StreamLogs's callback out of
// decodeLogs, so that it is returned as it is rather than wrapped.
type callbackError struct{ err error }

func (e callbackError) Error() string { return e.err.Error() }

// decodeLogs reads newline-delimited LogEntry values from r, or a single JSON
// array of them, and calls fn with each.
func decodeLogs(r io.Reader, fn func(LogEntry) error) error {
	br := bufio.NewReader(r)
	array, err := startsWithArray(br)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	dec := json.NewDecoder(br)
	if array {
		var entries []LogEntry
		if err := dec.Decode(&entries); err != nil {
			return fmt.Errorf("decode log entries: %w", err)
		}
		for _, e := range entries {
			if err := fn(e); err != nil {
				return err
			}
		}
		return nil
	}
	for {
		var e LogEntry
		if err := dec.Decode(&e); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("decode log entry: %w", err)
		}
		if err := fn(e); err != nil {
			return err
		}
	}
}

// startsWithArray skips leading white space and reports whether the next
// byte opens a JSON array.
func startsWithArray(br *bufio.Reader) (bool, error) {
	for {
		b, err := br.Peek(1)
		if err != nil {
			return false, err
		}
		switch b[0] {
		case ' ', '\t', '\r', '\n':
			_, _ = br.ReadByte()
		default:
			return b[0] == '[', nil
		}
	}
}

// MachineLease returns the machine's lease; a machine without one answers
// ErrNotFound.
func (c *Client) MachineLease(ctx context.Context, ref MachineRef) (*Lease, error) {
	out := new(Lease)
	if err := c.machineCall(ctx, http.MethodGet, ref, []string{"lease"}, nil, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// GetLease is MachineLease for machine id of app.
func (c *Client) GetLease(ctx context.Context, app, id string) (*Lease, error) {
	return c.MachineLease(ctx, MachineRef{App: app, ID: id})
}

// AcquireMachineLease takes the machine's lease (POST .../lease). With the
// lease's nonce (in ref, or the client's own: WithLeaseNonce), it refreshes
// the lease instead. A lease held by someone else answers ErrConflict.
//
// The ttl travels in the body and also as ?ttl=, where Fly's own client puts it.
func (c *Client) AcquireMachineLease(ctx context.Context, ref MachineRef, in LeaseInput) (*Lease, error) {
	var q url.Values
	if in.TTL > 0 {
		q = url.Values{"ttl": {strconv.Itoa(in.TTL)}}
	}
	out := new(Lease)
	if err := c.machineCall(ctx, http.MethodPost, ref, []string{"lease"}, q, in, out); err != nil {
		return nil, err
	}
	return out, nil
}

// AcquireLease is AcquireMachineLease for machine id of app.
func (c *Client) AcquireLease(ctx context.Context, app, id string, in LeaseInput) (*Lease, error) {
	return c.AcquireMachineLease(ctx, MachineRef{App: app, ID: id}, in)
}

// ReleaseMachineLease gives the machine's lease up (DELETE .../lease with
// the nonce header: ref's, or the client's own when ref has none).
func (c *Client) ReleaseMachineLease(ctx context.Context, ref MachineRef) error {
	return c.machineCall(ctx, http.MethodDelete, ref, []string{"lease"}, nil, nil, nil)
}

// ReleaseLease is ReleaseMachineLease for machine id of app with nonce (""
// sends the client's own).
func (c *Client) ReleaseLease(ctx context.Context, app, id, nonce string) error {
	return c.ReleaseMachineLease(ctx, MachineRef{App: app, ID: id, LeaseNonce: nonce})
}

// CordonMachine takes the machine out of the proxy's rotation (it keeps
// running), or with on=false puts it back.
func (c *Client) CordonMachine(ctx context.Context, ref MachineRef, on bool) error {
	verb := "cordon"
	if !on {
		verb = "uncordon"
	}
	return c.machineCall(ctx, http.MethodPost, ref, []string{verb}, nil, nil, nil)
}

// Cordon takes machine id of app out of the proxy's rotation.
func (c *Client) Cordon(ctx context.Context, app, id string) error {
	return c.CordonMachine(ctx, MachineRef{App: app, ID: id}, true)
}

// Uncordon puts a cordoned machine back into the proxy's rotation.
func (c *Client) Uncordon(ctx context.Context, app, id string) error {
	return c.CordonMachine(ctx, MachineRef{App: app, ID: id}, false)
}

// MachineMetadata returns the machine's metadata.
func (c *Client) MachineMetadata(ctx context.Context, ref MachineRef) (map[string]string, error) {
	out := map[string]string{}
	if err := c.machineCall(ctx, http.MethodGet, ref, []string{"metadata"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Metadata is MachineMetadata for machine id of app.
func (c *Client) Metadata(ctx context.Context, app, id string) (map[string]string, error) {
	return c.MachineMetadata(ctx, MachineRef{App: app, ID: id})
}

// SetMachineMetadata sets one metadata key (POST .../metadata/{key}
// {"value": v}).
func (c *Client) SetMachineMetadata(ctx context.Context, ref MachineRef, key, value string) error {
	return c.machineCall(ctx, http.MethodPost, ref, []string{"metadata", key}, nil, MetadataInput{Value: value}, nil)
}

// SetMetadata is SetMachineMetadata for machine id of app.
func (c *Client) SetMetadata(ctx context.Context, app, id, key, value string) error {
	return c.SetMachineMetadata(ctx, MachineRef{App: app, ID: id}, key, value)
}

// DeleteMachineMetadata removes one metadata key.
func (c *Client) DeleteMachineMetadata(ctx context.Context, ref MachineRef, key string) error {
	return c.machineCall(ctx, http.MethodDelete, ref, []string{"metadata", key}, nil, nil, nil)
}

// DeleteMetadata is DeleteMachineMetadata for machine id of app.
func (c *Client) DeleteMetadata(ctx context.Context, app, id, key string) error {
	return c.DeleteMachineMetadata(ctx, MachineRef{App: app, ID: id}, key)
}
