package host

import (
	"context"
	"strings"
	"testing"
	"time"

	fly "github.com/superfly/fly-go"
	"github.com/superfly/fly-go/flaps"
	"github.com/superfly/fly-go/tokens"
)

// TestFlyClientUnchanged drives a host with Fly's own Go client, pointed at it
// the way Fly's tools are (FLY_FLAPS_BASE_URL): a program written for Fly
// works against Flame unchanged.
func TestFlyClientUnchanged(t *testing.T) {
	h, _ := newTestHost(t)
	t.Setenv("FLY_FLAPS_BASE_URL", "http://"+h.Addr())
	ctx := context.Background()
	c, err := flaps.NewWithOptions(ctx, flaps.NewClientOpts{Tokens: tokens.Parse("t")})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Launch(ctx, "web", fly.LaunchMachineInput{
		Name:   "web-1",
		Region: "ams",
		Config: &fly.MachineConfig{
			Image:   "exec:/bin/sh",
			Init:    fly.MachineInit{Cmd: []string{"-c", "exec sleep 60"}},
			Guest:   &fly.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256},
			Env:     map[string]string{"GREETING": "hi"},
			Restart: &fly.MachineRestart{Policy: fly.MachineRestartPolicyOnFailure, MaxRetries: 3},
			Services: []fly.MachineService{{
				Protocol: "tcp", InternalPort: 8080,
				Ports: []fly.MachinePort{{Port: fly.Pointer(80), Handlers: []string{"http"}}},
			}},
			Metadata: map[string]string{"fly_process_group": "app"},
		},
	})
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if len(m.ID) != 14 || m.State != fly.MachineStateStarted {
		t.Fatalf("launched %+v", m)
	}
	if err := c.Wait(ctx, "web", m.ID, flaps.WithWaitStates("started"), flaps.WithWaitTimeout(10*time.Second)); err != nil {
		t.Fatalf("wait started: %v", err)
	}
	list, err := c.List(ctx, "web", "")
	if err != nil || len(list) != 1 || list[0].ID != m.ID {
		t.Fatalf("list: %v %+v", err, list)
	}
	got, err := c.Get(ctx, "web", m.ID)
	if err != nil || got.Config.Env["GREETING"] != "hi" || got.ProcessGroup() != "app" {
		t.Fatalf("get: %v %+v", err, got)
	}
	lease, err := c.AcquireLease(ctx, "web", m.ID, fly.Pointer(30))
	if err != nil || lease.Data == nil || lease.Data.Nonce == "" {
		t.Fatalf("lease: %v %+v", err, lease)
	}
	nonce := lease.Data.Nonce
	if err := c.Stop(ctx, "web", fly.StopMachineInput{ID: m.ID}, ""); err == nil {
		t.Fatal("stop of a leased machine without its nonce succeeded")
	}
	if err := c.Stop(ctx, "web", fly.StopMachineInput{ID: m.ID, Signal: "SIGTERM"}, nonce); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := c.Wait(ctx, "web", m.ID, flaps.WithWaitStates("stopped"), flaps.WithWaitTimeout(10*time.Second)); err != nil {
		t.Fatalf("wait stopped: %v", err)
	}
	if _, err := c.Start(ctx, "web", m.ID, nonce); err != nil {
		t.Fatalf("start: %v", err)
	}
	res, err := c.Exec(ctx, "web", m.ID, &fly.MachineExecRequest{Cmd: "sh -c 'echo $GREETING'"})
	if err != nil || strings.TrimSpace(res.StdOut) != "hi" {
		t.Fatalf("exec: %v %+v", err, res)
	}
	if err := c.SetMetadata(ctx, "web", m.ID, "role", "primary"); err != nil {
		t.Fatalf("set metadata: %v", err)
	}
	if err := c.Cordon(ctx, "web", m.ID, ""); err == nil {
		t.Error("cordon of a leased machine without its nonce succeeded")
	}
	if err := c.Cordon(ctx, "web", m.ID, nonce); err != nil {
		t.Fatalf("cordon: %v", err)
	}
	if err := c.ReleaseLease(ctx, "web", m.ID, nonce); err != nil {
		t.Fatalf("release: %v", err)
	}
	md, err := c.GetMetadata(ctx, "web", m.ID)
	if err != nil || md["role"] != "primary" {
		t.Fatalf("metadata: %v %v", err, md)
	}
	// A kill is a crash as far as the restart policy (on-failure) goes.
	if err := c.Kill(ctx, "web", m.ID); err != nil {
		t.Fatalf("kill: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := c.Get(ctx, "web", m.ID)
		if err != nil {
			t.Fatal(err)
		}
		ev := got.Events[0]
		if ev.Type == "start" && got.Events[1].Type == "exit" && got.Events[1].Request.ExitEvent.Signal == 9 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no restart after kill: %+v", ev)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.Destroy(ctx, "web", fly.RemoveMachineInput{ID: m.ID, Kill: true}, ""); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if _, err := c.Get(ctx, "web", "00000000000000"); err == nil {
		t.Error("get of an unknown machine succeeded")
	}
}
