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

// TestBusTakesAMachinesEventsFromItsHostOnly: an event on the bus counts
// only when its subject names the host the catalog says runs the machine,
// the app and the machine of its body; a host speaking for another's
// machine (or another app's) is not heard.
func TestBusTakesAMachinesEventsFromItsHostOnly(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2})
	ctx := context.Background()
	cl, tok := orgWithApp(t, c, "acme", "shop")
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	var runs, other string
	for _, h := range c.Hosts {
		if _, err := c.HostClient(h).Get(ctx, "shop", m.ID); err == nil {
			runs = h.ID
		} else {
			other = h.ID
		}
	}
	if runs == "" || other == "" {
		t.Fatalf("machine on %q, other host %q", runs, other)
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(rctx, "GET", c.Plane.URL()+"/v1/apps/shop/events?follow=true", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("follow: %v %v", err, resp)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	// The history comes first, with the stream subscribed already.
	for sc.Scan() {
		var ev api.AppEvent
		if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Event != nil && ev.Event.Type == "launch" {
			break
		}
	}
	publish := func(subject, id, machine string) {
		b, _ := json.Marshal(api.AppEvent{App: "shop", MachineID: machine, Region: "ams",
			Event: &api.MachineEvent{ID: id, Type: "exit", Status: "stopped", Timestamp: time.Now().UnixMilli()}})
		if err := c.Plane.Catalog.Publish(ctx, subject, b); err != nil {
			t.Fatal(err)
		}
	}
	publish(api.EventSubject(other, "shop", m.ID), "forged-other-host", m.ID)
	publish(api.EventSubject(runs, "shop", "0123456789abcd"), "forged-no-machine", "0123456789abcd")
	publish(api.EventSubject(runs, "shop", m.ID), "forged-body", "0123456789abcd")
	publish(api.EventSubject(runs, "shop", m.ID), "genuine", m.ID)
	// One connection published them in order, so the stream's one
	// subscription gets them in order: the genuine one last.
	for sc.Scan() {
		var ev api.AppEvent
		if json.Unmarshal(sc.Bytes(), &ev) != nil || ev.Event == nil {
			continue
		}
		switch ev.Event.ID {
		case "genuine":
			return
		case "forged-other-host", "forged-no-machine", "forged-body":
			t.Fatalf("the stream took %s", ev.Event.ID)
		}
	}
	t.Fatalf("the stream ended before the genuine event: %v", sc.Err())
}
