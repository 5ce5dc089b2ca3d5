package server_test

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/httpserve/httpservetest"
	"github.com/flamehq/flame/internal/server"
)

// follow opens a followed stream and returns its status and a way to end
// it; a refused one is read and closed at once.
func follow(t *testing.T, url, token string) (int, http.Header, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		cancel()
		return resp.StatusCode, resp.Header, func() {}
	}
	return 200, resp.Header, func() { cancel(); resp.Body.Close() }
}

// TestFollowsBounded: an org may follow only so many streams at once —
// app events, app logs and machine logs together — and the server only so
// many in all; beyond either, a 429 with Retry-After. Ending a stream
// frees its place.
func TestFollowsBounded(t *testing.T) {
	ctx := context.Background()
	d := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1,
		server: server.Config{Follows: httpapi.FollowLimits{PerKey: 2, Total: 3}}})
	a, tokA := orgWithApp(t, d, "acme", "web")
	_, tokB := orgWithApp(t, d, "beta", "db")
	_, tokC := orgWithApp(t, d, "gamma", "api")
	m, err := a.Create(ctx, "web", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	base := d.Plane.URL() + "/v1/apps/"
	code, _, endEvents := follow(t, base+"web/events?follow=true", tokA)
	if code != 200 {
		t.Fatalf("first follow: %d", code)
	}
	code, _, endLogs := follow(t, base+"web/logs?follow=true", tokA)
	if code != 200 {
		t.Fatalf("second follow: %d", code)
	}
	code, hdr, _ := follow(t, base+"web/machines/"+m.ID+"/logs?follow=true", tokA)
	if code != http.StatusTooManyRequests || hdr.Get("Retry-After") == "" {
		t.Fatalf("third follow of one org: %d (Retry-After %q), want 429 with Retry-After", code, hdr.Get("Retry-After"))
	}
	// Without follow, nothing is counted.
	if code, body := rawGet(t, base+"web/events", tokA); code != 200 {
		t.Fatalf("events without follow: %d %s", code, body)
	}
	// Another org has its own places, up to the server's total.
	code, _, endB := follow(t, base+"db/events?follow=true", tokB)
	if code != 200 {
		t.Fatalf("another org's follow: %d", code)
	}
	defer endB()
	if code, _, _ := follow(t, base+"api/events?follow=true", tokC); code != http.StatusTooManyRequests {
		t.Fatalf("follow beyond the server's total: %d, want 429", code)
	}
	// Ending one frees its place (the server notices the client leaving).
	endEvents()
	waitUntil(t, "the ended follow's place freed", 10*time.Second, func() bool {
		code, _, end := follow(t, base+"web/machines/"+m.ID+"/logs?follow=true", tokA)
		defer end()
		return code == 200
	})
	endLogs()
}

// TestFollowEndsAfterMaxDuration: a followed stream ends on its own after
// the longest a follow may last (not before; and not later than that plus
// a busy machine's allowance).
func TestFollowEndsAfterMaxDuration(t *testing.T) {
	const max = 700 * time.Millisecond
	d := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1,
		server: server.Config{Follows: httpapi.FollowLimits{MaxDuration: max}}})
	_, tok := orgWithApp(t, d, "acme", "web")
	req, _ := http.NewRequest("GET", d.Plane.URL()+"/v1/apps/web/events?follow=true", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	start := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	ended := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, resp.Body); ended <- err }()
	select {
	case err := <-ended:
		if took := time.Since(start); took < max || err != nil {
			t.Fatalf("the stream ended after %v (%v), want a clean end after %v", took, err, max)
		}
	case <-time.After(max + httpservetest.Allowance):
		t.Fatalf("the stream outlived its %v", max)
	}
}
