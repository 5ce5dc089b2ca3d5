package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// rootlessDirEnv tells a test binary run by runUnprivileged the data
// directory it owns.
const rootlessDirEnv = "FLAME_ROOTLESS_TEST_DIR"

// unprivileged is the user rootless tests run as (nobody).
const unprivileged = 65534

// runUnprivileged runs this test binary again as an unprivileged user, with
// -test.run or -test.bench pattern, a copy of the binary in a directory
// that user may read and a data directory it owns; it fails t when the run
// fails, and returns its output.
func runUnprivileged(t testing.TB, args ...string) string {
	t.Helper()
	return runUnprivilegedEnv(t, nil, args...)
}

// runUnprivilegedEnv is runUnprivileged with env added to the run's
// environment.
func runUnprivilegedEnv(t testing.TB, env []string, args ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("runUnprivileged needs root")
	}
	dir, err := os.MkdirTemp("", "flame-rootless-test-")
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
	bin := filepath.Join(dir, "sandbox.test")
	if err := copyFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, unprivileged, unprivileged); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"-test.v", "-test.count=1"}, args...)...)
	cmd.Dir = data
	cmd.Env = append([]string{rootlessDirEnv + "=" + data, "TMPDIR=" + data, "HOME=" + data, "PATH=" + os.Getenv("PATH")}, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: unprivileged, Gid: unprivileged, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	t.Logf("as uid %d:\n%s", unprivileged, out)
	if err != nil {
		t.Fatalf("run as uid %d: %v", unprivileged, err)
	}
	// Nothing of the run is left: no process runs the copied binary (each
	// sandbox's init does), and no mount is under its directory.
	if left := processesOf(bin); len(left) > 0 {
		t.Errorf("processes left running %s: %v", bin, left)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(b), dir) {
		t.Errorf("mounts left under %s", dir)
	}
	return string(out)
}

// processesOf lists the pids whose program is exe.
func processesOf(exe string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if p, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && p == exe {
			out = append(out, e.Name())
		}
	}
	return out
}

// rootlessImages is testImages for a rootless driver: Mount copies the test
// rootfs into the directory it is given, as image.Store does without
// privileges.
type rootlessImages struct{ *testImages }

func (ri rootlessImages) Mount(ctx context.Context, img *image.Image, dir string) (string, error) {
	rootfs := filepath.Join(dir, "rootfs")
	done := filepath.Join(dir, ".rootfs-ok")
	if _, err := os.Stat(done); err == nil {
		return rootfs, nil
	}
	os.RemoveAll(rootfs)
	if err := copyTree(ri.base, rootfs); err != nil {
		return "", err
	}
	return rootfs, os.WriteFile(done, nil, 0o600)
}

// copyTree copies the directories, regular files and symlinks of from to to.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		fi, err := e.Info()
		if err != nil {
			return err
		}
		switch {
		case e.IsDir():
			return os.MkdirAll(dst, fi.Mode().Perm()|0o700)
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, dst)
		default:
			return copyFile(p, dst, fi.Mode().Perm())
		}
	})
}

// rootlessDriver builds, in the unprivileged run, a rootless driver with a
// test rootfs of its own under the data directory data.
func rootlessDriver(t testing.TB, data string) (*Driver, Config) {
	t.Helper()
	bb := findBusybox()
	if bb == "" {
		t.Fatal(unavailable)
	}
	base := filepath.Join(data, "base-"+randHex(6))
	if err := buildBase(base, bb); err != nil {
		t.Fatal(err)
	}
	if err := installProbe(base); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tag := randHex(6)
	ti := newTestImages()
	ti.base = base
	level := slog.LevelDebug
	if _, ok := t.(*testing.B); ok {
		level = slog.LevelWarn
	}
	cfg := Config{
		Images:       rootlessImages{ti},
		StateDir:     filepath.Join(data, "state-"+tag),
		Bridge:       "flr" + tag,
		Network:      testNetwork(),
		Host:         1,
		InitPath:     exe,
		CgroupParent: "flame-test-" + tag,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: level})),
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatalf("rootless driver: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if !d.Rootless() {
		t.Fatal("driver run by an unprivileged user is not rootless")
	}
	return d, cfg
}

// TestRootless runs the rootless sandbox tests as an unprivileged user.
func TestRootless(t *testing.T) {
	if os.Getenv(rootlessDirEnv) != "" || os.Geteuid() != 0 {
		t.Skip("the unprivileged run itself (see TestRootlessSandbox)")
	}
	requireSandboxes(t)
	out := runUnprivileged(t, "-test.run=^TestRootlessSandbox$")
	if !strings.Contains(out, "--- PASS: TestRootlessSandbox") {
		t.Fatal("TestRootlessSandbox did not pass as an unprivileged user")
	}
}

// rootlessAttacks are what the attack probe must report in a rootless
// sandbox: as in a sandbox of root's, except that the machine's log, which
// the workload writes as stdout, belongs to the user the sandbox is root
// of, so reopening it works (it is the machine's own file).
func rootlessAttacks() map[string]string {
	want := map[string]string{}
	for _, a := range probeAttacks {
		want[a.name] = a.want
	}
	want["reopen-host-file"] = "ok"
	if _, err := os.Stat("/proc/sysrq-trigger"); errors.Is(err, os.ErrNotExist) {
		want["write-sysrq-trigger"] = "ENOENT"
	}
	return want
}

// TestRootlessSandbox, run by TestRootless as an unprivileged user (or
// directly by one): real sandboxes start without root, answer on their
// forwarded loopback addresses (two on one port without colliding), run
// commands, hold against the attack probe, cap their writes, and leave
// nothing when stopped and cleaned up.
func TestRootlessSandbox(t *testing.T) {
	data := os.Getenv(rootlessDirEnv)
	if data == "" {
		if os.Geteuid() == 0 {
			t.Skip("run by TestRootless as an unprivileged user")
		}
		data = t.TempDir()
		if err := ProbeRootless("", data); err != nil {
			t.Skipf("this kernel runs no rootless sandbox for this user: %v", err)
		}
	}
	d, cfg := rootlessDriver(t, data)
	ctx := context.Background()
	var specs []driver.Spec
	var procs []driver.Process
	for _, name := range []string{"one", "two"} {
		spec := testSpec(t, "busybox", "-c", "/bin/probe "+probeCommand+" > /tmp/probe.out 2>&1; "+
			"mkdir /tmp/w && echo "+name+" > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w")
		spec.Ports = []int{8080}
		spec.RootfsSizeMB = 16
		p := start(t, d, spec)
		specs, procs = append(specs, spec), append(procs, p)
	}
	// A machine that does not listen on its port is refused there, as a
	// 6PN address would refuse it.
	idle := testSpec(t, "busybox", "-c", "exec sleep 1000")
	idle.Ports = []int{8080}
	start(t, d, idle)
	if a, ok := d.PrivateIP(idle); !ok {
		t.Fatal("no private IP")
	} else if _, err := net.DialTimeout("tcp", netip.AddrPortFrom(a, 8080).String(), 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a port nobody listens on inside: %v, want connection refused", err)
	}
	var addrs []netip.Addr
	for i, name := range []string{"one", "two"} {
		addr, ok := d.PrivateIP(specs[i])
		if !ok || !addr.IsLoopback() {
			t.Fatalf("machine %s: private IP %v %v, want a loopback address", name, addr, ok)
		}
		addrs = append(addrs, addr)
		if body := forwardedGet(t, netip.AddrPortFrom(addr, 8080)); body != name+"\n" {
			t.Errorf("machine %s at %s:8080: body %q", name, addr, body)
		}
	}
	if addrs[0] == addrs[1] {
		t.Fatalf("two machines share %s", addrs[0])
	}

	// An image whose USER is another user runs as root of the sandbox:
	// one id is mapped.
	app := testSpec(t, "app", "exec sleep 1000")
	start(t, d, app)
	if res, err := d.Exec(ctx, app, []string{"id", "-u"}, nil); err != nil || string(res.Stdout) != "0\n" {
		t.Errorf("image with USER app: id -u: %v %+v", err, res)
	}

	// Exec runs inside: the machine's own files, as root of the sandbox.
	res, err := d.Exec(ctx, specs[0], []string{"sh", "-c", "cat /tmp/w/index.html; id -u; hostname"}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec: %v %+v", err, res)
	}
	if got, want := string(res.Stdout), "one\n0\n"+specs[0].MachineID+"\n"; got != want {
		t.Errorf("exec printed %q, want %q", got, want)
	}
	// The attack probe, as the workload ran it and as an exec'd command.
	res, err = d.Exec(ctx, specs[0], []string{"cat", "/tmp/probe.out"}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec cat: %v %+v", err, res)
	}
	checkRootlessProbe(t, "workload", string(res.Stdout))
	res, err = d.Exec(ctx, specs[0], []string{"/bin/probe", probeCommand}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec probe: %v %+v", err, res)
	}
	checkRootlessProbe(t, "exec", string(res.Stdout))
	res, err = d.Exec(ctx, specs[0], []string{"unshare", "-U", "-r", "-n", "-m", "id"}, nil)
	if err != nil || res.ExitCode == 0 {
		t.Errorf("unshare -U -r -n -m from exec: %v %+v", err, res)
	}
	// The writable layer holds RootfsSizeMB.
	res, err = d.Exec(ctx, specs[0], []string{"dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=32"}, nil)
	if err != nil || res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "space") {
		t.Errorf("writing 32 MB to a 16 MB layer: %v %+v", err, res)
	}

	// A driver that closed (the agent restarting) stops forwarding; the
	// next one adopts the sandbox and forwards its port again.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := getOnce(netip.AddrPortFrom(addrs[1], 8080)); err == nil {
		t.Errorf("a closed driver still forwards")
	}
	d, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for i := range procs {
		if procs[i], err = d.Adopt(ctx, specs[i], procs[i].Handle()); err != nil {
			t.Fatalf("adopt: %v", err)
		}
	}
	if body := forwardedGet(t, netip.AddrPortFrom(addrs[1], 8080)); body != "two\n" {
		t.Errorf("adopted machine: body %q", body)
	}

	// Stopped, the machine is no longer reached; cleaned up, nothing of
	// its sandbox is left.
	exit, err := procs[0].Stop(ctx, syscall.SIGTERM, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped: %+v", exit)
	if c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addrs[0], 8080).String(), time.Second); err == nil {
		c.Close()
		t.Errorf("a stopped machine's port still accepts")
	}
	if body := forwardedGet(t, netip.AddrPortFrom(addrs[1], 8080)); body != "two\n" {
		t.Errorf("the other machine after the stop: body %q", body)
	}
	for i, spec := range specs {
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := syscall.Kill(procs[i].Pid(), 0); err == nil {
			t.Errorf("sandbox init %d still runs after cleanup", procs[i].Pid())
		}
		if _, err := os.Stat(filepath.Join(spec.Dir, stateFile)); err == nil {
			t.Errorf("%s left after cleanup", stateFile)
		}
		if _, ok := d.PrivateIP(spec); ok {
			t.Errorf("address still leased after cleanup")
		}
	}
}

// checkRootlessProbe checks the attack probe's report (see probeAttacks).
func checkRootlessProbe(t *testing.T, who, out string) {
	t.Helper()
	t.Logf("%s probe:\n%s", who, out)
	for name, want := range rootlessAttacks() {
		if !strings.Contains(out, name+": "+want+"\n") {
			i := strings.Index(out, name+": ")
			got := "(missing)"
			if i >= 0 {
				got, _, _ = strings.Cut(out[i:], "\n")
			}
			t.Errorf("%s: attack %s: got %q, want %q", who, name, got, want)
		}
	}
}

// forwardedGet fetches / from addr, a forwarded port, which refuses until
// the driver has seen the workload listen: a failed fetch is tried again,
// for at most ten seconds.
func forwardedGet(t testing.TB, addr netip.AddrPort) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		body, err := getOnce(addr)
		if err == nil && body != "" {
			return body
		}
		last = err
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("GET %s: nothing in 10s: %v", addr, last)
	return ""
}

func getOnce(addr netip.AddrPort) (string, error) {
	c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(bufio.NewReader(c))
	if err != nil {
		return "", err
	}
	_, body, ok := strings.Cut(string(b), "\r\n\r\n")
	if !ok {
		return "", fmt.Errorf("no HTTP answer: %q", b)
	}
	return body, nil
}

// BenchmarkRootlessCreate is BenchmarkCreate for a rootless driver, run as
// an unprivileged user: as root it runs itself again as one, with
// -test.benchtime from $FLAME_ROOTLESS_BENCHTIME (default 200x), and
// reports that run's figures (run it with -test.benchtime=1x). Compare
// with BenchmarkCreate run beside it.
func BenchmarkRootlessCreate(b *testing.B) {
	if data := os.Getenv(rootlessDirEnv); data != "" || os.Geteuid() != 0 {
		if data == "" {
			data = b.TempDir()
		}
		d, _ := rootlessDriver(b, data)
		benchCreate(b, d)
		return
	}
	requireSandboxes(b)
	bt := os.Getenv("FLAME_ROOTLESS_BENCHTIME")
	if bt == "" {
		bt = "200x"
	}
	out := runUnprivileged(b, "-test.run=^$", "-test.bench=^BenchmarkRootlessCreate$", "-test.benchtime="+bt)
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "BenchmarkRootlessCreate") {
			continue
		}
		f := strings.Fields(line)
		for i := 1; i+1 < len(f); i++ {
			if strings.HasSuffix(f[i+1], "-ms") {
				var v float64
				if _, err := fmt.Sscan(f[i], &v); err == nil {
					b.ReportMetric(v, "unprivileged-"+f[i+1])
				}
			}
		}
	}
}

// The hosts of one instance get loopback prefixes of their own, and a
// machine's candidates stay inside its host's, never its first or last
// address.
func TestLoopbackAddresses(t *testing.T) {
	network := testNetwork()
	seen := map[netip.Prefix]int{}
	for h := 1; h <= 254; h++ {
		p := loopbackPrefix(Config{Network: network, Host: layout.Host(h)})
		if !p.Addr().IsLoopback() || p.Bits() != 16 || p.Addr().As4()[1] == 0 {
			t.Fatalf("host %d: prefix %s", h, p)
		}
		if other, dup := seen[p]; dup {
			t.Fatalf("hosts %d and %d share %s", other, h, p)
		}
		seen[p] = h
	}
	p := loopbackPrefix(Config{Network: network, Host: 1})
	for i := range 1000 {
		id := randHex(14)
		for attempt := range 3 {
			a, ok := addrCandidate(p, id, attempt)
			if !ok {
				continue
			}
			if !p.Contains(a) || a == p.Addr() || a.As4()[2] == 255 && a.As4()[3] == 255 {
				t.Fatalf("machine %d (%s) attempt %d: %s in %s", i, id, attempt, a, p)
			}
		}
	}
}
