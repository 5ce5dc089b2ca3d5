package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// statusIDs reads the real, effective, saved and file system ids of pid
// from the host's /proc (the "Uid:" or "Gid:" line).
func statusIDs(t *testing.T, pid int, key string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.Fields(rest)
		}
	}
	t.Fatalf("no %s line in /proc/%d/status", key, pid)
	return nil
}

// TestUserNamespace: root inside a sandbox is, seen from the host, the
// first id of a range leased to the machine alone (the workload's, the
// init's and an exec'd command's), an image USER is that range's id, the
// image's files owned by root inside are root's, and the range goes back
// when the machine is cleaned up. Two machines, of two drivers as two
// Flames on one host would run them, never share a range.
func TestUserNamespace(t *testing.T) {
	d := newDriver(t, testConfig(t))
	other := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", "echo ready; stat -c '%u:%g' /bin/busybox /etc/passwd /; touch /made && stat -c 'made %u:%g' /made; exec sleep 1000")
	p := start(t, d, spec)
	out := waitLog(t, spec.LogPath, "made")
	base, ok := d.machineIDs(spec.MachineID)
	if !ok || base < idFirstSlot<<16 || base%idRangeSize != 0 {
		t.Fatalf("machine's id range %d %v", base, ok)
	}
	lease, err := os.ReadFile(filepath.Join(idLeaseDir, idLeaseName(base)))
	if err != nil || !strings.HasPrefix(string(lease), d.cfg.StateDir+"\t"+spec.MachineID+"\n") {
		t.Fatalf("lease of range %d: %q %v", base, lease, err)
	}
	// Files of the image (root's on disk) are root's inside; what the
	// workload makes is its own.
	if !strings.Contains(out, "0:0\n0:0\n0:0\nmade 0:0\n") {
		t.Errorf("owners inside:\n%s", out)
	}
	root := strconv.FormatUint(uint64(base), 10)
	want := []string{root, root, root, root}
	for _, who := range []struct {
		name string
		pid  int
	}{{"init", p.Pid()}, {"workload", workloadPid(t, p.Pid())}} {
		for _, key := range []string{"Uid", "Gid"} {
			if got := statusIDs(t, who.pid, key); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("%s %s outside = %v, want %v", who.name, key, got, want)
			}
		}
	}
	// An exec'd command, and one under the image's USER.
	res, err := d.Exec(context.Background(), spec, []string{"sh", "-c", "id -u; cat /proc/self/uid_map"}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec: %v %+v", err, res)
	}
	if f := strings.Fields(string(res.Stdout)); len(f) != 4 || f[0] != "0" || f[1] != "0" || f[2] != root || f[3] != "65536" {
		t.Errorf("exec'd id and uid_map: %q, want 0 and 0 %s 65536", res.Stdout, root)
	}

	app := testSpec(t, "app", "-c", "echo app $(id -u):$(id -g); exec sleep 1000")
	ap := start(t, other, app)
	waitLog(t, app.LogPath, "app 1000:1000")
	abase, _ := other.machineIDs(app.MachineID)
	if abase == base {
		t.Fatalf("two machines share the range %d", base)
	}
	wantApp := strconv.FormatUint(uint64(abase)+1000, 10)
	if got := statusIDs(t, workloadPid(t, ap.Pid()), "Uid"); got[0] != wantApp {
		t.Errorf("USER app outside = %v, want %s", got, wantApp)
	}

	if err := d.Cleanup(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(idLeaseDir, idLeaseName(base))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("range %d still leased after cleanup: %v", base, err)
	}
	if _, ok := d.machineIDs(spec.MachineID); ok {
		t.Error("machine's range still recorded after cleanup")
	}
}

func workloadPid(t *testing.T, initPid int) int {
	t.Helper()
	pid, _, err := oldestChild(initPid)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// TestSpareIDsSwept: the ranges a driver's spares held are given back by
// the next driver on the same state (a spare dies with its driver), and a
// closed driver's spare range is not another machine's.
func TestSpareIDsSwept(t *testing.T) {
	cfg := testConfig(t)
	d := newDriver(t, cfg)
	// Wait for the spare.
	sp := <-d.spares
	if sp.ids == 0 {
		t.Fatal("spare has no id range")
	}
	lease := filepath.Join(idLeaseDir, idLeaseName(sp.ids))
	if b, err := os.ReadFile(lease); err != nil || !strings.Contains(string(b), cfg.StateDir+"\t"+sparePrefix) {
		t.Fatalf("spare's lease: %q %v", b, err)
	}
	// As if the driver died with its spare: the lease stays behind.
	ids := sp.ids
	sp.ids = 0
	d.discardSpare(sp)
	d.Close()
	if _, err := os.Stat(lease); err != nil {
		t.Fatalf("lease gone before the sweep: %v", err)
	}
	// And a range of a state dir that is gone.
	gone := filepath.Join(t.TempDir(), "gone")
	// Leased as a driver would, so that no live range is touched.
	od := &Driver{cfg: Config{StateDir: gone}}
	obase, err := od.allocIDs("somemachine")
	if err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(idLeaseDir, idLeaseName(obase))
	d2 := newDriver(t, cfg)
	defer d2.Close()
	if _, err := os.Stat(lease); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dead spare's range %d still leased: %v", ids, err)
	}
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("range of a state dir that is gone still leased: %v", err)
	}
}
