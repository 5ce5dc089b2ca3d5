package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const testToken = "tok-123"

// wantRequest is what a test server expects to receive.
type wantRequest struct {
	method string
	path   string     // escaped
	query  url.Values // nil: no query at all
	body   string     // JSON, compared as data; "": no body
	nonce  string     // the lease nonce header; "": none
}

// reply is what a test server answers.
type reply struct {
	status      int // 0: 200
	contentType string
	body        string
}

// serve starts a server that checks every request against want and answers
// with rep, and returns a client for it and the number of requests it got.
func serve(t *testing.T, want wantRequest, rep reply) (*Client, *atomic.Int32) {
	t.Helper()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		checkRequest(t, r, want)
		if rep.contentType != "" {
			w.Header().Set("Content-Type", rep.contentType)
		} else if rep.body != "" {
			w.Header().Set("Content-Type", "application/json")
		}
		status := rep.status
		if status == 0 {
			status = http.StatusOK
		}
		w.WriteHeader(status)
		io.WriteString(w, rep.body)
	}))
	t.Cleanup(srv.Close)
	return NewClient(srv.URL, testToken), &calls
}

func checkRequest(t *testing.T, r *http.Request, want wantRequest) {
	t.Helper()
	if r.Method != want.method {
		t.Errorf("method %s, want %s", r.Method, want.method)
	}
	if got := r.URL.EscapedPath(); got != want.path {
		t.Errorf("path %s, want %s", got, want.path)
	}
	if q := r.URL.Query(); !(len(q) == 0 && len(want.query) == 0) && !reflect.DeepEqual(q, want.query) {
		t.Errorf("query %v, want %v", q, want.query)
	}
	if got := r.Header.Get("Authorization"); got != "Bearer "+testToken {
		t.Errorf("Authorization %q, want Bearer token", got)
	}
	if got := r.Header.Get(LeaseNonceHeader); got != want.nonce {
		t.Errorf("lease nonce %q, want %q", got, want.nonce)
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		t.Errorf("read body: %v", err)
	}
	switch {
	case want.body == "" && len(body) != 0:
		t.Errorf("body %s, want none", body)
	case want.body != "":
		if ct := r.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q, want application/json", ct)
		}
		if len(body) == 0 || !sameJSON(t, body, []byte(want.body)) {
			t.Errorf("body %s, want %s", body, want.body)
		}
	}
}

const (
	app = "my-app"
	mid = "3d8d9e1b2c4f78"
	mp  = "/v1/apps/my-app/machines"
	mmp = mp + "/" + mid
)

func mustJSON[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestClientEndpoints(t *testing.T) {
	machineJSON := `{"id":"3d8d9e1b2c4f78","state":"started","region":"ams","image_ref":{"repository":"library/nginx","tag":"1.27"},"instance_id":"01HF8X2V4T5N6M7K8J9H0G1F2E","config":{"image":"nginx","init":{}}}`
	launch := LaunchMachineInput{Region: "ams", Name: "web", Config: &MachineConfig{Image: "nginx"}}
	launchJSON := `{"config":{"image":"nginx","init":{}},"region":"ams","name":"web"}`

	tests := []struct {
		name string
		call func(ctx context.Context, c *Client) (any, error)
		req  wantRequest
		rep  reply
		want string // the result as JSON; "" when the call returns only an error
	}{
		{
			name: "create",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Create(ctx, app, launch) },
			req:  wantRequest{method: "POST", path: mp, body: launchJSON},
			rep:  reply{body: machineJSON},
			want: machineJSON,
		},
		{
			name: "list",
			call: func(ctx context.Context, c *Client) (any, error) { return c.List(ctx, app, ListMachinesOptions{}) },
			req:  wantRequest{method: "GET", path: mp},
			rep:  reply{body: "[" + machineJSON + "]"},
			want: "[" + machineJSON + "]",
		},
		{
			name: "list filtered",
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.List(ctx, app, ListMachinesOptions{
					Region:         "ams",
					IncludeDeleted: true,
					Metadata:       map[string]string{"fly_process_group": "app", "a b": "c&d"},
				})
			},
			req: wantRequest{method: "GET", path: mp, query: url.Values{
				"region":                     {"ams"},
				"include_deleted":            {"true"},
				"metadata.fly_process_group": {"app"},
				"metadata.a b":               {"c&d"},
			}},
			rep:  reply{body: "[]"},
			want: "[]",
		},
		{
			name: "get",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Get(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp},
			rep:  reply{body: machineJSON},
			want: machineJSON,
		},
		{
			name: "update",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Update(ctx, app, mid, launch) },
			req:  wantRequest{method: "POST", path: mmp, body: launchJSON},
			rep:  reply{body: machineJSON},
			want: machineJSON,
		},
		{
			name: "destroy",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Destroy(ctx, app, mid, false) },
			req:  wantRequest{method: "DELETE", path: mmp, query: url.Values{"kill": {"false"}}},
			rep:  reply{body: `{"ok":true}`},
		},
		{
			name: "destroy kill",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Destroy(ctx, app, mid, true) },
			req:  wantRequest{method: "DELETE", path: mmp, query: url.Values{"kill": {"true"}}},
			rep:  reply{body: `{"ok":true}`},
		},
		{
			name: "start",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Start(ctx, app, mid) },
			req:  wantRequest{method: "POST", path: mmp + "/start"},
			rep:  reply{body: `{"previous_state":"stopped"}`},
			want: `{"previous_state":"stopped"}`,
		},
		{
			name: "stop",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.Stop(ctx, app, mid, StopMachineInput{Signal: "SIGINT", Timeout: Dur(30 * time.Second)})
			},
			req: wantRequest{method: "POST", path: mmp + "/stop", body: `{"signal":"SIGINT","timeout":"30s"}`},
			rep: reply{body: `{"ok":true}`},
		},
		{
			name: "stop defaults",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.Stop(ctx, app, mid, StopMachineInput{})
			},
			req: wantRequest{method: "POST", path: mmp + "/stop", body: `{}`},
		},
		{
			name: "restart",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.Restart(ctx, app, mid, RestartOptions{})
			},
			req: wantRequest{method: "POST", path: mmp + "/restart", query: url.Values{"force_stop": {"false"}}},
		},
		{
			name: "restart with options",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.Restart(ctx, app, mid, RestartOptions{ForceStop: true, Timeout: 90 * time.Second, Signal: "SIGUSR1"})
			},
			req: wantRequest{method: "POST", path: mmp + "/restart", query: url.Values{
				"force_stop": {"true"}, "timeout": {"1m30s"}, "signal": {"SIGUSR1"},
			}},
		},
		{
			name: "signal",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Signal(ctx, app, mid, "SIGHUP") },
			req:  wantRequest{method: "POST", path: mmp + "/signal", body: `{"signal":"SIGHUP"}`},
		},
		{
			name: "suspend",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Suspend(ctx, app, mid) },
			req:  wantRequest{method: "POST", path: mmp + "/suspend"},
			rep:  reply{body: `{"ok":true}`},
		},
		{
			name: "wait",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Wait(ctx, app, mid, WaitOptions{}) },
			req:  wantRequest{method: "GET", path: mmp + "/wait"},
			rep:  reply{body: `{"ok":true}`},
		},
		{
			name: "wait with options",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.Wait(ctx, app, mid, WaitOptions{
					State: StateStopped, Timeout: 1500 * time.Millisecond,
					InstanceID: "01HF8X2V4T5N6M7K8J9H0G1F2E", FromEventID: "01HQ0000000000000000000005",
				})
			},
			req: wantRequest{method: "GET", path: mmp + "/wait", query: url.Values{
				"state":         {"stopped"},
				"timeout":       {"2"},
				"instance_id":   {"01HF8X2V4T5N6M7K8J9H0G1F2E"},
				"version":       {"01HF8X2V4T5N6M7K8J9H0G1F2E"},
				"from_event_id": {"01HQ0000000000000000000005"},
			}},
			rep: reply{body: `{"ok":true}`},
		},
		{
			name: "events",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Events(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp + "/events"},
			rep:  reply{body: string(readTestdata(t, "events.json"))},
			want: string(readTestdata(t, "events.json")),
		},
		{
			name: "versions",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Versions(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp + "/versions"},
			rep:  reply{body: `[{"version":"01HF8X2V4T5N6M7K8J9H0G1F2E","state":"started","config":{"image":"nginx","init":{}}},{"version":"01HF8X1","state":"replaced"}]`},
			want: `[{"version":"01HF8X2V4T5N6M7K8J9H0G1F2E","state":"started","config":{"image":"nginx","init":{}}},{"version":"01HF8X1","state":"replaced"}]`,
		},
		{
			name: "processes",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Processes(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp + "/ps"},
			rep:  reply{body: `[{"pid":1,"command":"/sbin/init","directory":"/","cpu":12,"rss":2048,"stime":3,"rtime":100}]`},
			want: `[{"pid":1,"command":"/sbin/init","directory":"/","cpu":12,"rss":2048,"stime":3,"rtime":100}]`,
		},
		{
			name: "exec",
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.Exec(ctx, app, mid, ExecRequest{Command: []string{"cat", "/etc/hostname"}, Stdin: "x", Timeout: 10})
			},
			req:  wantRequest{method: "POST", path: mmp + "/exec", body: `{"command":["cat","/etc/hostname"],"stdin":"x","timeout":10}`},
			rep:  reply{body: `{"exit_code":0,"stdout":"web-1\n","stderr":""}`},
			want: `{"exit_code":0,"stdout":"web-1\n","stderr":""}`,
		},
		{
			name: "get lease",
			call: func(ctx context.Context, c *Client) (any, error) { return c.GetLease(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp + "/lease"},
			rep:  reply{body: string(readTestdata(t, "lease.json"))},
			want: string(readTestdata(t, "lease.json")),
		},
		{
			name: "acquire lease",
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.AcquireLease(ctx, app, mid, LeaseInput{TTL: 60, Description: "deploy"})
			},
			req:  wantRequest{method: "POST", path: mmp + "/lease", query: url.Values{"ttl": {"60"}}, body: `{"ttl":60,"description":"deploy"}`},
			rep:  reply{status: http.StatusCreated, body: string(readTestdata(t, "lease.json"))},
			want: string(readTestdata(t, "lease.json")),
		},
		{
			name: "acquire lease without ttl",
			call: func(ctx context.Context, c *Client) (any, error) { return c.AcquireLease(ctx, app, mid, LeaseInput{}) },
			req:  wantRequest{method: "POST", path: mmp + "/lease", body: `{}`},
			rep:  reply{body: `{"status":"success","data":{"nonce":"n1"}}`},
			want: `{"status":"success","data":{"nonce":"n1"}}`,
		},
		{
			name: "refresh lease",
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.WithLeaseNonce("n1").AcquireLease(ctx, app, mid, LeaseInput{TTL: 30})
			},
			req:  wantRequest{method: "POST", path: mmp + "/lease", query: url.Values{"ttl": {"30"}}, body: `{"ttl":30}`, nonce: "n1"},
			rep:  reply{body: `{"status":"success","data":{"nonce":"n1","expires_at":1709289000}}`},
			want: `{"status":"success","data":{"nonce":"n1","expires_at":1709289000}}`,
		},
		{
			name: "release lease",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.ReleaseLease(ctx, app, mid, "n1") },
			req:  wantRequest{method: "DELETE", path: mmp + "/lease", nonce: "n1"},
			rep:  reply{body: `{"ok":true}`},
		},
		{
			name: "release lease with the client's nonce",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.WithLeaseNonce("n2").ReleaseLease(ctx, app, mid, "")
			},
			req: wantRequest{method: "DELETE", path: mmp + "/lease", nonce: "n2"},
		},
		{
			name: "cordon",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Cordon(ctx, app, mid) },
			req:  wantRequest{method: "POST", path: mmp + "/cordon"},
		},
		{
			name: "uncordon",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Uncordon(ctx, app, mid) },
			req:  wantRequest{method: "POST", path: mmp + "/uncordon"},
		},
		{
			name: "metadata",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Metadata(ctx, app, mid) },
			req:  wantRequest{method: "GET", path: mmp + "/metadata"},
			rep:  reply{body: `{"fly_process_group":"app","team":"edge"}`},
			want: `{"fly_process_group":"app","team":"edge"}`,
		},
		{
			name: "set metadata",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.SetMetadata(ctx, app, mid, "team", "edge")
			},
			req: wantRequest{method: "POST", path: mmp + "/metadata/team", body: `{"value":"edge"}`},
			rep: reply{status: http.StatusNoContent},
		},
		{
			name: "delete metadata",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.DeleteMetadata(ctx, app, mid, "team") },
			req:  wantRequest{method: "DELETE", path: mmp + "/metadata/team"},
			rep:  reply{status: http.StatusNoContent},
		},
		{
			name: "escaped path segments",
			call: func(ctx context.Context, c *Client) (any, error) {
				return nil, c.SetMetadata(ctx, "my app/x", "a/b?c#d", "k/1 2%", "v")
			},
			req: wantRequest{method: "POST", path: "/v1/apps/my%20app%2Fx/machines/a%2Fb%3Fc%23d/metadata/k%2F1%202%25", body: `{"value":"v"}`},
		},
		{
			name: "no-content answer to a call with a result",
			call: func(ctx context.Context, c *Client) (any, error) { return c.Start(ctx, app, mid) },
			req:  wantRequest{method: "POST", path: mmp + "/start"},
			rep:  reply{status: http.StatusNoContent},
			want: `{}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, calls := serve(t, tt.req, tt.rep)
			got, err := tt.call(t.Context(), c)
			if err != nil {
				t.Fatalf("call: %v", err)
			}
			if n := calls.Load(); n != 1 {
				t.Fatalf("server got %d requests, want 1", n)
			}
			if tt.want == "" {
				return
			}
			enc, err := json.Marshal(got)
			if err != nil {
				t.Fatal(err)
			}
			if !sameJSON(t, enc, []byte(tt.want)) {
				t.Errorf("result %s, want %s", enc, tt.want)
			}
		})
	}
}

func TestClientErrors(t *testing.T) {
	tests := []struct {
		name     string
		rep      reply
		sentinel error
		message  string
	}{
		{"not found", reply{status: 404, body: `{"error":"machine 3d8d9e1b2c4f78 not found"}`}, ErrNotFound, "machine 3d8d9e1b2c4f78 not found"},
		{"wait timed out", reply{status: 408, body: `{"error":"deadline exceeded waiting for state started"}`}, ErrTimeout, "deadline exceeded waiting for state started"},
		{"lease held", reply{status: 409, body: `{"error":"machine is leased by deploy@example.com"}`}, ErrConflict, "machine is leased by deploy@example.com"},
		{"invalid config", reply{status: 422, body: `{"error":"memory_mb must be a multiple of 256"}`}, ErrUnprocessable, "memory_mb must be a multiple of 256"},
		{"precondition", reply{status: 412, body: `{"error":"version mismatch"}`}, ErrPrecondition, "version mismatch"},
		{"unauthorized", reply{status: 401, body: `{"error":"unauthorized"}`}, ErrUnauthorized, "unauthorized"},
		{"message field", reply{status: 400, body: `{"message":"bad signal"}`}, ErrBadRequest, "bad signal"},
		{"error wins over message", reply{status: 400, body: `{"error":"e","message":"m"}`}, ErrBadRequest, "e"},
		{"plain text body", reply{status: 502, contentType: "text/plain", body: "upstream connect error"}, &Error{Status: 502}, "Bad Gateway"},
		{"empty body", reply{status: 503}, ErrUnavailable, "Service Unavailable"},
		{"empty error text", reply{status: 500, body: `{"error":""}`}, ErrInternal, "Internal Server Error"},
		{"unknown status", reply{status: 599, body: `not json`}, &Error{Status: 599}, "status 599"},
		{"redirect not followed", reply{status: 304}, &Error{Status: 304}, "Not Modified"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := serve(t, wantRequest{method: "GET", path: mmp}, tt.rep)
			m, err := c.Get(t.Context(), app, mid)
			if err == nil {
				t.Fatalf("got %+v, want an error", m)
			}
			if !errors.Is(err, tt.sentinel) {
				t.Errorf("errors.Is(%v, status %d) = false", err, tt.sentinel.(*Error).Status)
			}
			var apiErr *Error
			if !errors.As(err, &apiErr) {
				t.Fatalf("error %T is not an *api.Error", err)
			}
			if apiErr.Status != tt.rep.status || apiErr.Message != tt.message {
				t.Errorf("error = {%d %q}, want {%d %q}", apiErr.Status, apiErr.Message, tt.rep.status, tt.message)
			}
			if err.Error() != tt.message {
				t.Errorf("Error() = %q, want %q", err.Error(), tt.message)
			}
		})
	}

	t.Run("wait answers ErrTimeout", func(t *testing.T) {
		c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/wait", query: url.Values{"state": {"started"}, "timeout": {"60"}}},
			reply{status: 408, body: `{"error":"timed out"}`})
		err := c.Wait(t.Context(), app, mid, WaitOptions{State: StateStarted, Timeout: time.Minute})
		if !errors.Is(err, ErrTimeout) {
			t.Errorf("err = %v, want ErrTimeout", err)
		}
	})
}

func TestClientRefusesBadNames(t *testing.T) {
	c, calls := serve(t, wantRequest{}, reply{})
	ctx := t.Context()
	errs := []error{
		func() error { _, err := c.Get(ctx, app, ""); return err }(),
		func() error { _, err := c.Get(ctx, "", mid); return err }(),
		func() error { _, err := c.List(ctx, "", ListMachinesOptions{}); return err }(),
		c.Stop(ctx, app, "..", StopMachineInput{}),
		c.SetMetadata(ctx, app, mid, "", "v"),
		c.DeleteMetadata(ctx, app, mid, "."),
		c.StreamLogs(ctx, app, "", LogOptions{}, func(LogEntry) error { return nil }),
	}
	for i, err := range errs {
		if err == nil {
			t.Errorf("call %d: no error", i)
		}
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("server got %d requests, want 0", n)
	}
}

func TestClientAuthorization(t *testing.T) {
	tests := []struct {
		token, want string
	}{
		{"tok", "Bearer tok"},
		{"Bearer tok", "Bearer tok"},
		{"FlyV1 fm2_abc,fm2_def", "FlyV1 fm2_abc,fm2_def"},
		{"", ""},
	}
	for _, tt := range tests {
		got := make(chan string, 1)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			got <- r.Header.Get("Authorization")
			io.WriteString(w, `{}`)
		}))
		if _, err := NewClient(srv.URL, tt.token).Get(t.Context(), app, mid); err != nil {
			t.Fatal(err)
		}
		if g := <-got; g != tt.want {
			t.Errorf("token %q sent as %q, want %q", tt.token, g, tt.want)
		}
		srv.Close()
	}
}

func TestClientBaseURLAndHTTPClient(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/flame/v1/apps/my-app/machines/"+mid {
			t.Errorf("path %s", r.URL.Path)
		}
		io.WriteString(w, `{"id":"`+mid+`"}`)
	}))
	defer srv.Close()
	c := NewClient(srv.URL+"/flame/", testToken)
	c.HTTPClient = &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		hits.Add(1)
		return http.DefaultTransport.RoundTrip(r)
	})}
	m, err := c.Get(t.Context(), app, mid)
	if err != nil || m.ID != mid {
		t.Fatalf("got %+v, %v", m, err)
	}
	if hits.Load() != 1 {
		t.Errorf("HTTPClient used %d times, want 1", hits.Load())
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestClientLeaseNonce walks a lease through the client: acquire, act while
// holding it, refresh, release. Only the copy made with WithLeaseNonce sends
// the nonce.
func TestClientLeaseNonce(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, fmt.Sprintf("%s %s nonce=%q", r.Method, r.URL.Path, r.Header.Get(LeaseNonceHeader)))
		switch {
		case r.Method == "POST" && strings.HasSuffix(r.URL.Path, "/lease"):
			io.WriteString(w, `{"status":"success","data":{"nonce":"abc","expires_at":1709289000}}`)
		default:
			io.WriteString(w, `{"ok":true}`)
		}
	}))
	defer srv.Close()
	ctx := t.Context()
	c := NewClient(srv.URL, testToken)
	lease, err := c.AcquireLease(ctx, app, mid, LeaseInput{TTL: 30})
	if err != nil {
		t.Fatal(err)
	}
	held := c.WithLeaseNonce(lease.Data.Nonce)
	if held.LeaseNonce() != "abc" || c.LeaseNonce() != "" {
		t.Fatalf("nonces %q / %q", held.LeaseNonce(), c.LeaseNonce())
	}
	if err := held.Stop(ctx, app, mid, StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	if _, err := held.AcquireLease(ctx, app, mid, LeaseInput{TTL: 30}); err != nil {
		t.Fatal(err)
	}
	if err := c.Cordon(ctx, app, mid); err != nil {
		t.Fatal(err)
	}
	if err := c.ReleaseLease(ctx, app, mid, lease.Data.Nonce); err != nil {
		t.Fatal(err)
	}
	want := []string{
		`POST /v1/apps/my-app/machines/` + mid + `/lease nonce=""`,
		`POST /v1/apps/my-app/machines/` + mid + `/stop nonce="abc"`,
		`POST /v1/apps/my-app/machines/` + mid + `/lease nonce="abc"`,
		`POST /v1/apps/my-app/machines/` + mid + `/cordon nonce=""`,
		`DELETE /v1/apps/my-app/machines/` + mid + `/lease nonce="abc"`,
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(seen, want) {
		t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(seen, "\n"), strings.Join(want, "\n"))
	}
}

var logLines = []LogEntry{
	{Timestamp: time.Date(2024, 3, 1, 10, 16, 2, 0, time.UTC), Stream: "stdout", Message: "listening on :8080", MachineID: mid, Region: "ams"},
	{Timestamp: time.Date(2024, 3, 1, 10, 16, 3, 5e8, time.UTC), Stream: "stderr", Message: "warn: slow start", MachineID: mid, Region: "ams"},
	{Timestamp: time.Date(2024, 3, 1, 10, 16, 4, 0, time.UTC), Message: "GET / 200", MachineID: mid},
}

func writeNDJSON(t *testing.T, w io.Writer, entries []LogEntry) {
	t.Helper()
	enc := json.NewEncoder(w)
	for _, e := range entries {
		if err := enc.Encode(e); err != nil {
			t.Error(err)
		}
	}
}

func TestClientLogs(t *testing.T) {
	c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs", query: url.Values{"tail": {"3"}}},
		reply{contentType: "application/x-ndjson", body: func() string {
			var b strings.Builder
			writeNDJSON(t, &b, logLines)
			return "\n" + b.String() + "\n\n"
		}()})
	got, err := c.Logs(t.Context(), app, mid, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, logLines) {
		t.Errorf("got %+v\nwant %+v", got, logLines)
	}

	t.Run("json array", func(t *testing.T) {
		b, _ := json.Marshal(logLines)
		c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs"}, reply{body: "  " + string(b)})
		got, err := c.Logs(t.Context(), app, mid, 0)
		if err != nil || !reflect.DeepEqual(got, logLines) {
			t.Errorf("got %+v, %v", got, err)
		}
	})
	t.Run("empty", func(t *testing.T) {
		c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs"}, reply{contentType: "application/x-ndjson"})
		got, err := c.Logs(t.Context(), app, mid, 0)
		if err != nil || len(got) != 0 {
			t.Errorf("got %+v, %v", got, err)
		}
	})
	t.Run("malformed line", func(t *testing.T) {
		c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs"},
			reply{contentType: "application/x-ndjson", body: `{"message":"ok","timestamp":"2024-03-01T10:16:02Z"}` + "\n{nope\n"})
		if _, err := c.Logs(t.Context(), app, mid, 0); err == nil {
			t.Error("no error for a malformed line")
		}
	})
	t.Run("not found", func(t *testing.T) {
		c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs"}, reply{status: 404, body: `{"error":"no such machine"}`})
		if _, err := c.Logs(t.Context(), app, mid, 0); !errors.Is(err, ErrNotFound) {
			t.Errorf("err = %v, want ErrNotFound", err)
		}
	})
}

// TestClientStreamLogsFollow follows a stream that never ends on its own:
// the server sends lines as they come and the caller stops by cancelling.
func TestClientStreamLogsFollow(t *testing.T) {
	release := make(chan struct{}) // lets the server send its second batch
	serverDone := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(serverDone)
		checkRequest(t, r, wantRequest{method: "GET", path: mmp + "/logs", query: url.Values{"follow": {"true"}, "tail": {"10"}}})
		if got := r.Header.Get("Accept"); !strings.Contains(got, "application/x-ndjson") {
			t.Errorf("Accept %q", got)
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		writeNDJSON(t, w, logLines[:1])
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		writeNDJSON(t, w, logLines[1:])
		w.(http.Flusher).Flush()
		<-r.Context().Done() // follow: keep the stream open until the client leaves
	}))
	defer srv.Close()

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var got []LogEntry
	err := NewClient(srv.URL, testToken).StreamLogs(ctx, app, mid, LogOptions{Tail: 10, Follow: true}, func(e LogEntry) error {
		got = append(got, e)
		switch len(got) {
		case 1:
			close(release) // the first line arrived before the server sent more
		case len(logLines):
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
	if !reflect.DeepEqual(got, logLines) {
		t.Errorf("got %+v\nwant %+v", got, logLines)
	}
	select {
	case <-serverDone:
	case <-time.After(5 * time.Second):
		t.Fatal("server handler still running after the client cancelled")
	}
}

func TestClientStreamLogsCallbackError(t *testing.T) {
	c, _ := serve(t, wantRequest{method: "GET", path: mmp + "/logs", query: url.Values{"follow": {"true"}}},
		reply{contentType: "application/x-ndjson", body: func() string {
			var b strings.Builder
			writeNDJSON(t, &b, logLines)
			return b.String()
		}()})
	stop := errors.New("enough")
	n := 0
	err := c.StreamLogs(t.Context(), app, mid, LogOptions{Follow: true}, func(LogEntry) error {
		n++
		return stop
	})
	if err != stop {
		t.Errorf("err = %v, want the callback's own error", err)
	}
	if n != 1 {
		t.Errorf("callback called %d times after failing, want 1", n)
	}
}

// TestClientCancel checks that a call in flight ends with its context.
func TestClientCancel(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	err := NewClient(srv.URL, testToken).Wait(ctx, app, mid, WaitOptions{Timeout: time.Minute})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want context.DeadlineExceeded", err)
	}
}

func TestClientDecodeError(t *testing.T) {
	c, _ := serve(t, wantRequest{method: "GET", path: mmp}, reply{body: `{"id": 12}`})
	_, err := c.Get(t.Context(), app, mid)
	if err == nil || !strings.Contains(err.Error(), "GET /v1/apps/my-app/machines/"+mid) {
		t.Errorf("err = %v, want a decode error naming the call", err)
	}
	var apiErr *Error
	if errors.As(err, &apiErr) {
		t.Errorf("a decode failure came back as an API error %v", apiErr)
	}
}

// TestFlapsRequestShapes decodes bodies as Fly's own client sends them into
// the types a server reads them with.
func TestFlapsRequestShapes(t *testing.T) {
	stop := mustJSON[StopMachineInput](t, `{"id":"`+mid+`","signal":"","timeout":"0s"}`)
	if stop.Timeout == nil || stop.Timeout.Duration != 0 || stop.Signal != "" {
		t.Errorf("stop = %+v", stop)
	}
	kill := mustJSON[SignalMachineInput](t, `{"signal":9}`)
	if kill.Signal != "SIGKILL" {
		t.Errorf("kill = %+v", kill)
	}
	exec := mustJSON[ExecRequest](t, `{"cmd":"ls -l /","timeout":5}`)
	if exec.Cmd != "ls -l /" || exec.Timeout != 5 {
		t.Errorf("exec = %+v", exec)
	}
	in := mustJSON[LaunchMachineInput](t, `{"config":{"image":"x","services":[{"force_instance_key":null}]},"skip_secrets":false}`)
	if in.Config.Services[0].ForceInstanceKey != nil {
		t.Errorf("input = %+v", in)
	}
}
