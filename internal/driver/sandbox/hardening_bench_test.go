package sandbox

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/image"
)

// stepsCommand makes the test binary time, in a mount namespace of its
// own, the steps the hardening adds to a sandbox's start, and print the
// mean of each in nanoseconds.
const stepsCommand = "sandbox-hardening-steps"

func stepsMain(n int) int {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var masked []string
	for _, p := range maskedPaths {
		if _, err := os.Stat(p); err == nil {
			masked = append(masked, p)
		}
	}
	var mask time.Duration
	for range n {
		t0 := time.Now()
		if err := maskPaths(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		mask += time.Since(t0)
		for _, p := range masked {
			unix.Unmount(p, unix.MNT_DETACH)
		}
	}
	// One cgroup namespace and one filter, as a start takes them (a
	// second filter would stack on the first and cost more).
	runtime.LockOSThread()
	t0 := time.Now()
	if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
		fmt.Fprintln(os.Stderr, "unshare:", err)
		return 1
	}
	t1 := time.Now()
	if err := installSeccomp(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	filter, cgns := time.Since(t1), t1.Sub(t0)
	fmt.Printf("mask %d\ncgroupns %d\nseccomp %d\n", mask.Nanoseconds()/int64(n), cgns.Nanoseconds(), filter.Nanoseconds())
	return 0
}

// BenchmarkHardeningSteps reports what the hardening adds to a sandbox's
// start, step by step, each timed alone (an end-to-end start on a busy
// machine moves by more than these add): masking /proc and /sys, the cgroup
// namespace and the seccomp filter in the init, and the state record Start
// now writes a second time.
func BenchmarkHardeningSteps(b *testing.B) {
	requireSandboxes(b)
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	// The filter and the namespace are timed once per process: the
	// helper runs several times and each step's median is reported.
	steps := map[string][]float64{}
	for range 21 {
		cmd := exec.Command(exe, stepsCommand, strconv.Itoa(max(b.N/10, 10)))
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWNS}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("%v: %s", err, stderr.String())
		}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			name, v, _ := strings.Cut(line, " ")
			ns, _ := strconv.ParseFloat(v, 64)
			steps[name] = append(steps[name], ns)
		}
	}
	for name, v := range steps {
		slices.Sort(v)
		b.ReportMetric(v[len(v)/2]/1000, name+"-µs")
	}
	dir := b.TempDir()
	st := state{Instance: "i", Handle: "h", Launch: launch{Path: "/bin/sh", Argv: []string{"sh", "-c", "sleep 1000"}, Dir: "/"}}
	t0 := time.Now()
	for range b.N {
		if err := writeState(dir, st); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(t0).Nanoseconds())/float64(b.N)/1000, "state-write-µs")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkRootfsSteps reports what a machine's root filesystem costs a
// start with the user namespace and the disk quota, against the plain
// overlay mount a start made before them: the tmpfs for the machine's
// writes, and the overlay of idmapped layers (one layer, the test image's)
// made from descriptors.
func BenchmarkRootfsSteps(b *testing.B) {
	requireSandboxes(b)
	cmd := exec.Command("/bin/sleep", "1000")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER,
		UidMappings: idMappings(1 << 24), GidMappings: idMappings(1 << 24)}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ns, err := os.Open("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/user")
	if err != nil {
		b.Fatal(err)
	}
	defer ns.Close()
	base := filepath.Join(testRoot, "base")
	spec := testSpec(b, "busybox")
	var plain, disk, tree time.Duration
	for range b.N {
		dir := b.TempDir()
		for _, d := range []string{"upper", "work", "root"} {
			os.MkdirAll(filepath.Join(dir, d), 0o755)
		}
		t0 := time.Now()
		if err := unix.Mount("overlay", filepath.Join(dir, "root"), "overlay", 0,
			"lowerdir="+base+",upperdir="+dir+"/upper,workdir="+dir+"/work"); err != nil {
			b.Fatal(err)
		}
		plain += time.Since(t0)
		unix.Unmount(filepath.Join(dir, "root"), unix.MNT_DETACH)

		rootfs := filepath.Join(b.TempDir(), "rootfs")
		os.Mkdir(rootfs, 0o700)
		t0 = time.Now()
		if err := mountDisk(spec, rootfs); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		fd, err := image.MountIDMapped([]string{base}, rootfs, int(ns.Fd()), 1<<24)
		if err != nil {
			b.Fatal(err)
		}
		disk, tree = disk+t1.Sub(t0), tree+time.Since(t1)
		unix.Close(fd)
		unmountDisk(rootfs)
	}
	b.ReportMetric(float64(plain.Microseconds())/float64(b.N), "plain-overlay-µs")
	b.ReportMetric(float64(disk.Microseconds())/float64(b.N), "tmpfs-µs")
	b.ReportMetric(float64(tree.Microseconds())/float64(b.N), "idmapped-overlay-µs")
	b.ReportMetric(0, "ns/op")
}
