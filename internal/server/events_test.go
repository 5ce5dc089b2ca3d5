package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// TestAppEvents: an app's machine events come as history from the hosts and,
// followed, live over the event bus, each once.
func TestAppEvents(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	cl, tok := orgWithApp(t, c, "acme", "shop")
	first, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(rctx, "GET", c.Plane.URL()+"/v1/apps/shop/events?follow=true", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	lines := make(chan api.AppEvent, 100)
	go func() {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			var ev api.AppEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				lines <- ev
			}
		}
		close(lines)
	}()
	// Then: a second machine, stopped, comes over the bus.
	second, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Stop(ctx, "shop", second.ID, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	want := func() bool {
		return seen[first.ID+" launch"] > 0 && seen[second.ID+" launch"] > 0 && seen[second.ID+" exit"] > 0
	}
	for !want() {
		ev, ok := <-lines
		if !ok {
			t.Fatalf("stream ended; saw %v", seen)
		}
		if ev.App != "shop" || ev.Event == nil {
			t.Fatalf("odd event %+v", ev)
		}
		key := ev.MachineID + " " + ev.Event.Type
		seen[key]++
		if ev.Event.ID != "" {
			seen[ev.Event.ID]++
			if seen[ev.Event.ID] > 1 {
				t.Fatalf("event %s sent twice", ev.Event.ID)
			}
		}
	}
}
