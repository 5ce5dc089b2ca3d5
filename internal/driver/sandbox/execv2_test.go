package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// bareV2 is a cgroup v2 setup for cfg on this host's cgroup2 mount, without
// controllers (this host's v2 hierarchy has none: its v1 ones do), so that
// the v2 paths run: inits born in their cgroup by clone3
// (CLONE_INTO_CGROUP), a spare moved into the machine's cgroup, Exec. As
// root, a host without a cgroup2 mount fails the test.
func bareV2(t *testing.T, cfg *Config) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if mnt, fstype, _, ok := parseMountinfoLine(line); ok && fstype == "cgroup2" {
			root := filepath.Join(mnt, cfg.CgroupParent)
			cfg.cgroups = &cgroups{v2: true, bare: true, roots: []string{root}}
			t.Cleanup(func() { removeCgroupDir(root) })
			return
		}
	}
	t.Fatal("no cgroup2 mount on this host")
}

// TestExecCgroupV2: on cgroup v2, Exec runs commands (it answered
// unavailable there before), each born in the machine's cgroup with a
// cgroup namespace rooted there, and every attack of the probe fails from
// an exec'd command as from the workload — with and without a spare init.
func TestExecCgroupV2(t *testing.T) {
	cfg := testConfig(t)
	bareV2(t, &cfg)
	d := newDriver(t, cfg)
	if d.CgroupVersion() != 2 {
		t.Fatalf("cgroup version %d", d.CgroupVersion())
	}
	for _, spare := range []bool{true, false} {
		d.noSpare.Store(!spare)
		spec := testSpec(t, "busybox", "-c", "echo ready; exec sleep 1000")
		p := start(t, d, spec)
		waitLog(t, spec.LogPath, "ready")
		machineCg := filepath.Join(d.cg.roots[0], spec.MachineID)
		if !inCgroup(t, machineCg, p.Pid()) {
			t.Errorf("spare %v: init %d not in the machine's cgroup %s", spare, p.Pid(), machineCg)
		}

		res, err := d.Exec(context.Background(), spec, []string{"/bin/probe", probeCommand}, nil)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("spare %v: exec probe: %v %+v", spare, err, res)
		}
		checkProbe(t, "exec", string(res.Stdout))
		_, own, _ := strings.Cut(string(res.Stdout), "\ncgroup:\n")
		own, _, _ = strings.Cut(own, "init-cgroup:")
		if !strings.Contains("\n"+own, "\n0::/\n") {
			t.Errorf("spare %v: exec'd command's cgroup:\n%s", spare, res.Stdout)
		}

		// From the host: a running command is in the machine's cgroup.
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, err := d.Exec(ctx, spec, []string{"sleep", "77"}, nil)
			done <- err
		}()
		deadline := time.Now().Add(10 * time.Second)
		for !cgroupRuns(t, machineCg, "sleep\x0077\x00") {
			if time.Now().After(deadline) {
				t.Fatalf("spare %v: exec'd sleep never showed in %s", spare, machineCg)
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("spare %v: exec cancelled: %v", spare, err)
		}
		// ... and killed when the Exec was given up.
		deadline = time.Now().Add(10 * time.Second)
		for cgroupRuns(t, machineCg, "sleep\x0077\x00") {
			if time.Now().After(deadline) {
				t.Fatalf("spare %v: cancelled command still runs", spare)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func cgroupPids(t *testing.T, dir string) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for f := range strings.FieldsSeq(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

func inCgroup(t *testing.T, dir string, pid int) bool {
	for _, p := range cgroupPids(t, dir) {
		if p == pid {
			return true
		}
	}
	return false
}

// cgroupRuns reports whether a process with cmdline runs in the cgroup.
func cgroupRuns(t *testing.T, dir, cmdline string) bool {
	for _, p := range cgroupPids(t, dir) {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/cmdline"); err == nil && string(b) == cmdline {
			return true
		}
	}
	return false
}
