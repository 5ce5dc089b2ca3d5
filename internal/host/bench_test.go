package host

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver/exec"
)

// newTestHost runs a host with the exec driver on loopback.
func newTestHost(tb testing.TB) (*Host, *api.Client) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	h, err := New(Config{DataDir: tb.TempDir(), Region: "ams", Listener: ln, Token: "t", Driver: exec.New(exec.Config{}, nil)})
	if err != nil {
		tb.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		h.StopMachines(context.Background())
		h.Close()
	})
	return h, api.NewClient("http://"+h.Addr(), "t")
}

var sleeper = &api.MachineConfig{Image: "exec:/bin/sleep", Init: api.MachineInit{Cmd: []string{"3600"}},
	StopConfig: &api.StopConfig{Signal: ptr("SIGKILL")}}

func ptr[T any](v T) *T { return &v }

// reportPercentiles adds p50 and p99 of ds to the benchmark's output.
func reportPercentiles(b *testing.B, ds []time.Duration) {
	p50, p99 := percentiles(ds)
	b.ReportMetric(p50, "p50-ms")
	b.ReportMetric(p99, "p99-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkCreateToStarted times POST /machines followed by
// GET .../wait?state=started, through HTTP, with real processes. Each
// machine is destroyed after it is measured, outside the timed part, so
// the host's capacity admits any number of runs.
func BenchmarkCreateToStarted(b *testing.B) {
	_, c := newTestHost(b)
	ctx := context.Background()
	var ds []time.Duration
	for b.Loop() {
		t0 := time.Now()
		m, err := c.Create(ctx, "bench", api.LaunchMachineInput{Config: sleeper})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(ctx, "bench", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 10 * time.Second}); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
		b.StopTimer()
		if err := c.Destroy(ctx, "bench", m.ID, true); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	reportPercentiles(b, ds)
}

// BenchmarkStoppedToStarted times POST .../start followed by a wait for
// started, on a stopped machine.
func BenchmarkStoppedToStarted(b *testing.B) {
	_, c := newTestHost(b)
	ctx := context.Background()
	m, err := c.Create(ctx, "bench", api.LaunchMachineInput{Config: sleeper})
	if err != nil {
		b.Fatal(err)
	}
	var ds []time.Duration
	for b.Loop() {
		b.StopTimer()
		if err := c.Stop(ctx, "bench", m.ID, api.StopMachineInput{}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		if _, err := c.Start(ctx, "bench", m.ID); err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(ctx, "bench", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 10 * time.Second}); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
	}
	reportPercentiles(b, ds)
}

// BenchmarkForkExecBaseline is the floor under the two above: starting the
// same program with os.StartProcess, no API, no store, no driver.
func BenchmarkForkExecBaseline(b *testing.B) {
	var ds []time.Duration
	for b.Loop() {
		t0 := time.Now()
		p, err := os.StartProcess("/bin/sleep", []string{"sleep", "3600"}, &os.ProcAttr{})
		if err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
		b.StopTimer()
		p.Kill()
		p.Wait()
		b.StartTimer()
	}
	reportPercentiles(b, ds)
}
