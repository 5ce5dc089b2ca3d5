package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// TestServerWithAgents runs a control plane and two agents as separate
// processes joined over real UDP and TCP gossip: a machine created through
// the control plane in iad runs on the iad agent, and the control plane
// drives it there.
func TestServerWithAgents(t *testing.T) {
	ctx := context.Background()
	gossip := func() string { return "127.0.0.1:" + strconv.Itoa(freePort(t)) }
	ga, gb, gs := gossip(), gossip(), gossip()
	natsAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	srv := startFlame(t, "server", "--data-dir", t.TempDir(), "--api-addr", "127.0.0.1:0", "--plain-http",
		"--region", "ams", "--host-id", "control-1", "--gossip-addr", gs, "--nats-addr", natsAddr)
	var admin, url string
	re := regexp.MustCompile(`^\s+(flame_\S+)$|Machines API on (http://[0-9.:]+[0-9])`)
	for url == "" {
		m := srv.waitMatch(t, re, "its API")
		if m[1] != "" {
			admin = m[1]
		}
		url = m[2]
	}
	if admin == "" {
		t.Fatal("flame server printed no admin token")
	}
	c := api.NewClient(url, admin)
	// Each agent enrolls with a join token minted for it, read from a file.
	agent := func(id, region, gossipAddr string, join ...string) *proc {
		jt, err := c.CreateJoinToken(ctx, api.CreateJoinTokenInput{HostID: id})
		if err != nil {
			t.Fatal(err)
		}
		tokenFile := filepath.Join(t.TempDir(), "join-token")
		if err := os.WriteFile(tokenFile, []byte(jt.Token+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"agent", "--data-dir", t.TempDir(), "--join-token-file", tokenFile, "--control-plane", url, "--api-addr", "127.0.0.1:0",
			"--driver", "exec", "--allow-host-exec", "--region", region, "--host-id", id, "--gossip-addr", gossipAddr, "--nats-url", "nats://" + natsAddr}
		for _, j := range join {
			args = append(args, "--join", j)
		}
		if id == "ams-1" {
			args = append(args, "--edge-addr", "127.0.0.1:0")
		}
		return startFlame(t, args...)
	}
	// The agents join the server's gossip and publish events on its NATS.
	a := agent("ams-1", "ams", ga, gs)
	a.apiURL(t)
	edge := a.waitLine(t, regexp.MustCompile(`edge proxy on http://([0-9.:]+)`), "its edge")
	b := agent("iad-1", "iad", gb, gs)
	b.apiURL(t)
	if _, err := c.CreateOrg(ctx, api.Org{Slug: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	port, port80 := freePort(t), 80
	var m *api.Machine
	var err error
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		// The server learns of the hosts by gossip: until then there is
		// no room anywhere.
		cfg := demoConfig(port)
		cfg.Services = []api.MachineService{{Protocol: "tcp", InternalPort: port, Ports: []api.MachinePort{{Port: &port80, Handlers: []string{"http"}}}}}
		m, err = c.Create(ctx, "demo", api.LaunchMachineInput{Region: "iad", Config: cfg})
		if err == nil || time.Now().After(end) {
			break
		}
	}
	if err != nil {
		t.Fatalf("create through the control plane: %v", err)
	}
	t.Cleanup(func() { killWorkloads(m.ID) })
	if who := demoIdentity(t, port); flyVar(who, "FLY_REGION") != "iad" || flyVar(who, "FLY_MACHINE_ID") != m.ID {
		t.Fatalf("demo app says %v", who)
	}
	// The ams agent's edge delivers a request for demo.localhost to it,
	// through the iad agent's proxy, once gossip has brought the machine.
	var who map[string]any
	for end := time.Now().Add(20 * time.Second); who == nil && time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		req, _ := http.NewRequest("GET", "http://"+edge+"/", nil)
		req.Host = "demo.localhost"
		if resp, err := http.DefaultClient.Do(req); err == nil {
			if resp.StatusCode == 200 {
				json.NewDecoder(resp.Body).Decode(&who)
			}
			resp.Body.Close()
		}
	}
	if flyVar(who, "FLY_REGION") != "iad" || flyVar(who, "FLY_MACHINE_ID") != m.ID || flyVar(who, "FLY_APP_NAME") != "demo" {
		t.Fatalf("through the ams edge the demo app says %v", who)
	}
	// Follow the app's logs, then make the demo app log a request: the line
	// comes over the event bus from the iad agent.
	lctx, lcancel := context.WithTimeout(ctx, 20*time.Second)
	defer lcancel()
	lreq, _ := http.NewRequestWithContext(lctx, "GET", url+"/v1/apps/demo/logs?follow=true", nil)
	lreq.Header.Set("Authorization", "Bearer "+admin)
	lresp, err := http.DefaultClient.Do(lreq)
	if err != nil || lresp.StatusCode != 200 {
		t.Fatalf("follow logs: %v %v", err, lresp)
	}
	defer lresp.Body.Close()
	if r, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/log-probe", port)); err == nil {
		r.Body.Close()
	}
	for sc, got := bufio.NewScanner(lresp.Body), false; !got; {
		if !sc.Scan() {
			t.Fatalf("the request's log line never came: %v", sc.Err())
		}
		var l api.LogEntry
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.MachineID == m.ID && strings.Contains(l.Message, "/log-probe") && l.Region == "iad" {
			got = true
		}
	}
	lcancel()

	// Follow the app's events, then stop the machine: its exit comes over
	// the event bus from the iad agent.
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(rctx, "GET", url+"/v1/apps/demo/events?follow=true", nil)
	req.Header.Set("Authorization", "Bearer "+admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("follow events: %v %v", err, resp)
	}
	defer resp.Body.Close()
	if err := c.Stop(ctx, "demo", m.ID, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	for sc, got := bufio.NewScanner(resp.Body), false; !got; {
		if !sc.Scan() {
			t.Fatalf("no stop event came over the bus: %v", sc.Err())
		}
		var ev api.AppEvent
		if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.MachineID == m.ID && ev.Event.Type == "stop" && ev.Region == "iad" {
			got = true
		}
	}
	if n := workloads(m.ID); n != 0 {
		t.Fatalf("stopped machine has %d processes", n)
	}
	if err := c.Destroy(ctx, "demo", m.ID, true); err != nil {
		t.Fatal(err)
	}
	if ms, err := c.List(ctx, "demo", api.ListMachinesOptions{}); err != nil || len(ms) != 0 {
		t.Fatalf("after destroy: %v %+v", err, ms)
	}
}
