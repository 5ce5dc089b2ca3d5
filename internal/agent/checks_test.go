package agent

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// TestHealthChecks runs a machine with an HTTP service check against a
// server the test controls, and watches the status follow it in the API and
// through OnChange.
func TestHealthChecks(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/health" || !healthy.Load() {
			http.Error(w, "database unreachable", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok"))
	}))
	defer srv.Close()
	_, portStr, _ := net.SplitHostPort(srv.Listener.Addr().String())
	port, _ := strconv.Atoi(portStr)

	var changes atomic.Int64
	dir := t.TempDir()
	a, err := New(Config{DataDir: dir, Region: "ams", Driver: newExecDriver(t), Logger: testLogger(t),
		OnChange: func() { changes.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.StopAll(context.Background()); a.Close() })

	cfg := shConfig("exec sleep 60")
	cfg.Services = []api.MachineService{{Protocol: "tcp", InternalPort: port, Checks: []api.MachineServiceCheck{{
		Type: ptr("http"), Path: ptr("/health"), Interval: api.Dur(20 * time.Millisecond), Timeout: api.Dur(time.Second),
	}}}}
	m := create(t, a, cfg)
	status := func() string {
		got, _ := a.GetMachine(context.Background(), ref(m.ID))
		if len(got.Checks) != 1 {
			return "none"
		}
		return got.Checks[0].Status + " " + got.Checks[0].Output
	}
	waitFor(t, "check passing", func() bool { return status()[:7] == "passing" })
	before := changes.Load()
	healthy.Store(false)
	waitFor(t, "check critical", func() bool { return status() == "critical 503 Service Unavailable: database unreachable" })
	if changes.Load() == before {
		t.Error("OnChange not called for a check turning critical")
	}
	got, _ := a.GetMachine(context.Background(), ref(m.ID))
	if got.Checks[0].Name != "servicecheck-00-http-"+portStr || got.Checks[0].UpdatedAt == nil {
		t.Errorf("check = %+v", got.Checks[0])
	}
	// A stopped machine has no checks running.
	if err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	if s := status(); s != "none" {
		t.Errorf("stopped machine reports checks: %s", s)
	}
}
