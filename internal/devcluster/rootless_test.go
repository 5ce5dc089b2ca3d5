package devcluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/image/registry"
)

// rootlessDirEnv tells the test binary, run again as an unprivileged user,
// the data directory it owns.
const rootlessDirEnv = "FLAME_ROOTLESS_TEST_DIR"

// TestRootlessDevCluster runs TestRootlessDevClusterAsUser as an
// unprivileged user (nobody), as `flame dev` run by a user other than root.
func TestRootlessDevCluster(t *testing.T) {
	if os.Getenv(rootlessDirEnv) != "" || os.Geteuid() != 0 {
		t.Skip("the unprivileged run itself (see TestRootlessDevClusterAsUser)")
	}
	const nobody = 65534
	dir, err := os.MkdirTemp("", "flame-rootless-dev-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "devcluster.test")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.v", "-test.count=1", "-test.run=^TestRootlessDevClusterAsUser$")
	cmd.Dir = data
	cmd.Env = []string{rootlessDirEnv + "=" + data, "TMPDIR=" + data, "HOME=" + data, "PATH=" + os.Getenv("PATH")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	t.Logf("as uid %d:\n%s", nobody, out)
	if err != nil {
		t.Fatalf("run as uid %d: %v", nobody, err)
	}
	if !strings.Contains(string(out), "--- PASS: TestRootlessDevClusterAsUser") {
		t.Fatal("TestRootlessDevClusterAsUser did not pass as an unprivileged user")
	}
}

// TestRootlessDevClusterAsUser: a dev cluster run by a user other than
// root, its driver chosen as `flame dev` chooses it (auto, no host exec
// allowed), runs the demo image in a rootless sandbox, and its edge serves
// a request from it once its check passes.
func TestRootlessDevClusterAsUser(t *testing.T) {
	dir := os.Getenv(rootlessDirEnv)
	if dir == "" {
		t.Skip("run by TestRootlessDevCluster as an unprivileged user")
	}
	ctx := context.Background()
	reg, err := registry.New(registry.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	b[0] |= 0x80
	instance := hex.EncodeToString(b)
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	kinds := make(chan string, 4)
	drivers := make(chan driver.Driver, 4)
	c, err := Start(ctx, Config{
		Dir: filepath.Join(dir, "cluster"), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 1,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Cluster:      cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 64 * 1024}},
		ControlPlane: true, Registry: reg,
		NewHostDriver: func(h HostSpec) (driver.Driver, error) {
			d, kind, err := host.NewDriver(host.DriverConfig{Kind: host.DriverAuto, DataDir: filepath.Join(dir, "cluster", h.ID),
				Registry: h.RegistryAddr, RegistryToken: "agent-secret", Dial: h.Dial, Instance: instance, Index: h.Index})
			kinds <- kind
			drivers <- d
			return d, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, h := range c.Hosts {
			h.DestroyMachines(context.Background())
		}
		c.Close()
	})
	if kind := <-kinds; kind != host.DriverSandbox {
		t.Fatalf("driver %q, want the (rootless) sandbox", kind)
	}
	if d := <-drivers; d == nil || !d.(*sandbox.Driver).Rootless() {
		t.Fatalf("driver %T is not a rootless sandbox", d)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	ref, err := host.PushDemoImage(ctx, c.RegistryAddr(), "agent-secret", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := c.Plane.AddOrg(ctx, "personal", "personal")
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(c.Plane.URL(), tok)
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	cfg := demoConfig(8080)
	cfg.Image = ref
	cfg.Guest = &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}
	m, err := cl.Create(ctx, "demo", api.LaunchMachineInput{Region: "ams", Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "demo", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 60 * time.Second}); err != nil {
		t.Fatalf("wait %s: %v", m.ID, err)
	}
	if m, err = cl.Get(ctx, "demo", m.ID); err != nil || !strings.HasPrefix(m.PrivateIP, "127.") {
		t.Fatalf("machine %v: private IP %q, want a loopback address", err, m.PrivateIP)
	}

	// Through the edge: the request reaches the machine once its check
	// passed and the edge's table has it.
	edge := c.Edges()["ams"]
	client := &http.Client{Timeout: 10 * time.Second}
	var last string
	deadline := time.Now().Add(60 * time.Second)
	for {
		req, _ := http.NewRequest("GET", "http://"+edge+"/", nil)
		req.Host = "demo.localhost"
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var id struct {
				Env map[string]string `json:"env"`
			}
			if resp.StatusCode == 200 && json.Unmarshal(body, &id) == nil && id.Env["FLY_MACHINE_ID"] == m.ID {
				t.Logf("served by %s at %s: FLY_PRIVATE_IP=%s", m.ID, m.PrivateIP, id.Env["FLY_PRIVATE_IP"])
				break
			}
			last = resp.Status + ": " + string(body)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the edge never served the rootless machine: %s", last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
