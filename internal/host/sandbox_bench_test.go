package host

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/image/registry"
)

// sleepImage packs /bin/sleep and the libraries it loads as an image and
// pushes it to a registry served for the benchmark; it returns the registry
// address and the unpacked image directory (the same files runc gets).
func sleepImage(b testing.TB) (regAddr, dir, digest string) {
	b.Helper()
	reg, err := registry.New(registry.Config{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	b.Cleanup(srv.Close)
	regAddr = strings.TrimPrefix(srv.URL, "http://")
	dir = b.TempDir()
	files, err := elfClosure("/bin/sleep")
	if err != nil {
		b.Fatal(err)
	}
	for src, dst := range files {
		if dst == "flame" {
			dst = "bin/sleep"
		}
		if err := copyFile(src, filepath.Join(dir, dst)); err != nil {
			b.Fatal(err)
		}
	}
	img, err := image.Build(context.Background(), image.BuildSpec{Dir: dir, Entrypoint: []string{"/bin/sleep", "3600"}})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	digest, err = image.Push(context.Background(), img, regAddr+"/bench/sleep:latest", image.Remote{})
	if err != nil {
		b.Fatal(err)
	}
	return regAddr, dir, digest
}

// BenchmarkSandboxVersusRunc times create→started of a small image, pinned
// by digest, with a warm cache through the Machines API with the sandbox driver, and `runc run
// -d` of the same root filesystem, in the same run, and reports the ratio.
// It needs root and Debian's runc (`apt-get install runc`).
func BenchmarkSandboxVersusRunc(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("the sandbox driver needs root")
	}
	runc, err := exec.LookPath("runc")
	if err != nil {
		b.Skip("runc not installed (apt-get install runc)")
	}
	regAddr, rootfs, digest := sleepImage(b)
	d, kind, err := NewDriver(DriverConfig{Kind: DriverSandbox, DataDir: b.TempDir(), Registry: regAddr, Index: 90})
	if err != nil {
		b.Fatalf("sandbox driver (as root it must work): %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	h, err := New(Config{DataDir: b.TempDir(), Region: "ams", Listener: ln, Token: "t", Driver: d})
	if err != nil {
		b.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		h.DestroyMachines(context.Background())
		h.Close()
		h.Teardown()
	})
	c := api.NewClient("http://"+h.Addr(), "t")
	ctx := context.Background()
	// Pinned by digest, as deploys pin images: a warm host then needs
	// nothing from the registry (a tag would be resolved on every create).
	cfg := &api.MachineConfig{Image: "bench/sleep@" + digest, StopConfig: &api.StopConfig{Signal: ptr("SIGKILL")}}
	warm, err := c.Create(ctx, "bench", api.LaunchMachineInput{Config: cfg}) // pulls the image
	if err != nil || warm.State != api.StateStarted {
		b.Fatalf("warm-up machine (%s driver): %v %+v", kind, err, warm)
	}

	bundle := runcBundle(b, runc, rootfs)
	runcLog, err := os.Create(filepath.Join(bundle, "runc.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer runcLog.Close()
	var flame, rc []time.Duration
	for i := 0; b.Loop(); i++ {
		t0 := time.Now()
		m, err := c.Create(ctx, "bench", api.LaunchMachineInput{Config: cfg})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(ctx, "bench", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 10 * time.Second}); err != nil {
			b.Fatal(err)
		}
		flame = append(flame, time.Since(t0))
		b.StopTimer()
		if err := c.Destroy(ctx, "bench", m.ID, true); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()

		id := fmt.Sprintf("flamebench-%d-%d", os.Getpid(), i)
		// The detached container keeps runc's stdio: give it files, not
		// pipes, or waiting for runc would wait for the container.
		cmd := exec.Command(runc, "run", "-d", "--bundle", bundle, id)
		cmd.Stdout, cmd.Stderr = runcLog, runcLog
		t0 = time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatalf("runc run: %v (see %s)", err, runcLog.Name())
		}
		rc = append(rc, time.Since(t0))
		b.StopTimer()
		exec.Command(runc, "delete", "-f", id).Run()
		b.StartTimer()
	}
	fp50, fp99 := percentiles(flame)
	rp50, rp99 := percentiles(rc)
	b.ReportMetric(fp50, "flame-p50-ms")
	b.ReportMetric(fp99, "flame-p99-ms")
	b.ReportMetric(rp50, "runc-p50-ms")
	b.ReportMetric(rp99, "runc-p99-ms")
	b.ReportMetric(fp50/rp50, "p50-ratio")
	b.ReportMetric(0, "ns/op")
}

// runcBundle makes an OCI bundle for runc with a copy of rootfs, running the
// same command as the image, in new namespaces and cgroups, detached.
func runcBundle(b *testing.B, runc, rootfs string) string {
	b.Helper()
	bundle := b.TempDir()
	if out, err := exec.Command("cp", "-a", rootfs, filepath.Join(bundle, "rootfs")).CombinedOutput(); err != nil {
		b.Fatalf("copy rootfs: %v: %s", err, out)
	}
	if out, err := exec.Command(runc, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		b.Fatalf("runc spec: %v: %s", err, out)
	}
	path := filepath.Join(bundle, "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		b.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["args"] = []string{"/bin/sleep", "3600"}
	proc["terminal"] = false
	spec["root"].(map[string]any)["readonly"] = false
	linux := spec["linux"].(map[string]any)
	linux["resources"] = map[string]any{"memory": map[string]any{"limit": 256 << 20}, "pids": map[string]any{"limit": 4096}}
	out, _ := json.Marshal(spec)
	if err := os.WriteFile(path, out, 0o644); err != nil {
		b.Fatal(err)
	}
	return bundle
}

// percentiles returns the p50 and p99 of ds in milliseconds.
func percentiles(ds []time.Duration) (p50, p99 float64) {
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(p float64) float64 {
		return float64(s[min(len(s)-1, int(p*float64(len(s))))].Microseconds()) / 1000
	}
	return at(0.5), at(0.99)
}
