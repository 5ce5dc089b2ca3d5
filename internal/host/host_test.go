package host

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// These tests drive a whole host (agent, exec driver, HTTP API) through the
// Go client and raw HTTP, the way users reach it.

func shell(script string) *api.MachineConfig {
	return &api.MachineConfig{Image: "exec:/bin/sh", Init: api.MachineInit{Cmd: []string{"-c", script}}}
}

func TestMachineLifecycleOverHTTP(t *testing.T) {
	_, c := newTestHost(t)
	ctx := context.Background()
	m, err := c.Create(ctx, "web", api.LaunchMachineInput{Config: shell(`echo booted; exec sleep 60`), Name: "web-1"})
	if err != nil {
		t.Fatal(err)
	}
	if m.State != api.StateStarted || m.Name != "web-1" || m.Region != "ams" || m.HostStatus != "ok" {
		t.Errorf("created %+v", m)
	}
	if err := c.Wait(ctx, "web", m.ID, api.WaitOptions{State: "started", Timeout: 5 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := c.Wait(ctx, "web", m.ID, api.WaitOptions{State: "stopped", Timeout: time.Second}); !errors.Is(err, api.ErrTimeout) {
		t.Errorf("wait that cannot succeed: %v, want 408", err)
	}
	res, err := c.Exec(ctx, "web", m.ID, api.ExecRequest{Cmd: "sh -c 'echo $FLY_APP_NAME'"})
	if err != nil || strings.TrimSpace(res.Stdout) != "web" {
		t.Errorf("exec: %+v %v", res, err)
	}
	var lines []string
	deadline := time.Now().Add(5 * time.Second)
	for len(lines) == 0 && time.Now().Before(deadline) {
		logs, err := c.Logs(ctx, "web", m.ID, 10)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range logs {
			lines = append(lines, l.Message)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(lines) != 1 || lines[0] != "booted" {
		t.Errorf("logs = %q", lines)
	}
	if err := c.Stop(ctx, "web", m.ID, api.StopMachineInput{Signal: "SIGTERM", Timeout: api.Dur(time.Second)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Start(ctx, "web", m.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, "web", m.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "other", m.ID); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("machine seen through another app: %v", err)
	}
}

func TestFollowLogsOverHTTP(t *testing.T) {
	h, c := newTestHost(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m, err := c.Create(ctx, "web", api.LaunchMachineInput{Config: shell(`i=0; while [ $i -lt 3 ]; do echo line$i; i=$((i+1)); sleep 0.05; done; exec sleep 60`)})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+h.Addr()+"/v1/apps/web/machines/"+m.ID+"/logs?follow=true", nil)
	req.Header.Set("Authorization", "Bearer t")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for i := 0; i < 3; i++ {
		if !sc.Scan() {
			t.Fatalf("stream ended after %d lines: %v", i, sc.Err())
		}
		var e api.LogEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil || e.Message != "line"+string(rune('0'+i)) {
			t.Fatalf("line %d = %s (%v)", i, sc.Bytes(), err)
		}
	}
}

// TestBadInputOverHTTP sends what a careless or hostile client might: each
// gets a 4xx with a message, and the host keeps serving.
func TestBadInputOverHTTP(t *testing.T) {
	h, c := newTestHost(t)
	base := "http://" + h.Addr() + "/v1/apps/web/machines"
	m, err := c.Create(context.Background(), "web", api.LaunchMachineInput{Config: shell("exec sleep 60")})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		method, path, body, auth string
		status                   int
		mention                  string
	}{
		{"GET", "", "", "", 401, ""},
		{"GET", "", "", "Bearer nope", 401, ""},
		{"POST", "", `{"config": `, "Bearer t", 400, ""},
		{"POST", "", `{"config": {"image": "x"}, "bogus": 1}`, "Bearer t", 400, "bogus"},
		{"POST", "", `{"config": {"image": "x", "guest": {"memory_mb": "lots"}}}`, "Bearer t", 400, "memory_mb"},
		{"POST", "", `{"config": {"image": "x", "guest": {"memory_mb": 300}}}`, "Bearer t", 422, "memory_mb"},
		{"POST", "", `{"config": {"image": ""}}`, "Bearer t", 422, "image"},
		{"POST", "", `{"region": "ams"}`, "Bearer t", 422, "config"},
		{"POST", "", `{"config": {"image": "x", "stop_config": {"signal": "SIGNOPE"}}}`, "Bearer t", 422, "signal"},
		{"POST", "", `{"config": {"image": "x", "services": [{"protocol": "tcp", "internal_port": 8080, "autostop": "sometimes"}]}}`, "Bearer t", 400, "autostop"},
		{"POST", "/" + m.ID + "/signal", `{"signal": "SIGWHAT"}`, "Bearer t", 400, "signal"},
		{"POST", "/" + m.ID + "/stop", `{"timeout": "forever"}`, "Bearer t", 400, "timeout"},
		{"GET", "/" + m.ID + "/wait?state=sideways", "", "Bearer t", 400, "state"},
		{"GET", "/" + m.ID + "/wait?timeout=abc", "", "Bearer t", 400, "timeout"},
		{"GET", "/nothexnothex00", "", "Bearer t", 404, ""},
		{"DELETE", "/" + m.ID, "", "Bearer t", 409, "force"},
		{"POST", "/" + m.ID + "/suspend", "", "Bearer t", 501, "suspend"},
	}
	for _, tc := range cases {
		req, _ := http.NewRequest(tc.method, base+tc.path, strings.NewReader(tc.body))
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var body api.ErrorBody
		if resp.StatusCode != tc.status || json.Unmarshal(b, &body) != nil || body.Error == "" {
			t.Errorf("%s %s %s: %d %s, want %d with an error message", tc.method, tc.path, tc.body, resp.StatusCode, b, tc.status)
			continue
		}
		if !strings.Contains(body.Error, tc.mention) {
			t.Errorf("%s %s %s: message %q does not mention %q", tc.method, tc.path, tc.body, body.Error, tc.mention)
		}
	}
	if got, err := c.Get(context.Background(), "web", m.ID); err != nil || got.State != api.StateStarted {
		t.Errorf("machine after bad input: %+v %v", got, err)
	}
}
