package httpapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

func TestLogsTail(t *testing.T) {
	b := newFake()
	b.logs = []api.LogEntry{
		{Timestamp: time.Unix(1700000000, 0).UTC(), Stream: "stdout", Message: "one"},
		{Timestamp: time.Unix(1700000001, 0).UTC(), Stream: "stderr", Message: "two"},
	}
	w := do(t, newServer(t, b), "GET", machinePath+"/logs?tail=2", "")
	if w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/x-ndjson" {
		t.Errorf("Content-Type = %q", ct)
	}
	if o := b.last(t).Arg.(api.LogOptions); o != (api.LogOptions{Tail: 2}) {
		t.Errorf("options = %+v", o)
	}
	lines := strings.Split(strings.TrimSuffix(w.Body.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines: %q", len(lines), w.Body)
	}
	for i, line := range lines {
		var e api.LogEntry
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if e != b.logs[i] {
			t.Errorf("line %d = %+v, want %+v", i, e, b.logs[i])
		}
	}
}

func TestLogsEmpty(t *testing.T) {
	w := do(t, newServer(t, newFake()), "GET", machinePath+"/logs", "")
	if w.Code != 200 || w.Body.Len() != 0 || w.Header().Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("got %d %q %q", w.Code, w.Header().Get("Content-Type"), w.Body)
	}
}

// A failure after lines went out cannot change the status any more; the
// stream ends with an error line.
func TestLogsFailAfterOutput(t *testing.T) {
	b := newFake()
	b.logs = []api.LogEntry{{Message: "one"}}
	b.logsErr = api.Errorf(503, "host went away")
	w := do(t, newServer(t, b), "GET", machinePath+"/logs", "")
	if w.Code != 200 {
		t.Fatalf("status %d", w.Code)
	}
	lines := strings.Split(strings.TrimSuffix(w.Body.String(), "\n"), "\n")
	if len(lines) != 2 || lines[1] != `{"error":"host went away"}` {
		t.Fatalf("body %q", w.Body)
	}
}

// Following, the client sees each line as the backend emits it, and the
// handler ends when the client goes away.
func TestLogsFollow(t *testing.T) {
	b := newFake()
	b.logs = []api.LogEntry{{Message: "old"}}
	b.feed = make(chan api.LogEntry)
	b.logsDone = make(chan error, 1)
	srv := httptest.NewServer(newServer(t, b))
	defer srv.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+machinePath+"/logs?follow=true&tail=5", nil)
	req.Header.Set("Authorization", "Bearer secret")
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("status %d, Content-Type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}

	rd := bufio.NewReader(res.Body)
	readLine := func(want string) {
		t.Helper()
		line, err := rd.ReadBytes('\n')
		if err != nil {
			t.Fatalf("reading %q: %v", want, err)
		}
		var e api.LogEntry
		if err := json.Unmarshal(line, &e); err != nil || e.Message != want {
			t.Fatalf("line %q, want message %q (%v)", line, want, err)
		}
	}
	readLine("old")
	for i := range 3 {
		// The feed is unbuffered: the line can only arrive if the
		// handler flushed it as it was emitted.
		msg := fmt.Sprintf("new %d", i)
		b.feed <- api.LogEntry{Message: msg}
		readLine(msg)
	}

	cancel()
	select {
	case err := <-b.logsDone:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Logs returned %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler still streaming after the client went away")
	}

	cs := b.Calls()
	if len(cs) != 2 || cs[0].Name != "GetMachine" || cs[1].Arg.(api.LogOptions) != (api.LogOptions{Tail: 5, Follow: true}) {
		t.Errorf("calls = %+v", cs)
	}
}
