package devcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/httpapi"
)

// The chaos API: the fault API over HTTP, served by `flame dev` beside the
// control plane's Machines API (Config.Chaos) and only there — a
// production control plane has no simulated network to break. Every call
// needs the admin token.
//
//	GET  /v1/chaos           the active faults (FaultStatus)
//	POST /v1/chaos/{action}  a ChaosRequest; answers the faults after it
//
// Actions: kill-machine (app, machine), kill-host (host), kill-region
// (region), revive (host or region), partition (a, b), heal, loss (a, b,
// percent), slow-link (a, b, delay_ms), stall-host (host, duration_ms),
// kill-control-plane and restart-control-plane (no fields). The API is
// served by the dev cluster on the control plane's address, so it answers
// while the plane is down (controlplane.go): the plane's other routes are
// then a 503, and the chaos API takes the admin tokens the plane verified
// before it went down.
// Bad input is a 422 naming the field, a host or region the cluster lacks
// a 404, a host already killed (or, to revive, not killed) a 409. One
// call is served at a time.

// ChaosActions are the actions of the chaos API, in the order help lists
// them.
var ChaosActions = []string{"kill-machine", "kill-host", "kill-region", "revive", "partition", "heal", "loss", "slow-link", "stall-host", "kill-control-plane", "restart-control-plane"}

// ChaosRequest is the body of a chaos action; each action reads its own
// fields.
type ChaosRequest struct {
	App     string   `json:"app,omitempty"`
	Machine string   `json:"machine,omitempty"`
	Host    string   `json:"host,omitempty"`
	Region  string   `json:"region,omitempty"`
	A       []string `json:"a,omitempty"`
	B       []string `json:"b,omitempty"`
	Percent *float64 `json:"percent,omitempty"`
	DelayMS *int64   `json:"delay_ms,omitempty"`
	// DurationMS is how long a stall lasts.
	DurationMS *int64 `json:"duration_ms,omitempty"`
}

// Limits of a chaos request.
const (
	maxChaosBody  = 64 << 10
	maxSideNames  = 100
	maxTargetName = 63
)

// chaosHandler serves the chaos API.
func (c *Cluster) chaosHandler() http.Handler {
	var one sync.Mutex // Revive replaces hosts the others read
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		one.Lock()
		defer one.Unlock()
		if err := c.serveChaos(w, r); err != nil {
			var ae *api.Error
			if !errors.As(err, &ae) {
				c.cfg.Logger.Error("chaos action failed", "path", r.URL.Path, "err", err)
				ae = api.Errorf(http.StatusInternalServerError, "%v", err)
			}
			httpapi.WriteJSON(w, ae.Status, api.ErrorBody{Error: ae.Error()})
		}
	})
}

func (c *Cluster) serveChaos(w http.ResponseWriter, r *http.Request) error {
	if err := c.requireAdmin(r); err != nil {
		return err
	}
	action, ok := strings.CutPrefix(r.URL.Path, "/v1/chaos")
	action = strings.TrimPrefix(action, "/")
	switch {
	case !ok:
		return api.Errorf(http.StatusNotFound, "no such path")
	case action == "" && r.Method == http.MethodGet:
		httpapi.WriteJSON(w, http.StatusOK, c.Status())
		return nil
	case action == "":
		return api.Errorf(http.StatusMethodNotAllowed, "GET /v1/chaos for the active faults, POST /v1/chaos/{action} to inject one")
	case r.Method != http.MethodPost:
		return api.Errorf(http.StatusMethodNotAllowed, "POST /v1/chaos/%s", clip(action))
	}
	var req ChaosRequest
	r.Body = http.MaxBytesReader(w, r.Body, maxChaosBody)
	if err := httpapi.DecodeBody(r, &req, false); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return api.Errorf(http.StatusRequestEntityTooLarge, "request body larger than %d bytes", mbe.Limit)
		}
		return err
	}
	if err := c.chaos(r.Context(), action, req); err != nil {
		return chaosError(err)
	}
	httpapi.WriteJSON(w, http.StatusOK, c.Status())
	return nil
}

// chaos checks a request's fields and carries the action out.
func (c *Cluster) chaos(ctx context.Context, action string, req ChaosRequest) error {
	switch action {
	case "kill-machine":
		if err := needName("app", req.App); err != nil {
			return err
		}
		if err := needName("machine", req.Machine); err != nil {
			return err
		}
		if _, err := c.KillMachine(ctx, req.App, req.Machine); err != nil {
			return api.Errorf(http.StatusNotFound, "%v", err)
		}
		return nil
	case "kill-host":
		if err := needName("host", req.Host); err != nil {
			return err
		}
		if c.host(req.Host) == nil {
			return fmt.Errorf("%w: %q", ErrUnknownTarget, req.Host)
		}
		return c.KillHost(ctx, req.Host)
	case "kill-region":
		if err := needName("region", req.Region); err != nil {
			return err
		}
		if _, err := c.members([]string{req.Region}); err != nil || c.host(req.Region) != nil || req.Region == controlID {
			return api.Errorf(http.StatusNotFound, "no region %q in this cluster", clip(req.Region))
		}
		live := false
		for _, h := range c.Hosts {
			live = live || h.Region == req.Region && !c.Killed(h.ID)
		}
		if !live {
			return api.Errorf(http.StatusConflict, "every host of region %s is killed already", req.Region)
		}
		_, err := c.KillRegion(ctx, req.Region)
		return err
	case "partition", "loss", "slow-link":
		if err := needSide("a", req.A); err != nil {
			return err
		}
		if err := needSide("b", req.B); err != nil {
			return err
		}
		switch action {
		case "partition":
			return c.Partition(req.A, req.B)
		case "loss":
			if req.Percent == nil {
				return api.Errorf(http.StatusUnprocessableEntity, "percent is required")
			}
			if p := *req.Percent; !(p >= 0 && p <= 100) {
				return api.Errorf(http.StatusUnprocessableEntity, "percent %v: want 0 to 100", p)
			}
			return c.Loss(req.A, req.B, *req.Percent)
		default:
			if req.DelayMS == nil {
				return api.Errorf(http.StatusUnprocessableEntity, "delay_ms is required")
			}
			if d := *req.DelayMS; d < 0 || d > MaxSlowLink.Milliseconds() {
				return api.Errorf(http.StatusUnprocessableEntity, "delay_ms %d: want 0 to %d", d, MaxSlowLink.Milliseconds())
			}
			return c.SlowLink(req.A, req.B, time.Duration(*req.DelayMS)*time.Millisecond)
		}
	case "heal":
		c.Heal()
		return nil
	case "kill-control-plane":
		return c.KillControlPlane(ctx)
	case "restart-control-plane":
		return c.RestartControlPlane(ctx)
	case "revive":
		name := req.Host
		if name == "" {
			name = req.Region
		}
		if req.Host != "" && req.Region != "" {
			return api.Errorf(http.StatusUnprocessableEntity, "host or region: not both")
		}
		if err := needName("host or region", name); err != nil {
			return err
		}
		_, err := c.Revive(ctx, name)
		return err
	case "stall-host":
		if err := needName("host", req.Host); err != nil {
			return err
		}
		if req.DurationMS == nil {
			return api.Errorf(http.StatusUnprocessableEntity, "duration_ms is required")
		}
		if d := *req.DurationMS; d <= 0 || d > MaxStall.Milliseconds() {
			return api.Errorf(http.StatusUnprocessableEntity, "duration_ms %d: want 1 to %d", d, MaxStall.Milliseconds())
		}
		return c.StallHost(req.Host, time.Duration(*req.DurationMS)*time.Millisecond)
	}
	return api.Errorf(http.StatusNotFound, "no chaos action %q: want one of %s", clip(action), strings.Join(ChaosActions, ", "))
}

// chaosError maps the fault API's errors to the API's.
func chaosError(err error) error {
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return err
	case errors.Is(err, ErrUnknownTarget):
		return api.Errorf(http.StatusNotFound, "%v", err)
	case errors.Is(err, ErrBadFault):
		return api.Errorf(http.StatusUnprocessableEntity, "%v", err)
	case errors.Is(err, ErrHostKilled), errors.Is(err, ErrNotKilled),
		errors.Is(err, ErrPlaneKilled), errors.Is(err, ErrPlaneNotKilled):
		return api.Errorf(http.StatusConflict, "%v", err)
	}
	return err
}

func needName(field, v string) error {
	switch {
	case v == "":
		return api.Errorf(http.StatusUnprocessableEntity, "%s is required", field)
	case len(v) > maxTargetName:
		return api.Errorf(http.StatusUnprocessableEntity, "%s: longer than %d bytes", field, maxTargetName)
	}
	return nil
}

func needSide(field string, names []string) error {
	if len(names) == 0 {
		return api.Errorf(http.StatusUnprocessableEntity, "%s is required: hosts or regions", field)
	}
	if len(names) > maxSideNames {
		return api.Errorf(http.StatusUnprocessableEntity, "%s: more than %d names", field, maxSideNames)
	}
	for i, n := range names {
		if err := needName(fmt.Sprintf("%s[%d]", field, i), n); err != nil {
			return err
		}
	}
	return nil
}

// clip shortens what a caller sent before it is quoted back.
func clip(s string) string {
	if len(s) > maxTargetName {
		return s[:maxTargetName] + "…"
	}
	return s
}

// ChaosClient calls the chaos API of a `flame dev`.
type ChaosClient struct {
	// URL is the control plane's base URL (http://127.0.0.1:4280).
	URL string
	// Token is the admin token.
	Token      string
	HTTPClient *http.Client
}

// Status returns the active faults.
func (cl ChaosClient) Status(ctx context.Context) (FaultStatus, error) {
	return cl.call(ctx, http.MethodGet, "/v1/chaos", nil)
}

// Do carries an action out and returns the faults after it.
func (cl ChaosClient) Do(ctx context.Context, action string, req ChaosRequest) (FaultStatus, error) {
	return cl.call(ctx, http.MethodPost, "/v1/chaos/"+action, &req)
}

func (cl ChaosClient) call(ctx context.Context, method, path string, body *ChaosRequest) (FaultStatus, error) {
	var st FaultStatus
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return st, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(cl.URL, "/")+path, rd)
	if err != nil {
		return st, err
	}
	if cl.Token != "" {
		req.Header.Set("Authorization", "Bearer "+cl.Token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	hc := cl.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return st, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return st, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e api.ErrorBody
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = http.StatusText(resp.StatusCode)
		}
		return st, api.Errorf(resp.StatusCode, "%s", e.Error)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return st, nil
}
