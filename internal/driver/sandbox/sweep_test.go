package sandbox

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/hostproc"
	"github.com/flamehq/flame/internal/leftover"
	"github.com/flamehq/flame/internal/mesh"
)

// sweepChildCommand runs the test binary as the process TestSweepAfterKill
// SIGKILLs (see TestMain): "sweep-child <dir>".
const sweepChildCommand = "sweep-child"

// sweepFacts is what the killed process made, as it tells its parent.
type sweepFacts struct {
	Bridge   string   `json:"bridge"`
	Veth     string   `json:"veth"`
	Cgroups  []string `json:"cgroups"`
	Mount    string   `json:"mount"`
	Table    string   `json:"table"` // the filter's, bridge and inet families
	TUN      string   `json:"tun"`
	RuleIif  string   `json:"rule_iif"`
	Records  []string `json:"records"`
	Locks    []string `json:"locks"`
	InitPid  int      `json:"init_pid"`
	Instance string   `json:"instance"`
}

// machineAndLink runs, in driver d, a machine that sleeps, and opens the
// mesh link of d's host: what a dev host has when it is killed.
func machineAndLink(d *Driver, dir string) (driver.Spec, *mesh.Link, error) {
	id := randHex(14)
	mdir := filepath.Join(dir, "machine-"+id)
	spec := driver.Spec{
		MachineID: id, InstanceID: "01J" + strings.ToUpper(randHex(23)), App: "demo", Org: 1, Region: "local",
		Dir: mdir, LogPath: filepath.Join(mdir, "log"), Image: "busybox", Entrypoint: []string{"sleep", "3600"},
		MemoryMB: 256, CPUs: 1,
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return spec, nil, err
	}
	ctx := context.Background()
	if _, err := d.Prepare(ctx, spec); err != nil {
		return spec, nil, err
	}
	if _, err := d.Start(ctx, spec); err != nil {
		return spec, nil, err
	}
	link, err := mesh.OpenLink(mesh.LinkConfig{Name: mesh.LinkName(d.cfg.Network.String(), int(d.cfg.Host)),
		Network: d.cfg.Network, Bridge: d.cfg.Bridge})
	return spec, link, err
}

// sweepChildMain is the process TestSweepAfterKill kills: a driver with a
// machine and the mesh link of its host, its facts written to dir, then
// nothing until the SIGKILL.
func sweepChildMain(dir string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "sweep child:", err)
		return 1
	}
	root, err := os.MkdirTemp(dir, "root-")
	if err != nil {
		return fail(err)
	}
	bb := findBusybox()
	if bb == "" {
		return fail(errors.New("no static busybox"))
	}
	if err := buildBase(filepath.Join(root, "base"), bb); err != nil {
		return fail(err)
	}
	testRoot = root
	cfg, err := sweepConfig(dir)
	if err != nil {
		return fail(err)
	}
	d, err := New(cfg)
	if err != nil {
		return fail(err)
	}
	spec, _, err := machineAndLink(d, dir)
	if err != nil {
		return fail(err)
	}
	st, err := readState(spec.Dir)
	if err != nil {
		return fail(err)
	}
	h, err := hostproc.ParseHandle(st.Handle)
	if err != nil {
		return fail(err)
	}
	facts := sweepFacts{
		Bridge: cfg.Bridge, Veth: vethName(spec.MachineID), Cgroups: d.cg.roots, Mount: mountDir(spec),
		Table: filterTable(cfg.Bridge), TUN: mesh.LinkName(cfg.Network.String(), int(cfg.Host)), RuleIif: cfg.Bridge,
		Locks:   []string{d.prefixLock.Name()},
		InitPid: h.Pid, Instance: cfg.Network.String(),
	}
	// The records are this process's (the driver's and the mesh link's),
	// and so are the lock files they name (the link's slot is its own).
	paths, _ := filepath.Glob(filepath.Join(recordDir, "*.json"))
	self := strconv.Itoa(os.Getpid()) + ":"
	for _, p := range paths {
		rb, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var rec struct {
			Owner  string
			Things []leftover.Thing
		}
		if json.Unmarshal(rb, &rec) != nil || !strings.HasPrefix(rec.Owner, self) {
			continue
		}
		facts.Records = append(facts.Records, strings.TrimSuffix(filepath.Base(p), ".json"))
		for _, th := range rec.Things {
			if th.Kind == leftover.KindLockFile && th.Name != d.prefixLock.Name() {
				facts.Locks = append(facts.Locks, th.Name)
			}
		}
	}
	b, _ := json.Marshal(facts)
	if err := os.WriteFile(filepath.Join(dir, "facts.json"), b, 0o600); err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	select {} // until killed
}

// sweepConfig is a driver of an instance of its own whose state is in dir,
// which outlives the process (it is killed: nothing of it is cleaned up).
func sweepConfig(dir string) (Config, error) {
	tag := randHex(6)
	exe, err := os.Executable()
	if err != nil {
		return Config{}, err
	}
	return Config{
		Images:       newTestImages(),
		StateDir:     filepath.Join(dir, "state-"+tag),
		Bridge:       "flt" + tag,
		Network:      testNetwork(),
		Host:         1,
		InitPath:     exe,
		CgroupParent: "flame-test-" + tag,
		Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}, nil
}

// TestSweepAfterKill: a process with a sandbox driver, a running machine
// and its host's mesh link is SIGKILLed, which leaves its bridge, veth,
// cgroups (and the machine in them), its filter's tables, the machine's
// writable layer mounted, the mesh's policy rule, its lock files and its
// records. The next driver to start, of another instance, removes every
// one of them, and nothing of a live instance beside it.
func TestSweepAfterKill(t *testing.T) {
	requireSandboxes(t)
	dir := t.TempDir()

	// A live instance: this process's, with a machine and a mesh link.
	liveCfg := testConfig(t)
	live := newDriver(t, liveCfg)
	liveSpec, liveLink, err := machineAndLink(live, t.TempDir())
	t.Cleanup(func() {
		if liveLink != nil {
			liveLink.Close()
		}
		live.Cleanup(context.Background(), liveSpec)
	})
	if err != nil {
		t.Fatal(err)
	}
	liveState, err := readState(liveSpec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	liveInit, err := hostproc.ParseHandle(liveState.Handle)
	if err != nil {
		t.Fatal(err)
	}
	livePid := liveInit.Pid

	// The instance to kill, in a process of its own.
	cmd := exec.Command(os.Args[0], sweepChildCommand, dir)
	cmd.Stderr = tWriter{t}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Log("killed process: " + sc.Text())
			if sc.Text() == "ready" {
				ready <- nil
				io.Copy(io.Discard, out)
				return
			}
		}
		ready <- errors.New("the process to kill ended before it was ready")
	}()
	// Not a timing assertion: a process that never gets ready fails here
	// rather than hanging the test.
	select {
	case err := <-ready:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the process to kill was not ready in 2 minutes")
	}
	var facts sweepFacts
	b, err := os.ReadFile(filepath.Join(dir, "facts.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &facts); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, nothing of the killed process's outlives the test.
	t.Cleanup(func() {
		newFilter(facts.Bridge, 0).close(true)
		for _, c := range facts.Cgroups {
			removeCgroupDir(c)
		}
		unix.Unmount(facts.Mount, unix.MNT_DETACH)
		if l, err := netlink.LinkByName(facts.Bridge); err == nil {
			netlink.LinkDel(l)
		}
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	killed = true

	// What the kill left, as it did before sweeps.
	have := leftoversOf(t, facts)
	for _, what := range []string{"bridge", "veth", "cgroup", "mount", "nftables bridge", "nftables inet", "rule", "record", "machine"} {
		if !have[what] {
			t.Errorf("after the kill: no %s of the killed instance: the test did not make what it sweeps", what)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Another instance's driver starts: it sweeps.
	newDriver(t, testConfig(t))
	left := leftoversOf(t, facts)
	for what, ok := range left {
		if ok {
			t.Errorf("after a new driver's start: the killed instance's %s is left", what)
		}
	}

	// The live instance is untouched: its machine runs, its bridge,
	// rule and record are there.
	if _, err := netlink.LinkByName(liveCfg.Bridge); err != nil {
		t.Errorf("the live instance's bridge: %v", err)
	}
	if !running(livePid) {
		t.Errorf("the live instance's machine (init %d) was killed", livePid)
	}
	if !ruleFrom(t, liveCfg.Bridge) {
		t.Error("the live instance's mesh rule was removed")
	}
	if _, err := os.Stat(filepath.Join(recordDir, "sandbox-"+liveCfg.Bridge+".json")); err != nil {
		t.Errorf("the live instance's record: %v", err)
	}
	for _, r := range live.cg.roots {
		if _, err := os.Stat(r); err != nil {
			t.Errorf("the live instance's cgroup: %v", err)
		}
	}
}

// leftoversOf says which of what the killed instance made is still there.
func leftoversOf(t *testing.T, f sweepFacts) map[string]bool {
	t.Helper()
	have := map[string]bool{}
	if _, err := netlink.LinkByName(f.Bridge); err == nil {
		have["bridge"] = true
	}
	if _, err := netlink.LinkByName(f.Veth); err == nil {
		have["veth"] = true
	}
	if _, err := netlink.LinkByName(f.TUN); err == nil {
		have["tun"] = true
	}
	for _, c := range f.Cgroups {
		if _, err := os.Stat(c); err == nil {
			have["cgroup"] = true
		}
	}
	if mounted(t, f.Mount) {
		have["mount"] = true
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	ts, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range ts {
		if tb.Name == f.Table {
			switch tb.Family {
			case nftables.TableFamilyBridge:
				have["nftables bridge"] = true
			case nftables.TableFamilyINet:
				have["nftables inet"] = true
			}
		}
	}
	if ruleFrom(t, f.RuleIif) {
		have["rule"] = true
	}
	for _, r := range f.Records {
		for _, ext := range []string{".json", ".lock"} {
			if _, err := os.Stat(filepath.Join(recordDir, r+ext)); err == nil {
				have["record"] = true
			}
		}
	}
	for _, l := range f.Locks {
		if _, err := os.Stat(l); err == nil {
			have["lock file"] = true
		}
	}
	if running(f.InitPid) {
		have["machine"] = true
	}
	return have
}

// ruleFrom reports whether an IPv6 rule takes what comes in on iif.
func ruleFrom(t *testing.T, iif string) bool {
	rules, err := netlink.RuleList(netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.IifName == iif {
			return true
		}
	}
	return false
}

// mounted reports whether something is mounted at dir.
func mounted(t *testing.T, dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if mnt, _, _, ok := parseMountinfoLine(line); ok && mnt == dir {
			return true
		}
	}
	return false
}

// running reports whether pid is a process that has not ended.
func running(pid int) bool {
	st, err := hostproc.ReadStat(pid)
	return pid > 0 && err == nil && st.State != 'Z' && st.State != 'X'
}
