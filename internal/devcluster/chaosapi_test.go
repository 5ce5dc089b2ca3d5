package devcluster

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/netsim"
)

// TestChaosAPI drives the fault API over HTTP as `flame chaos` does: only
// the admin token may, bad input is refused naming the field, unknown
// hosts and regions are 404s, and each action reaches the network.
func TestChaosAPI(t *testing.T) {
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(ctx, Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams", "iad"}, HostsPerRegion: 1,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewDriver:    func(string, int, string) (driver.Driver, error) { return exec.New(exec.Config{}, nil), nil },
		ControlPlane: true, Chaos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if c.Plane.AdminToken == "" {
		t.Fatal("no admin token on a fresh data dir")
	}
	orgToken, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	admin := ChaosClient{URL: c.Plane.URL(), Token: c.Plane.AdminToken}

	t.Run("auth", func(t *testing.T) {
		for _, tc := range []struct {
			token string
			want  int
		}{{"", 401}, {"flame_nope", 401}, {orgToken, 403}, {"agent-secret", 401}} {
			cl := ChaosClient{URL: c.Plane.URL(), Token: tc.token}
			_, err := cl.Status(ctx)
			_, err2 := cl.Do(ctx, "partition", ChaosRequest{A: []string{"ams"}, B: []string{"iad"}})
			for _, e := range []error{err, err2} {
				var ae *api.Error
				if !errors.As(e, &ae) || ae.Status != tc.want {
					t.Errorf("token %q: %v, want %d", tc.token, e, tc.want)
				}
			}
		}
		if st := c.Status(); len(st.Links) != 0 {
			t.Fatalf("a refused call changed the faults: %+v", st)
		}
		st, err := admin.Status(ctx)
		if err != nil || len(st.Killed)+len(st.Stalled)+len(st.Links) != 0 {
			t.Fatalf("status: %+v, %v", st, err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		pct := func(v float64) *float64 { return &v }
		ms := func(v int64) *int64 { return &v }
		for _, tc := range []struct {
			action string
			req    ChaosRequest
			status int
			says   string
		}{
			{"partition", ChaosRequest{A: []string{"ams"}}, 422, "b is required"},
			{"partition", ChaosRequest{A: []string{""}, B: []string{"iad"}}, 422, "a[0]"},
			{"partition", ChaosRequest{A: []string{"ams"}, B: []string{"ams-1"}}, 422, "both sides"},
			{"partition", ChaosRequest{A: []string{"lhr"}, B: []string{"iad"}}, 404, `"lhr"`},
			{"loss", ChaosRequest{A: []string{"ams"}, B: []string{"iad"}}, 422, "percent"},
			{"loss", ChaosRequest{A: []string{"ams"}, B: []string{"iad"}, Percent: pct(120)}, 422, "percent"},
			{"slow-link", ChaosRequest{A: []string{"ams"}, B: []string{"iad"}}, 422, "delay_ms"},
			{"slow-link", ChaosRequest{A: []string{"ams"}, B: []string{"iad"}, DelayMS: ms(-1)}, 422, "delay_ms"},
			{"stall-host", ChaosRequest{Host: "ams-1"}, 422, "duration_ms"},
			{"stall-host", ChaosRequest{Host: "ams-1", DurationMS: ms(0)}, 422, "duration_ms"},
			{"stall-host", ChaosRequest{Host: "ams", DurationMS: ms(10)}, 404, `"ams"`},
			{"kill-host", ChaosRequest{}, 422, "host is required"},
			{"kill-host", ChaosRequest{Host: "syd-1"}, 404, "syd-1"},
			{"kill-region", ChaosRequest{Region: "syd"}, 404, "syd"},
			{"kill-region", ChaosRequest{Region: "ams-1"}, 404, "ams-1"},
			{"kill-machine", ChaosRequest{App: "demo"}, 422, "machine is required"},
			{"kill-machine", ChaosRequest{App: "demo", Machine: "nope"}, 404, "nope"},
			{"unplug", ChaosRequest{}, 404, "kill-region"},
		} {
			_, err := admin.Do(ctx, tc.action, tc.req)
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Status != tc.status || !strings.Contains(ae.Message, tc.says) {
				t.Errorf("%s %+v: %v, want %d saying %q", tc.action, tc.req, err, tc.status, tc.says)
			}
		}
		// Strict JSON: an unknown field is a 400.
		req, _ := http.NewRequest("POST", c.Plane.URL()+"/v1/chaos/heal", strings.NewReader(`{"hosts": ["ams-1"]}`))
		req.Header.Set("Authorization", "Bearer "+c.Plane.AdminToken)
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 400 {
			t.Errorf("unknown field: %v %v, want 400", resp.Status, err)
		} else {
			resp.Body.Close()
		}
		if st := c.Status(); len(st.Killed)+len(st.Stalled)+len(st.Links) != 0 {
			t.Fatalf("refused actions changed the faults: %+v", st)
		}
	})

	t.Run("actions", func(t *testing.T) {
		do := func(action string, req ChaosRequest) FaultStatus {
			t.Helper()
			st, err := admin.Do(ctx, action, req)
			if err != nil {
				t.Fatalf("%s: %v", action, err)
			}
			return st
		}
		p, d := 12.5, int64(40)
		do("partition", ChaosRequest{A: []string{"ams"}, B: []string{"control", "iad"}})
		do("loss", ChaosRequest{A: []string{"ams-1"}, B: []string{"iad"}, Percent: &p})
		st := do("slow-link", ChaosRequest{A: []string{"iad-1"}, B: []string{"ams"}, DelayMS: &d})
		if got := c.Net.Link("ams-1", "iad-1"); !got.Cut || got.Loss != 0.125 || got.Delay != 40*time.Millisecond {
			t.Errorf("link ams-1–iad-1: %+v", got)
		}
		if got := c.Net.Link("ams-1", "control"); !got.Cut {
			t.Errorf("link ams-1–control: %+v, want cut", got)
		}
		if len(st.Links) != 3 || st.Links[1].Percent != 12.5 || st.Links[2].DelayMS != 40 {
			t.Errorf("status: %+v", st)
		}
		if st = do("heal", ChaosRequest{}); len(st.Links) != 0 || c.Net.Link("ams-1", "iad-1") != (netsim.LinkFault{}) {
			t.Errorf("after heal: %+v, link %+v", st, c.Net.Link("ams-1", "iad-1"))
		}
		long, short := int64(60_000), int64(1)
		if st = do("stall-host", ChaosRequest{Host: "iad-1", DurationMS: &long}); len(st.Stalled) != 1 || time.Until(st.Stalled[0].Until) < 50*time.Second {
			t.Errorf("stalled: %+v", st)
		}
		do("stall-host", ChaosRequest{Host: "iad-1", DurationMS: &short})
		waitUntil(t, "the stall to end", func() bool { return len(c.Status().Stalled) == 0 })
		if st = do("kill-host", ChaosRequest{Host: "iad-1"}); len(st.Killed) != 1 || !c.Killed("iad-1") {
			t.Errorf("killed: %+v", st)
		}
		for _, a := range []struct {
			action string
			req    ChaosRequest
		}{{"kill-host", ChaosRequest{Host: "iad-1"}}, {"kill-region", ChaosRequest{Region: "iad"}}, {"stall-host", ChaosRequest{Host: "iad-1", DurationMS: &long}}} {
			if _, err := admin.Do(ctx, a.action, a.req); !errors.Is(err, api.ErrConflict) {
				t.Errorf("%s of a killed host: %v, want 409", a.action, err)
			}
		}
		if st = do("kill-region", ChaosRequest{Region: "ams"}); len(st.Killed) != 2 || !c.Killed("ams-1") {
			t.Errorf("killed: %+v", st)
		}
		if st = do("revive", ChaosRequest{Region: "ams"}); len(st.Killed) != 1 || st.Killed[0] != "iad-1" || c.Killed("ams-1") {
			t.Errorf("after revive: %+v", st)
		}
		for _, tc := range []struct {
			req  ChaosRequest
			want int
		}{{ChaosRequest{Host: "ams-1"}, 409}, {ChaosRequest{Region: "ams"}, 409}, {ChaosRequest{Region: "lhr"}, 404},
			{ChaosRequest{}, 422}, {ChaosRequest{Host: "iad-1", Region: "iad"}, 422}} {
			var ae *api.Error
			if _, err := admin.Do(ctx, "revive", tc.req); !errors.As(err, &ae) || ae.Status != tc.want {
				t.Errorf("revive %+v: %v, want %d", tc.req, err, tc.want)
			}
		}
	})

	// The chaos API lives on while the control plane is down: only the
	// admin token it verified before may act, the plane's own routes are
	// a 503 saying why, and a restart brings the same tokens back.
	t.Run("control plane", func(t *testing.T) {
		org := api.NewClient(c.Plane.URL(), orgToken)
		if _, err := org.CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "personal"}); err != nil {
			t.Fatal(err)
		}
		var ae *api.Error
		if _, err := (ChaosClient{URL: c.Plane.URL(), Token: orgToken}).Do(ctx, "kill-control-plane", ChaosRequest{}); !errors.As(err, &ae) || ae.Status != 403 {
			t.Fatalf("kill by an org token: %v, want 403", err)
		}
		if _, err := admin.Do(ctx, "restart-control-plane", ChaosRequest{}); !errors.Is(err, api.ErrConflict) {
			t.Errorf("restart a live control plane: %v, want 409", err)
		}
		st, err := admin.Do(ctx, "kill-control-plane", ChaosRequest{})
		if err != nil || st.ControlPlane != "killed" || !c.PlaneDown() {
			t.Fatalf("kill-control-plane: %+v, %v", st, err)
		}
		if _, err := admin.Do(ctx, "kill-control-plane", ChaosRequest{}); !errors.Is(err, api.ErrConflict) {
			t.Errorf("kill a killed control plane: %v, want 409", err)
		}
		if _, err := org.ListApps(ctx, "personal"); !errors.As(err, &ae) || ae.Status != 503 || !strings.Contains(ae.Message, "restart-control-plane") {
			t.Errorf("the API while the plane is down: %v, want a 503 saying why", err)
		}
		for _, tc := range []struct {
			token string
			want  int
		}{{"", 401}, {orgToken, 503}, {"flame_nope", 503}} {
			if _, err := (ChaosClient{URL: c.Plane.URL(), Token: tc.token}).Do(ctx, "restart-control-plane", ChaosRequest{}); !errors.As(err, &ae) || ae.Status != tc.want {
				t.Errorf("restart with token %q while down: %v, want %d", tc.token, err, tc.want)
			}
		}
		if st, err := admin.Status(ctx); err != nil || st.ControlPlane != "killed" {
			t.Errorf("status while down: %+v, %v", st, err)
		}
		if st, err = admin.Do(ctx, "restart-control-plane", ChaosRequest{}); err != nil || st.ControlPlane != "up" || c.PlaneDown() {
			t.Fatalf("restart-control-plane: %+v, %v", st, err)
		}
		apps, err := org.ListApps(ctx, "personal")
		if err != nil || len(apps) != 1 || apps[0].Name != "shop" {
			t.Fatalf("apps after the restart, same token: %+v, %v", apps, err)
		}
		if _, err := (ChaosClient{URL: c.Plane.URL(), Token: orgToken}).Status(ctx); !errors.As(err, &ae) || ae.Status != 403 {
			t.Errorf("status by an org token after the restart: %v, want 403", err)
		}
	})
}
