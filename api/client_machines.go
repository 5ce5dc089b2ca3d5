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
	"strconv"
	"time"
)

// call performs one request against /v1/apps/{app}/machines/{segments...}.
func (c *Client) call(ctx context.Context, method, app string, segments []string, query url.Values, body, out any) error {
	p, err := machinesPath(app, segments...)
	if err != nil {
		return err
	}
	return c.do(ctx, request{method: method, path: p, query: query, body: body}, out)
}

// Create launches a new machine (POST /v1/apps/{app}/machines).
func (c *Client) Create(ctx context.Context, app string, in LaunchMachineInput) (*Machine, error) {
	m := new(Machine)
	if err := c.call(ctx, http.MethodPost, app, nil, nil, in, m); err != nil {
		return nil, err
	}
	return m, nil
}

// ListMachinesOptions narrow a listing.
type ListMachinesOptions struct {
	Region         string            // only machines in this region
	IncludeDeleted bool              // destroyed machines too
	Metadata       map[string]string // only machines with every one of these pairs
}

// List returns an app's machines (GET /v1/apps/{app}/machines).
func (c *Client) List(ctx context.Context, app string, o ListMachinesOptions) ([]*Machine, error) {
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
	if err := c.call(ctx, http.MethodGet, app, nil, q, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Get returns one machine.
func (c *Client) Get(ctx context.Context, app, id string) (*Machine, error) {
	m := new(Machine)
	if err := c.call(ctx, http.MethodGet, app, []string{id}, nil, nil, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Update replaces a machine's configuration (POST .../machines/{id}); in
// carries the whole new config. The machine gets a new instance_id.
func (c *Client) Update(ctx context.Context, app, id string, in LaunchMachineInput) (*Machine, error) {
	m := new(Machine)
	if err := c.call(ctx, http.MethodPost, app, []string{id}, nil, in, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Destroy removes a machine (DELETE .../machines/{id}?kill=). A running
// machine is only destroyed with kill, which stops it with SIGKILL first.
func (c *Client) Destroy(ctx context.Context, app, id string, kill bool) error {
	q := url.Values{"kill": {strconv.FormatBool(kill)}}
	return c.call(ctx, http.MethodDelete, app, []string{id}, q, nil, nil)
}

// Start starts a stopped, suspended or created machine.
func (c *Client) Start(ctx context.Context, app, id string) (*StartResponse, error) {
	out := new(StartResponse)
	if err := c.call(ctx, http.MethodPost, app, []string{id, "start"}, nil, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Stop stops a machine: in.Signal (default the config's stop signal), then
// SIGKILL after in.Timeout.
func (c *Client) Stop(ctx context.Context, app, id string, in StopMachineInput) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "stop"}, nil, in, nil)
}

// RestartOptions tune a restart. They travel in the query string.
type RestartOptions struct {
	ForceStop bool          // kill at once instead of a graceful stop
	Timeout   time.Duration // grace before SIGKILL; 0 = the machine's own
	Signal    string        // stop signal; "" = the machine's own
}

// Restart stops and starts a machine in one step
// (POST .../restart?force_stop=&timeout=&signal=; the timeout is a Go
// duration string such as "10s").
func (c *Client) Restart(ctx context.Context, app, id string, o RestartOptions) error {
	q := url.Values{"force_stop": {strconv.FormatBool(o.ForceStop)}}
	if o.Timeout != 0 {
		q.Set("timeout", o.Timeout.String())
	}
	if o.Signal != "" {
		q.Set("signal", o.Signal)
	}
	return c.call(ctx, http.MethodPost, app, []string{id, "restart"}, q, nil, nil)
}

// Signal sends a signal ("SIGUSR1") to a machine's main process.
func (c *Client) Signal(ctx context.Context, app, id, signal string) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "signal"}, nil, SignalMachineInput{Signal: signal}, nil)
}

// Suspend snapshots a running machine and stops it; Start resumes it.
func (c *Client) Suspend(ctx context.Context, app, id string) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "suspend"}, nil, nil, nil)
}

// WaitOptions say what Wait waits for.
type WaitOptions struct {
	State       string        // default (server's) "started"
	States      []string      // more states, any of which ends the wait (Flame's API takes several)
	Timeout     time.Duration // sent in whole seconds, rounded up; servers allow at most 60 s
	InstanceID  string        // wait for this version of the machine
	FromEventID string        // consider only events after this one
}

// Wait blocks until the machine reaches o.State
// (GET .../wait?state=&timeout=<seconds>&instance_id=). When the server's
// timeout runs out first the error matches ErrTimeout.
//
// The instance id is sent both as instance_id (the documented name) and as
// version (the name Fly's own client uses).
func (c *Client) Wait(ctx context.Context, app, id string, o WaitOptions) error {
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
	return c.call(ctx, http.MethodGet, app, []string{id, "wait"}, q, nil, nil)
}

// Events returns a machine's event log, newest first as the server keeps it.
func (c *Client) Events(ctx context.Context, app, id string) ([]*MachineEvent, error) {
	var out []*MachineEvent
	if err := c.call(ctx, http.MethodGet, app, []string{id, "events"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Versions returns a machine's config versions.
func (c *Client) Versions(ctx context.Context, app, id string) ([]*MachineVersion, error) {
	var out []*MachineVersion
	if err := c.call(ctx, http.MethodGet, app, []string{id, "versions"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Processes lists the processes running in a machine (GET .../ps).
func (c *Client) Processes(ctx context.Context, app, id string) ([]ProcessStat, error) {
	var out []ProcessStat
	if err := c.call(ctx, http.MethodGet, app, []string{id, "ps"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Exec runs a command in a machine and returns its exit code and output.
func (c *Client) Exec(ctx context.Context, app, id string, in ExecRequest) (*ExecResponse, error) {
	out := new(ExecResponse)
	if err := c.call(ctx, http.MethodPost, app, []string{id, "exec"}, nil, in, out); err != nil {
		return nil, err
	}
	return out, nil
}

// LogOptions select log lines.
type LogOptions struct {
	Tail   int  // only the last Tail lines; 0 = all the server keeps
	Follow bool // keep streaming new lines until the context ends
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

// StreamLogs calls fn with each line of a machine's output, oldest first
// (GET .../logs?tail=&follow=, answered as newline-delimited JSON). It returns
// nil when the server ends the stream, fn's error when fn fails, and the
// context's error when ctx ends first, which is how a follow is stopped.
func (c *Client) StreamLogs(ctx context.Context, app, id string, o LogOptions, fn func(LogEntry) error) error {
	p, err := machinesPath(app, id, "logs")
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

// GetLease returns the machine's lease; a machine without one answers
// ErrNotFound.
func (c *Client) GetLease(ctx context.Context, app, id string) (*Lease, error) {
	out := new(Lease)
	if err := c.call(ctx, http.MethodGet, app, []string{id, "lease"}, nil, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// AcquireLease takes the machine's lease (POST .../lease). Called on a client
// that carries the lease's nonce (WithLeaseNonce), it refreshes the lease
// instead. A lease held by someone else answers ErrConflict.
//
// The ttl travels in the body and also as ?ttl=, where Fly's own client puts it.
func (c *Client) AcquireLease(ctx context.Context, app, id string, in LeaseInput) (*Lease, error) {
	var q url.Values
	if in.TTL > 0 {
		q = url.Values{"ttl": {strconv.Itoa(in.TTL)}}
	}
	out := new(Lease)
	if err := c.call(ctx, http.MethodPost, app, []string{id, "lease"}, q, in, out); err != nil {
		return nil, err
	}
	return out, nil
}

// ReleaseLease gives the machine's lease up (DELETE .../lease with the nonce
// header). An empty nonce sends the client's own.
func (c *Client) ReleaseLease(ctx context.Context, app, id, nonce string) error {
	if nonce != "" {
		c = c.WithLeaseNonce(nonce)
	}
	return c.call(ctx, http.MethodDelete, app, []string{id, "lease"}, nil, nil, nil)
}

// Cordon takes the machine out of the proxy's rotation; it keeps running.
func (c *Client) Cordon(ctx context.Context, app, id string) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "cordon"}, nil, nil, nil)
}

// Uncordon puts a cordoned machine back into the proxy's rotation.
func (c *Client) Uncordon(ctx context.Context, app, id string) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "uncordon"}, nil, nil, nil)
}

// Metadata returns the machine's metadata.
func (c *Client) Metadata(ctx context.Context, app, id string) (map[string]string, error) {
	out := map[string]string{}
	if err := c.call(ctx, http.MethodGet, app, []string{id, "metadata"}, nil, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// SetMetadata sets one metadata key (POST .../metadata/{key} {"value": v}).
func (c *Client) SetMetadata(ctx context.Context, app, id, key, value string) error {
	return c.call(ctx, http.MethodPost, app, []string{id, "metadata", key}, nil, MetadataInput{Value: value}, nil)
}

// DeleteMetadata removes one metadata key.
func (c *Client) DeleteMetadata(ctx context.Context, app, id, key string) error {
	return c.call(ctx, http.MethodDelete, app, []string{id, "metadata", key}, nil, nil, nil)
}
