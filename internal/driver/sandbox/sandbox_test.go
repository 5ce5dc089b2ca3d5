package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestMain doubles as the sandboxes' init: the driver under test runs this
// test binary as "<binary> sandbox-init run", as it runs the flame binary
// in production.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == InitCommand {
		os.Exit(InitMain(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == probeCommand {
		os.Exit(probeMain())
	}
	if len(os.Args) > 1 && os.Args[1] == netProbeCommand {
		os.Exit(netProbeMain(os.Args[2:]))
	}
	if len(os.Args) > 2 && os.Args[1] == sweepChildCommand {
		os.Exit(sweepChildMain(os.Args[2]))
	}
	if len(os.Args) > 2 && os.Args[1] == stepsCommand {
		n, _ := strconv.Atoi(os.Args[2])
		os.Exit(stepsMain(n))
	}
	os.Exit(runTests(m))
}

// testRoot holds the test rootfs shared by every sandbox, empty when the
// tests cannot run sandboxes; unavailable says why.
var (
	testRoot    string
	unavailable string
)

func runTests(m *testing.M) int {
	switch bb := findBusybox(); {
	case os.Geteuid() != 0:
		unavailable = "sandboxes need root"
	case bb == "":
		unavailable = "no static busybox for the test image (apt-get install busybox-static; .ci/run installs it)"
	default:
		dir, err := os.MkdirTemp("", "flame-sandbox-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if err := buildBase(filepath.Join(dir, "base"), bb); err != nil {
			fmt.Fprintln(os.Stderr, "build test rootfs:", err)
			return 1
		}
		if err := installProbe(filepath.Join(dir, "base")); err != nil {
			fmt.Fprintln(os.Stderr, "build test rootfs: attack probe:", err)
			return 1
		}
		testRoot = dir
	}
	return m.Run()
}

// requireSandboxes skips t when not root, and fails it when root but the
// test image cannot be built: as root, every sandbox test runs.
func requireSandboxes(t testing.TB) {
	t.Helper()
	if testRoot != "" {
		return
	}
	if os.Geteuid() != 0 {
		t.Skip(unavailable)
	}
	t.Fatalf("cannot run sandboxes as root: %s", unavailable)
}

// findBusybox returns the path of a static busybox, or "" if there is none:
// only a static one runs without the host's libraries.
func findBusybox() string {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox", "/sbin/busybox"} {
		if static, err := isStatic(p); err == nil && static {
			return p
		}
	}
	return ""
}

// isStatic reports whether the ELF program at p needs no program
// interpreter (the dynamic loader).
func isStatic(p string) (bool, error) {
	f, err := elf.Open(p)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}

// buildBase assembles a tiny image root: busybox and its applets, users and
// groups, a web root.
func buildBase(base, busybox string) error {
	for _, d := range []string{"bin", "etc", "tmp", "www", "home/app", "root"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(base, "tmp"), 0o1777); err != nil {
		return err
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(base, "bin/busybox"), b, 0o755); err != nil {
		return err
	}
	for _, applet := range []string{"sh", "sleep", "cat", "ls", "ps", "id", "hostname", "dd", "httpd", "echo",
		"true", "false", "env", "ip", "grep", "tr", "wc", "head", "pwd", "test", "wget", "kill", "unshare"} {
		if err := os.Symlink("busybox", filepath.Join(base, "bin", applet)); err != nil {
			return err
		}
	}
	files := map[string]string{
		// Executable, but no program the kernel can run.
		"bin/broken":     "not a program\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
		"etc/group":      "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
		"www/index.html": "hello from the sandbox\n",
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(base, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(base, "bin/broken"), 0o755); err != nil {
		return err
	}
	return nil
}

// testImages is an image store of made-up images that all share the test
// rootfs, each machine getting an overlay of its own. A reference in
// failures fails to pull with its error, as the real store's would.
type testImages struct {
	base     string
	configs  map[string]image.Config
	failures map[string]error
}

func newTestImages() *testImages {
	return &testImages{
		base: filepath.Join(testRoot, "base"),
		configs: map[string]image.Config{
			"busybox": {Entrypoint: []string{"sh"}},
			"noop":    {},
			"app": {
				Entrypoint: []string{"sh", "-c"},
				Cmd:        []string{"echo image cmd"},
				Env:        []string{"A=image", "B=image", "PATH=/bin"},
				WorkingDir: "/tmp",
				User:       "app",
			},
		},
		failures: map[string]error{
			"nosuch":            fmt.Errorf("%w: manifest nosuch:latest: manifest unknown", image.ErrNotFound),
			"Bad Ref":           fmt.Errorf("%w: reference %q: invalid reference format", image.ErrInvalid, "Bad Ref"),
			"exec:/bin/true":    fmt.Errorf("%w: reference %q names a host program, which only the exec driver runs", image.ErrInvalid, "exec:/bin/true"),
			"private":           fmt.Errorf("%w: manifest private:latest: 401 unauthorized", image.ErrUnauthorized),
			"registry-down":     fmt.Errorf("%w: manifest registry-down:latest: cannot reach registry.test: connection refused", image.ErrUnavailable),
			"registry-failing":  fmt.Errorf("%w: manifest registry-failing:latest: 502 bad gateway", image.ErrUnavailable),
			"disk-full":         fmt.Errorf("unpack layer sha256:0f: write /var/lib/flame/images/tmp: %w", syscall.ENOSPC),
			"digest-mismatched": fmt.Errorf("%w: layer sha256:0f: content has digest sha256:1e", image.ErrDigest),
		},
	}
}

func (ti *testImages) Pull(ctx context.Context, ref string) (*image.Image, error) {
	if err := ti.failures[ref]; err != nil {
		return nil, err
	}
	cfg, ok := ti.configs[ref]
	if !ok {
		return nil, fmt.Errorf("%w: %s: manifest unknown", image.ErrNotFound, ref)
	}
	sum := sha256.Sum256([]byte(ref))
	return &image.Image{Ref: "test/" + ref + ":latest", Digest: "sha256:" + hex.EncodeToString(sum[:]), Config: cfg}, nil
}

func (ti *testImages) MountTree(ctx context.Context, img *image.Image, dir string, userns int, rootID uint32) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return -1, err
	}
	return image.MountIDMapped([]string{ti.base}, dir, userns, rootID)
}

func (ti *testImages) Unmount(ctx context.Context, dir string) error {
	err := unix.Unmount(filepath.Join(dir, "root"), 0)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return os.RemoveAll(dir)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func randHex(n int) string {
	b := make([]byte, (n+1)/2)
	rand.Read(b)
	return hex.EncodeToString(b)[:n]
}

// testConfig is a driver configuration of the test's own: bridge, prefix,
// cgroup parent and state, all removed when the test ends.
func testConfig(t testing.TB) Config {
	t.Helper()
	requireSandboxes(t)
	tag := randHex(6)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Images:       newTestImages(),
		StateDir:     t.TempDir(),
		Bridge:       "flt" + tag,
		Network:      testNetwork(),
		Host:         1,
		InitPath:     exe,
		CgroupParent: "flame-test-" + tag,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	t.Cleanup(func() {
		// What a driver closed while its machines ran leaves (see filter.go).
		newFilter(cfg.Bridge, cfg.Network).close(true)
		if l, err := netlink.LinkByName(cfg.Bridge); err == nil {
			netlink.LinkDel(l)
		}
		if cg, err := detectCgroups(cfg.CgroupParent); err == nil {
			for _, r := range cg.roots {
				removeCgroupDir(r)
			}
		}
	})
	return cfg
}

// testNetwork is a private network of the test's own: random, as an
// instance's is, never zero.
func testNetwork() layout.Network {
	for {
		if n, err := layout.ParseNetwork(randHex(8)); err == nil {
			return n
		}
	}
}

func newDriver(t testing.TB, cfg Config) *Driver {
	t.Helper()
	d, err := New(cfg)
	if err != nil {
		// testConfig has skipped t unless root: as root the driver must work.
		t.Fatalf("sandbox driver: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func testSpec(t testing.TB, img string, cmd ...string) driver.Spec {
	dir := t.TempDir()
	id := randHex(14)
	return driver.Spec{
		MachineID:  id,
		InstanceID: "01J" + strings.ToUpper(randHex(23)),
		App:        "demo",
		Org:        1,
		Region:     "local",
		Dir:        dir,
		LogPath:    filepath.Join(dir, "log"),
		Image:      img,
		Cmd:        cmd,
		Env: map[string]string{
			"FLY_MACHINE_ID": id, "FLY_APP_NAME": "demo", "FLY_PRIVATE_IP": "127.0.0.1",
		},
		MemoryMB: 256,
		CPUs:     1,
	}
}

// start prepares and starts spec, and makes sure nothing of it is left when
// the test ends.
func start(t testing.TB, d *Driver, spec driver.Spec) driver.Process {
	t.Helper()
	ctx := context.Background()
	t.Cleanup(func() {
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if _, err := d.Prepare(ctx, spec); err != nil {
		t.Fatal(err)
	}
	p, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func waitExit(t testing.TB, p driver.Process) driver.Exit {
	t.Helper()
	select {
	case <-p.Done():
		return p.Exit()
	case <-time.After(15 * time.Second):
		t.Fatalf("sandbox %d did not end", p.Pid())
		return driver.Exit{}
	}
}

func waitLog(t testing.TB, path, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("log never contained %q; has %q", want, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func logOf(t testing.TB, spec driver.Spec) string {
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestIsolation(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", `
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"
echo "procs=$(ls /proc | grep -c '^[0-9]')"
echo "host=$(hostname)"
echo "ip=$FLY_PRIVATE_IP"
echo "root=$(ls / | tr '\n' ' ')"
test -e /work && echo "host filesystem visible"
test -e /proc/sysrq-trigger && echo hi > /proc/sysrq-trigger 2>/dev/null && echo "sysrq writable"
echo "hosts=$(grep "$FLY_PRIVATE_IP" /etc/hosts)"
echo done`)
	p := start(t, d, spec)
	if e := waitExit(t, p); e.Failed() {
		t.Fatalf("exit %+v; log:\n%s", e, logOf(t, spec))
	}
	out := logOf(t, spec)
	t.Logf("workload saw:\n%s", out)
	addr, ok := d.PrivateIP(spec)
	if prefix, _ := d.machinePrefix(spec); !ok || !prefix.Contains(addr) {
		t.Fatalf("PrivateIP = %v %v", addr, ok)
	}
	for _, want := range []string{
		"pid1=" + d.cfg.InitPath + " sandbox-init run",
		"host=" + spec.MachineID + "\n",
		"ip=" + addr.String() + "\n",
		"root=" + imageRoot(t) + " \n",
		"hosts=" + addr.String() + "\t" + spec.MachineID + " " + spec.MachineID + ".vm.demo.internal",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	for _, bad := range []string{"host filesystem visible", "sysrq writable"} {
		if strings.Contains(out, bad) {
			t.Errorf("output has %q", bad)
		}
	}
	// init, sh, ls and grep at most.
	var procs int
	fmt.Sscanf(out[strings.Index(out, "procs=")+6:], "%d", &procs)
	if procs < 2 || procs > 5 {
		t.Errorf("workload sees %d processes, want only its own", procs)
	}
}

// imageRoot lists, as ls does, what the root of a sandbox of the test image
// holds: the image's top directories (with the probe's libraries, see
// installProbe) and the mount points the init makes.
func imageRoot(t *testing.T) string {
	entries, err := os.ReadDir(filepath.Join(testRoot, "base"))
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"dev", "proc", "sys"}
	for _, e := range entries {
		if !slices.Contains(names, e.Name()) {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	return strings.Join(names, " ")
}

func TestImageConfigMerge(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "app")
	spec.Cmd = []string{`echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) pwd=$(pwd) A=$A B=$B home=$HOME path=$PATH args=$0"`}
	spec.Env["B"] = "spec"
	p := start(t, d, spec)
	if e := waitExit(t, p); e.Failed() {
		t.Fatalf("exit %+v; log:\n%s", e, logOf(t, spec))
	}
	want := "uid=1000 gid=1000 groups=1000 2000 pwd=/tmp A=image B=spec home=/home/app path=/bin args=sh\n"
	if got := logOf(t, spec); got != want {
		t.Fatalf("workload printed %q, want %q", got, want)
	}
}

func TestImageErrors(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()
	// What says the image does not exist or cannot be run here is
	// ErrImage; what may pass (a registry down or failing, a local
	// failure) is ErrUnavailable, and never both.
	for _, tc := range []struct {
		name  string
		image string
		want  error
	}{
		{"unknown image", "nosuch", driver.ErrImage},
		{"unparseable reference", "Bad Ref", driver.ErrImage},
		{"host program", "exec:/bin/true", driver.ErrImage},
		{"refused access", "private", driver.ErrImage},
		{"nothing to run", "noop", driver.ErrImage},
		{"registry down", "registry-down", driver.ErrUnavailable},
		{"registry failing", "registry-failing", driver.ErrUnavailable},
		{"disk full", "disk-full", driver.ErrUnavailable},
		{"digest mismatch", "digest-mismatched", driver.ErrUnavailable},
	} {
		other := driver.ErrUnavailable
		if tc.want == driver.ErrUnavailable {
			other = driver.ErrImage
		}
		spec := testSpec(t, tc.image)
		if _, err := d.Prepare(ctx, spec); !errors.Is(err, tc.want) || errors.Is(err, other) {
			t.Errorf("%s: Prepare = %v, want %v", tc.name, err, tc.want)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
	}
	spec := testSpec(t, "busybox")
	spec.Entrypoint = []string{"/no/such/program"}
	before := snapshot(t, d)
	if _, err := d.Prepare(ctx, spec); err != nil {
		t.Fatal(err)
	}
	_, err := d.Start(ctx, spec)
	if !errors.Is(err, driver.ErrImage) {
		t.Fatalf("Start = %v, want ErrImage", err)
	}
	t.Logf("missing program: %v", err)
	if err := d.Cleanup(ctx, spec); err != nil {
		t.Fatal(err)
	}
	before.check(t, snapshot(t, d))
}

func TestOOMKill(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox")
	spec.Entrypoint = []string{"dd", "if=/dev/zero", "of=/dev/null", "bs=192M", "count=1"}
	spec.MemoryMB = 64
	p := start(t, d, spec)
	e := waitExit(t, p)
	if !e.OOMKilled || e.Signal != syscall.SIGKILL || !e.Failed() {
		t.Fatalf("exit = %+v, want OOM kill; log:\n%s", e, logOf(t, spec))
	}
}

func TestCPUQuota(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", "while :; do :; done & while :; do :; done")
	spec.CPUs = 2
	p := start(t, d, spec)
	defer p.Stop(context.Background(), syscall.SIGKILL, 0)

	// The guest size maps to the cgroup: two cpus are two cores of quota
	// and a weight of 2/16 core.
	want := map[string]string{"cpu.cfs_quota_us": "200000", "cpu.cfs_period_us": "100000", "cpu.shares": "128"}
	if d.cg.v2 {
		want = map[string]string{"cpu.max": "200000 100000", "cpu.weight": "5"}
	}
	cpuDir := filepath.Dir(d.cg.cpuStat(spec.MachineID))
	for name, v := range want {
		b, err := os.ReadFile(filepath.Join(cpuDir, name))
		if err != nil {
			t.Errorf("read %s: %v", name, err)
		} else if strings.TrimSpace(string(b)) != v {
			t.Errorf("%s = %q, want %q", name, strings.TrimSpace(string(b)), v)
		}
	}

	// On a host this busy, two cores may never be reached: tighten the
	// quota to a tenth of a core to see it enforced.
	quota := filepath.Join(cpuDir, "cpu.cfs_quota_us")
	if d.cg.v2 {
		if err := writeFile(filepath.Join(cpuDir, "cpu.max"), "10000 100000"); err != nil {
			t.Fatal(err)
		}
	} else if err := writeFile(quota, "10000"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	used0 := cgroupCPUTime(t, d, spec.MachineID)
	t0 := time.Now()
	time.Sleep(time.Second)
	used := cgroupCPUTime(t, d, spec.MachineID) - used0
	wall := time.Since(t0) // a loaded host may oversleep: judge by what passed
	b, err := os.ReadFile(d.cg.cpuStat(spec.MachineID))
	if err != nil {
		t.Fatal(err)
	}
	throttled, _ := readCounter(b, "nr_throttled")
	t.Logf("two busy loops, quota 0.1 cpu: %v of cpu in %v; cpu.stat:\n%s", used, wall, b)
	if throttled == 0 {
		t.Errorf("nr_throttled = 0: not throttled")
	}
	if used > wall/10*2 {
		t.Errorf("used %v of cpu in %v with a quota of 0.1 cpu", used, wall)
	}
}

// cgroupCPUTime sums the cpu time of the processes in machine id's cgroup.
func cgroupCPUTime(t testing.TB, d *Driver, id string) time.Duration {
	b, err := os.ReadFile(filepath.Join(d.cg.dirs(id)[0], "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	var ticks int64
	for pid := range strings.FieldsSeq(string(b)) {
		st, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:]))
		var u, s int64
		fmt.Sscan(f[11], &u)
		fmt.Sscan(f[12], &s)
		ticks += u + s
	}
	return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100
}

func TestPrivateNetwork(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox")
	spec.Entrypoint = []string{"httpd", "-f", "-p", "[::]:8080", "-h", "/www"}
	t0 := time.Now()
	start(t, d, spec)
	started := time.Since(t0)
	addr, ok := d.PrivateIP(spec)
	if !ok {
		t.Fatal("no private IP")
	}
	body, took := httpGet(t, netip.AddrPortFrom(addr, 8080))
	t.Logf("started in %v; first GET http://[%s]:8080/ answered in %v", started, addr, took)
	if body != "hello from the sandbox\n" {
		t.Fatalf("body = %q", body)
	}
	// And out of the sandbox: the bridge answers on the gateway address.
	res, err := d.Exec(context.Background(), spec, []string{"ip", "-6", "route"}, nil)
	if err != nil || !strings.Contains(string(res.Stdout), "default via "+bridgeLinkLocal.String()) {
		t.Fatalf("routes inside: %v %q %q", err, res.Stdout, res.Stderr)
	}
}

// httpGet fetches / from addr with a plain HTTP/1.0 request. A refused
// connection (the server is not listening yet) is retried; anything slower
// means the network was not ready when the workload started.
func httpGet(t testing.TB, addr netip.AddrPort) (string, time.Duration) {
	t0 := time.Now()
	var c net.Conn
	var err error
	for refused := 0; ; refused++ {
		c, err = dialTCP(addr, 5*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(t0) > 5*time.Second {
			break
		}
		// Refused: the network is up, the server not listening yet.
		time.Sleep(time.Millisecond)
	}
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	_, body, _ := strings.Cut(string(b), "\r\n\r\n")
	return body, time.Since(t0)
}

func TestStopEscalation(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()

	spec := testSpec(t, "busybox", "-c", `trap "" TERM; echo ready; while :; do sleep 1; done`)
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	t0 := time.Now()
	e, err := p.Stop(ctx, syscall.SIGTERM, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); e.Signal != syscall.SIGKILL || took < 300*time.Millisecond {
		t.Fatalf("exit = %+v after %v, want SIGKILL after the timeout", e, took)
	}

	spec = testSpec(t, "busybox", "-c", `trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done`)
	p = start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	e, err = p.Stop(ctx, syscall.SIGTERM, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if e.Code != 7 || e.Signal != 0 || e.Unknown {
		t.Fatalf("exit = %+v, want code 7", e)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("signal after exit: %v", err)
	}
}

func TestAdoptBySecondDriver(t *testing.T) {
	cfg := testConfig(t)
	d1 := newDriver(t, cfg)
	spec := testSpec(t, "busybox", "-c", `trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done`)
	p1 := start(t, d1, spec)
	waitLog(t, spec.LogPath, "ready")
	handle := p1.Handle()
	d1.Close() // as if the agent died: the sandbox keeps running

	d2 := newDriver(t, cfg)
	ctx := context.Background()
	if _, err := d2.Adopt(ctx, spec, "1:2:"+d2.bootID); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt a bogus handle: %v", err)
	}
	other := spec
	other.InstanceID = "another"
	if _, err := d2.Adopt(ctx, other, ""); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt another instance: %v", err)
	}
	p0, err := d2.Adopt(ctx, spec, "")
	if err != nil || p0.Handle() != handle {
		t.Fatalf("adopt unrecorded: %v %v", p0, err)
	}
	p2, err := d2.Adopt(ctx, spec, handle)
	if err != nil {
		t.Fatal(err)
	}
	res, err := d2.Exec(ctx, spec, []string{"hostname"}, nil)
	if err != nil || strings.TrimSpace(string(res.Stdout)) != spec.MachineID {
		t.Fatalf("exec in adopted sandbox: %v %+v", err, res)
	}
	e, err := p2.Stop(ctx, syscall.SIGTERM, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if e.Code != 7 || e.Unknown {
		t.Fatalf("exit = %+v, want the exact code 7", e)
	}
	if e0 := waitExit(t, p0); e0.Code != 7 {
		t.Fatalf("other watcher's exit = %+v", e0)
	}
	if _, err := d2.Adopt(ctx, spec, handle); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt after exit: %v", err)
	}
}

func TestExec(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", "echo ready; exec sleep 1000")
	start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	ctx := context.Background()
	addr, _ := d.PrivateIP(spec)
	for _, tc := range []struct {
		cmd      []string
		stdin    string
		code     int
		stdout   string // substring
		stderr   string
		notInOut string
	}{
		{cmd: []string{"cat", "/proc/1/cmdline"}, stdout: "sandbox-init"},
		{cmd: []string{"hostname"}, stdout: spec.MachineID},
		{cmd: []string{"sh", "-c", "echo out; echo err >&2; exit 4"}, code: 4, stdout: "out", stderr: "err"},
		{cmd: []string{"cat"}, stdin: "from stdin", stdout: "from stdin"},
		{cmd: []string{"ip", "-6", "addr", "show", "eth0"}, stdout: addr.String()},
		{cmd: []string{"ps"}, stdout: "sleep 1000", notInOut: "go test"},
		{cmd: []string{"ls", "/"}, stdout: "www", notInOut: "work"},
		{cmd: []string{"sh", "-c", "kill -9 $$"}, code: 128 + 9},
		{cmd: []string{"nosuch"}, code: 127, stderr: "not found"},
	} {
		var stdin []byte
		if tc.stdin != "" {
			stdin = []byte(tc.stdin)
		}
		res, err := d.Exec(ctx, spec, tc.cmd, stdin)
		if err != nil {
			t.Errorf("%q: %v", tc.cmd, err)
			continue
		}
		if res.ExitCode != tc.code || !strings.Contains(string(res.Stdout), tc.stdout) ||
			!strings.Contains(string(res.Stderr), tc.stderr) ||
			(tc.notInOut != "" && strings.Contains(string(res.Stdout), tc.notInOut)) {
			t.Errorf("%q: code %d stdout %q stderr %q", tc.cmd, res.ExitCode, res.Stdout, res.Stderr)
		}
	}
	// A command that outlives ctx is killed.
	cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, err := d.Exec(cctx, spec, []string{"sleep", "30"}, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("exec past its deadline: %v", err)
	}
}

// TestCycles creates and destroys sandboxes and checks that nothing stays
// behind: no process, link, cgroup, mount, lease, open file or goroutine.
func TestCycles(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()
	// The bridge exists from the first sandbox on; leave it out.
	warm := testSpec(t, "busybox", "-c", "true")
	waitExit(t, start(t, d, warm))
	if err := d.Cleanup(ctx, warm); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, d)
	for i := range 20 {
		spec := testSpec(t, "busybox", "-c", "sleep 1000 & exec sleep 1000")
		if i%2 == 1 {
			spec.Cmd = []string{"-c", "exit 3"}
		}
		if _, err := d.Prepare(ctx, spec); err != nil {
			t.Fatal(err)
		}
		p, err := d.Start(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			if _, err := p.Stop(ctx, syscall.SIGTERM, time.Second); err != nil {
				t.Fatal(err)
			}
		} else if e := waitExit(t, p); e.Code != 3 {
			t.Fatalf("exit = %+v, want 3", e)
		}
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	before.check(t, snapshot(t, d))
}

// TestCleanupIdempotent: Cleanup of a machine that ran removes everything
// of it, and Cleanup again (an agent retrying after a crash mid-cleanup)
// finds nothing left to do and succeeds.
func TestCleanupIdempotent(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()
	// The bridge exists from the first sandbox on; leave it out.
	warm := testSpec(t, "busybox", "-c", "true")
	waitExit(t, start(t, d, warm))
	if err := d.Cleanup(ctx, warm); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, d)
	spec := testSpec(t, "busybox", "-c", "echo ready; exec sleep 1000")
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	if _, ok := d.PrivateIP(spec); !ok {
		t.Fatal("a running machine has no private IP")
	}
	if _, err := p.Stop(ctx, syscall.SIGKILL, 0); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Fatalf("cleanup %d: %v", i+1, err)
		}
		before.check(t, snapshot(t, d))
		if _, ok := d.PrivateIP(spec); ok {
			t.Errorf("cleanup %d: the machine keeps its private IP", i+1)
		}
	}
}

// leaks counts what a sandbox could leave behind.
type leaks map[string]int

func snapshot(t testing.TB, d *Driver) leaks {
	t.Helper()
	waitSpare(t, d)
	l := leaks{}
	// Processes running this driver's init (the test binary as
	// sandbox-init, in a cgroup under the driver's parent): other packages'
	// tests may run sandboxes at the same time.
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(b), InitCommand) {
			continue
		}
		if cgs, err := os.ReadFile("/proc/" + e.Name() + "/cgroup"); err == nil && strings.Contains(string(cgs), "/"+d.cfg.CgroupParent+"/") {
			l["init processes"]++
		}
	}
	// The veths on this driver's bridge.
	links, _ := netlink.LinkList()
	if br, err := netlink.LinkByName(d.cfg.Bridge); err == nil {
		for _, k := range links {
			if k.Type() == "veth" && k.Attrs().MasterIndex == br.Attrs().Index {
				l["veth links"]++
			}
		}
	}
	for _, r := range d.cg.roots {
		es, _ := os.ReadDir(r)
		for _, e := range es {
			// The driver keeps a spare cgroup on v1 (see spare.go).
			if e.IsDir() && !strings.HasPrefix(e.Name(), sparePrefix) {
				l["cgroups"]++
			}
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	l["mounts"] = strings.Count(string(mi), testRoot)
	for _, sub := range []string{"addrs", "machines"} {
		es, _ := os.ReadDir(filepath.Join(d.cfg.StateDir, "leases", sub))
		l["leases"] += len(es)
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	l["open files"] = len(fds)
	l["zombies"] = countZombies()
	return l
}

// waitSpare waits for d's spare init to be ready, so that counts taken
// before and after include it alike.
func waitSpare(t testing.TB, d *Driver) *spare {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if sp := d.idle.Load(); sp != nil {
			return sp
		}
		if time.Now().After(deadline) {
			t.Fatal("no spare init ready after 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

func countZombies() int {
	n := 0
	self := fmt.Sprint(os.Getpid())
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[0] == "Z" && f[1] == self {
			n++
		}
	}
	return n
}

func (before leaks) check(t testing.TB, after leaks) {
	t.Helper()
	for k, v := range after {
		if v > before[k] {
			t.Errorf("%s: %d before, %d after", k, before[k], v)
		}
	}
}

// BenchmarkCreate measures Prepare+Start of a small image with the image
// cached, until the workload's program runs, and reports the p50 and p99.
func BenchmarkCreate(b *testing.B) {
	benchCreate(b, newDriver(b, testConfig(b)))
}

func benchCreate(b *testing.B, d *Driver) {
	ctx := context.Background()
	warm := testSpec(b, "busybox", "-c", "true")
	waitExit(b, start(b, d, warm))
	var took []time.Duration
	b.ResetTimer()
	for range b.N {
		spec := testSpec(b, "busybox", "-c", "exec sleep 1000")
		t0 := time.Now()
		if _, err := d.Prepare(ctx, spec); err != nil {
			b.Fatal(err)
		}
		p, err := d.Start(ctx, spec)
		if err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(t0))
		b.StopTimer()
		p.Stop(ctx, syscall.SIGKILL, 0)
		if err := d.Cleanup(ctx, spec); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	reportPercentiles(b, took)
}

func reportPercentiles(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	at := func(q float64) time.Duration { return took[min(len(took)-1, int(q*float64(len(took))))] }
	b.ReportMetric(float64(at(0.50).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(at(0.99).Microseconds())/1000, "p99-ms")
}

func dialTCP(addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return net.DialTimeout("tcp", addr.String(), timeout)
}

// TestRestartedAfterKillReachable: a machine killed (SIGKILL) and started
// again, as its restart policy does, answers at its private address at
// once, although the host last reached it through the veth that went with
// the killed sandbox.
func TestRestartedAfterKillReachable(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox")
	spec.Entrypoint = []string{"httpd", "-f", "-p", "[::]:8080", "-h", "/www"}
	p := start(t, d, spec)
	addr, ok := d.PrivateIP(spec)
	if !ok {
		t.Fatal("no private IP")
	}
	if body, _ := httpGet(t, netip.AddrPortFrom(addr, 8080)); body != "hello from the sandbox\n" {
		t.Fatalf("body = %q", body)
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitExit(t, p)
	if _, err := d.Start(context.Background(), spec); err != nil {
		t.Fatalf("start again: %v", err)
	}
	body, took := httpGet(t, netip.AddrPortFrom(addr, 8080))
	if body != "hello from the sandbox\n" {
		t.Fatalf("body after the restart = %q", body)
	}
	t.Logf("answered %v after the restart", took)
}
