package leftover

import (
	"encoding/json"
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

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// inNetns runs f on a thread of its own in a new network namespace, which
// goes when f returns (the thread is never given back): the switches and
// links f changes are nobody else's.
func inNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (a network namespace of the test's own)")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare: %v", err)
			return
		}
		f()
	}()
	<-done
}

func sysctl(t *testing.T, name string) string {
	t.Helper()
	v, err := readSysctl("/proc/sys/net/ipv6/conf/" + name + "/forwarding")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func setSysctl(t *testing.T, name, v string) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/forwarding", []byte(v), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestForwardingRestored: IPv6 forwarding a Flame turned on stays on while
// any Flame holds it, and is off again, with each interface's switch as it
// was, once the last goes; one that was on before any Flame stays on.
func TestForwardingRestored(t *testing.T) {
	inNetns(t, func() {
		dir := t.TempDir()
		setSysctl(t, "all", "0")
		setSysctl(t, "lo", "1") // an interface's own, which writing all overwrites
		a, err := Open(dir, "a", "group a")
		if err != nil {
			t.Error(err)
			return
		}
		b, err := Open(dir, "b", "group b")
		if err != nil {
			t.Error(err)
			return
		}
		for _, r := range []*Record{a, b} {
			if err := r.Forwarding(nil); err != nil {
				t.Error(err)
				return
			}
		}
		if v := sysctl(t, "all"); v != "1" {
			t.Errorf("forwarding held by two: %s, want 1", v)
		}
		if err := a.Close(); err != nil {
			t.Error(err)
		}
		if v := sysctl(t, "all"); v != "1" {
			t.Errorf("forwarding after the first of two closed: %s, want 1", v)
		}
		if err := b.Close(); err != nil {
			t.Error(err)
		}
		if v := sysctl(t, "all"); v != "0" {
			t.Errorf("forwarding after the last closed: %s, want 0 as before", v)
		}
		if v := sysctl(t, "lo"); v != "1" {
			t.Errorf("lo's forwarding after the last closed: %s, want 1 as before", v)
		}
		if m, _ := filepath.Glob(filepath.Join(dir, "*.prev")); len(m) != 0 {
			t.Errorf("files of the values before left: %v", m)
		}

		// On before any Flame: the host's, never turned off.
		setSysctl(t, "all", "1")
		c, err := Open(dir, "c", "group c")
		if err != nil {
			t.Error(err)
			return
		}
		if err := c.Forwarding(nil); err != nil {
			t.Error(err)
		}
		c.Close()
		if v := sysctl(t, "all"); v != "1" {
			t.Errorf("forwarding on before any Flame, after it closed: %s, want 1", v)
		}
	})
}

// deadHandle is the handle of a process that has ended.
func deadHandle(t *testing.T) hostproc.Handle {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	st, err := hostproc.ReadStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	h := hostproc.Handle{Pid: cmd.Process.Pid, Start: st.Start, BootID: hostproc.BootID()}
	cmd.Process.Kill()
	cmd.Wait()
	return h
}

// writeDead writes the record a dead owner left.
func writeDead(t *testing.T, dir, name, group string, things ...Thing) {
	t.Helper()
	netns, err := Netns()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(state{Owner: deadHandle(t).String(), Group: group, Netns: netns, Things: things})
	if err := os.WriteFile(filepath.Join(dir, name+recordExt), b, 0o600); err != nil {
		t.Fatal(err)
	}
	// Its lock file, as a killed owner leaves it: there, and free.
	if err := os.WriteFile(filepath.Join(dir, name+lockExt), nil, 0o600); err != nil {
		t.Fatal(err)
	}
}

func addBridge(t *testing.T, name string) {
	t.Helper()
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		t.Fatalf("bridge %s: %v", name, err)
	}
}

func linkThere(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// TestSweepOnlyTheDead: a sweep removes what the records of dead owners
// name, and the forwarding they held; it leaves a live owner's record and
// things, those of its own group, and a bridge no record names, however
// like a Flame's its name is.
func TestSweepOnlyTheDead(t *testing.T) {
	inNetns(t, func() {
		dir := t.TempDir()
		setSysctl(t, "all", "0")
		addBridge(t, "fldead-0")
		addBridge(t, "fldead-1") // looks like it, named by no record
		addBridge(t, "flmine-0")
		addBridge(t, "fllive-0")
		cg := t.TempDir() // not a cgroup: a directory stands for one here
		// A dead owner that had turned forwarding on.
		writeDead(t, dir, "dead", "group dead", Link("fldead-0", "bridge"), Thing{Kind: KindForward})
		was, _ := json.Marshal(before{All: "0", Default: "0", Ifaces: map[string]string{"lo": "0"}})
		netns, _ := Netns()
		os.WriteFile(prevFile(dir, netns), was, 0o600)
		setSysctl(t, "all", "1")
		// A dead owner of the sweeper's own group: taken over, not swept.
		writeDead(t, dir, "mine", "group mine", Link("flmine-0", "bridge"))
		// A live owner.
		live, err := Open(dir, "live", "group live")
		if err != nil {
			t.Error(err)
			return
		}
		defer live.Close()
		live.Add(Link("fllive-0", "bridge"), Cgroup(filepath.Join(cg, "x")))
		// A record whose lock is free but whose owner lives (this
		// process): not provably dead.
		self, _ := Self()
		b, _ := json.Marshal(state{Owner: self.String(), Group: "group other", Netns: netns, Things: []Thing{Link("fldead-1", "bridge")}})
		os.WriteFile(filepath.Join(dir, "other"+recordExt), b, 0o600)

		reports := Sweep(dir, "group mine", nil)
		if len(reports) != 1 || reports[0].Record != "dead" {
			t.Errorf("swept %v, want the dead owner's record only", reports)
		} else if reports[0].Removed["bridge"] != 1 || reports[0].Err != nil {
			t.Errorf("report %+v, want 1 bridge removed", reports[0])
		}
		for name, want := range map[string]bool{"fldead-0": false, "fldead-1": true, "flmine-0": true, "fllive-0": true} {
			if linkThere(name) != want {
				t.Errorf("bridge %s there: %v, want %v", name, !want, want)
			}
		}
		for name, want := range map[string]bool{"dead": false, "mine": true, "live": true, "other": true} {
			_, err := os.Stat(filepath.Join(dir, name+recordExt))
			if (err == nil) != want {
				t.Errorf("record %s there: %v, want %v", name, err == nil, want)
			}
		}
		if v := sysctl(t, "all"); v != "0" {
			t.Errorf("forwarding the dead owner turned on: %s after the sweep, want 0", v)
		}
	})
}

// TestRemoveInherited: a record taken again after its owner died holds
// what that owner recorded; RemoveInherited removes it (a part that takes
// nothing over), and what the new owner adds stays.
func TestRemoveInherited(t *testing.T) {
	inNetns(t, func() {
		dir := t.TempDir()
		addBridge(t, "flold-0")
		addBridge(t, "flnew-0")
		writeDead(t, dir, "link", "group", Link("flold-0", "bridge"))
		r, err := Open(dir, "link", "group")
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		if err := r.Add(Link("flnew-0", "bridge")); err != nil {
			t.Error(err)
		}
		rep := r.RemoveInherited()
		if rep.Removed["bridge"] != 1 || rep.Err != nil {
			t.Errorf("removed %s (%v), want 1 bridge", rep, rep.Err)
		}
		if linkThere("flold-0") || !linkThere("flnew-0") {
			t.Errorf("after: old bridge there %v, new %v; want false, true", linkThere("flold-0"), linkThere("flnew-0"))
		}
		if got := r.Things(); len(got) != 1 || got[0].Name != "flnew-0" {
			t.Errorf("record names %v, want the new bridge only", got)
		}
	})
}

// cgroupMounts finds a cgroup2 mount and a cgroup v1 hierarchy of the
// memory controller.
func cgroupMounts(t *testing.T) (v2, v1 string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 3 {
			continue
		}
		switch {
		case g[0] == "cgroup2" && v2 == "":
			v2 = f[4]
		case g[0] == "cgroup" && v1 == "" && slices.Contains(strings.Split(g[2], ","), "memory"):
			v1 = f[4]
		}
	}
	if v2 == "" || v1 == "" {
		t.Fatalf("cgroup2 mount %q, cgroup v1 memory hierarchy %q: need both", v2, v1)
	}
	return v2, v1
}

// TestSweepCgroups: the cgroups of a dead owner's record, in a cgroup2
// hierarchy and a v1 one, are emptied of their processes (a machine still
// running) and removed with their children.
func TestSweepCgroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root")
	}
	v2, v1 := cgroupMounts(t)
	dir := t.TempDir()
	tag := fmt.Sprintf("flame-leftover-test-%d", os.Getpid())
	var parents []string
	var procs []*exec.Cmd
	for _, root := range []string{v2, v1} {
		parent := filepath.Join(root, tag)
		child := filepath.Join(parent, "machine")
		if err := os.MkdirAll(child, 0o755); err != nil {
			t.Fatal(err)
		}
		parents = append(parents, parent)
		t.Cleanup(func() { unix.Rmdir(child); unix.Rmdir(parent) })
		cmd := exec.Command("sleep", "600")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill() })
		procs = append(procs, cmd)
		if err := os.WriteFile(filepath.Join(child, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeDead(t, dir, "cg", "group", Cgroup(parents[0]), Cgroup(parents[1]))
	reports := Sweep(dir, "", nil)
	if len(reports) != 1 || reports[0].Err != nil || reports[0].Removed["cgroup"] != 4 {
		t.Fatalf("reports %+v, want 4 cgroups removed", reports)
	}
	for _, p := range parents {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("cgroup %s left", p)
		}
	}
	for _, cmd := range procs {
		err := cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("process %d in the cgroups: %v, want killed", cmd.Process.Pid, err)
		}
	}
}

// TestSweepDir: a dead owner's directory is removed whole once the mounts
// other dead owners' records name under it are gone, whichever record
// sorts first; a mount no record names is left, with what holds it.
func TestSweepDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (tmpfs mounts)")
	}
	dir := t.TempDir()
	data := filepath.Join(t.TempDir(), "data")
	named, unnamed := filepath.Join(data, "machine", "rootfs"), filepath.Join(data, "other", "mnt")
	for _, m := range []string{named, unnamed} {
		if err := os.MkdirAll(m, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", m, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatalf("mount tmpfs: %v", err)
		}
		t.Cleanup(func() { unix.Unmount(m, unix.MNT_DETACH) })
		if err := os.WriteFile(filepath.Join(m, "f"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(data, "registry"), []byte("blobs"), 0o600); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(t.TempDir(), "plain")
	if err := os.MkdirAll(filepath.Join(plain, "a", "b"), 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(plain, "a", "b", "f"), []byte("x"), 0o600)
	writeDead(t, dir, "a-dev", "dev", Dir(data))
	writeDead(t, dir, "b-driver", "dev", Mount(named))
	writeDead(t, dir, "c-dev", "dev", Dir(plain))
	reports := Sweep(dir, "", nil)
	if len(reports) != 3 {
		t.Fatalf("reports %+v, want 3", reports)
	}
	if reports[2].Record != "c-dev" || reports[2].Removed["directory"] != 1 {
		t.Errorf("third report %+v, want c-dev's directory removed", reports[2])
	}
	if _, err := os.Stat(plain); err == nil {
		t.Errorf("%s left", plain)
	}
	if reports[0].Record != "b-driver" || reports[0].Removed["mount"] != 1 {
		t.Errorf("first report %+v, want b-driver's mount removed", reports[0])
	}
	if _, err := os.Stat(named); err == nil {
		t.Errorf("%s left", named)
	}
	if _, err := os.Stat(filepath.Join(data, "registry")); err == nil {
		t.Error("a file of the directory left")
	}
	if _, err := os.Stat(filepath.Join(unnamed, "f")); err != nil {
		t.Errorf("the mount no record names: %v", err)
	}
	if len(reports[1].Left) == 0 || reports[1].Removed["directory"] != 0 {
		t.Errorf("second report %+v, want the directory left for the mount under it", reports[1])
	}
}

// TestForwardingGivenBackInItsNamespace: a record closed from a thread of
// another network namespace gives the forwarding back in its own.
func TestForwardingGivenBackInItsNamespace(t *testing.T) {
	dir := t.TempDir()
	outside := sysctl(t, "all")
	opened, closed, checked := make(chan *Record), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(checked)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare: %v", err)
			close(opened)
			return
		}
		setSysctl(t, "all", "0")
		r, err := Open(dir, "elsewhere", "group")
		if err == nil {
			err = r.Forwarding(nil)
		}
		if err != nil {
			t.Error(err)
			close(opened)
			return
		}
		opened <- r
		<-closed
		if v := sysctl(t, "all"); v != "0" {
			t.Errorf("forwarding of the record's namespace after it closed elsewhere: %s, want 0", v)
		}
	}()
	r, ok := <-opened
	if ok {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := r.Close(); err != nil {
			t.Error(err)
		}
		close(closed)
	}
	<-checked
	if v := sysctl(t, "all"); v != outside {
		t.Errorf("forwarding where it was closed: %s, was %s", v, outside)
	}
}
