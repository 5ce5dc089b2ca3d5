package devcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestRemoteLoadSteersTheEdge: requests held open on a machine of ams-2,
// arriving through the iad edge, are published by ams-2 as that machine's
// load; the ams edge (on ams-1, which carries none of them) then sends every
// request to the other ams machine, and once the held requests reach the
// machine's hard limit it sends that machine none at all, even when asked
// for it by name. Both machines are on ams-2, so nothing but load tells them
// apart: without the published load the edge would share requests between
// them.
func TestRemoteLoadSteersTheEdge(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}}, nil)
	edges := c.Edges()
	byHost := map[string]*Host{}
	for _, h := range c.Hosts {
		byHost[h.ID] = h
	}
	ams, ams2 := byHost["ams-1"], byHost["ams-2"]
	if ams == nil || ams2 == nil || edges["ams"] == "" || edges["iad"] == "" {
		t.Fatalf("hosts %v, edges %v", byHost, edges)
	}

	// Two machines on ams-2: busy, with a hard limit of 2, and spare.
	const hard = 2
	create := func(limits *api.MachineServiceConcurrency) string {
		t.Helper()
		port := freePort(t)
		m, err := c.HostClient(ams2).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
			Services: []api.MachineService{{
				Protocol: "tcp", InternalPort: port,
				Ports:       []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
				Checks:      []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
				Concurrency: limits,
			}},
		}})
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		return m.ID
	}
	busy := create(&api.MachineServiceConcurrency{Type: api.ConcurrencyRequests, SoftLimit: 1, HardLimit: hard})
	spare := create(nil)
	targetAt := func(h *Host, id string) *route.Target {
		for _, tg := range h.Proxy.Table().Targets("demo", 80) {
			if tg.MachineID == id {
				return tg
			}
		}
		return nil
	}
	target := func(id string) *route.Target { return targetAt(ams, id) }
	routable := func(h *Host, id string) bool {
		tg := targetAt(h, id)
		return tg != nil && tg.Excluded == route.Included
	}
	waitUntil(t, "both machines routable at the ams and iad edges", func() bool {
		return routable(ams, busy) && routable(ams, spare) && routable(byHost["iad-1"], busy)
	})

	client := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	ask := func(edge string, hdr map[string]string) (status int, machine string) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+edge+"/", nil)
		req.Host = "demo.localhost"
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request at %s: %v", edge, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return resp.StatusCode, ""
		}
		var id struct {
			Env map[string]string `json:"env"`
		}
		if err := json.Unmarshal(b, &id); err != nil {
			t.Fatalf("not the demo app's answer: %s", b)
		}
		return 200, id.Env["FLY_MACHINE_ID"]
	}

	// Requests held open on the busy machine, through the iad edge: the
	// ams edge does not carry them, so it knows of them only from ams-2.
	holdCtx, release := context.WithCancel(ctx)
	var held sync.WaitGroup
	t.Cleanup(func() { release(); held.Wait() })
	hold := func() {
		held.Add(1)
		go func() {
			defer held.Done()
			req, _ := http.NewRequestWithContext(holdCtx, "GET", "http://"+edges["iad"]+"/?delay=10m", nil)
			req.Host = "demo.localhost"
			req.Header.Set("fly-force-instance-id", busy)
			resp, err := client.Do(req)
			if err == nil {
				resp.Body.Close()
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
			if holdCtx.Err() == nil {
				t.Errorf("held request answered before its release: %v", err)
			}
		}()
	}
	published := func(n int) func() bool {
		return func() bool { tg := target(busy); return tg != nil && tg.Published == n }
	}

	hold()
	waitUntil(t, "one held request published to the ams edge", published(1))
	for i := range 20 {
		if status, m := ask(edges["ams"], nil); status != 200 || m != spare {
			t.Fatalf("request %d with one held on %s: %d from %q, want 200 from the spare machine %s", i, busy, status, m, spare)
		}
	}
	// Under its hard limit the busy machine still takes a request that
	// asks for it.
	if status, m := ask(edges["ams"], map[string]string{"fly-force-instance-id": busy}); status != 200 || m != busy {
		t.Fatalf("forced to the busy machine under its hard limit: %d from %q", status, m)
	}

	hold()
	waitUntil(t, "two held requests published to the ams edge", published(hard))
	if status, _ := ask(edges["ams"], map[string]string{"fly-force-instance-id": busy}); status != http.StatusServiceUnavailable {
		t.Fatalf("forced to the busy machine at its hard limit: %d, want 503", status)
	}
	for i := range 10 {
		if status, m := ask(edges["ams"], nil); status != 200 || m != spare {
			t.Fatalf("request %d with the busy machine at its hard limit: %d from %q, want the spare %s", i, status, m, spare)
		}
	}

	// Released, the load goes back to zero and is published as such.
	release()
	held.Wait()
	waitUntil(t, "the released load published", published(0))
}
