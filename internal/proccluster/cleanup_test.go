package proccluster_test

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/proccluster"
)

// helperEnv tells TestHelperCluster, in a test binary run by a test of
// this file, how to end: "panic" or "hang" (until killed).
const helperEnv = "FLAME_PROCCLUSTER_HELPER"

// TestHelperCluster is not a test of its own: run as a child by the tests
// below, it starts a cluster of one host with a machine, prints the
// cluster's name and the pids of its processes, then panics or hangs.
func TestHelperCluster(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("a child of TestCleanupAfterPanic and TestSweepAfterKill")
	}
	c := proccluster.New(t, proccluster.Config{Hosts: []proccluster.HostSpec{{ID: "ams-1", Region: "ams"}}})
	ctx := context.Background()
	cl := c.Client()
	if _, err := cl.CreateOrg(ctx, api.Org{Slug: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: app, OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	m, err := cl.Create(ctx, app, api.LaunchMachineInput{Region: "ams", Config: &api.MachineConfig{Image: "flame/demo-app"}})
	if err != nil || m.State != api.StateStarted {
		t.Fatalf("create a machine: %v %+v", err, m)
	}
	line := "READY " + c.Name()
	for _, mb := range c.Members() {
		pids, err := c.Pids(mb.ID)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pids {
			line += " " + strconv.Itoa(p)
		}
	}
	os.Stdout.WriteString(line + "\n")
	switch mode {
	case "panic":
		panic("proccluster: the helper panics on purpose")
	case "hang":
		select {}
	}
}

// helper is a child test binary running TestHelperCluster.
type helper struct {
	cmd  *exec.Cmd
	name string // the cluster's
	pids []int  // its processes: control plane, agent, machine
	done chan struct{}
}

// startHelper runs TestHelperCluster in a child and waits for its cluster.
func startHelper(t *testing.T, mode string) *helper {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("real-process clusters need root")
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestHelperCluster$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, proccluster.BinEnv+"="+proccluster.Bin())
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, done: make(chan struct{})}
	ready := make(chan struct{})
	var lines []string
	go func() {
		defer close(h.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "READY" && h.name == "" {
				h.name = f[1]
				for _, p := range f[2:] {
					pid, _ := strconv.Atoi(p)
					h.pids = append(h.pids, pid)
				}
				close(ready)
			}
		}
		cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-h.done
	})
	select {
	case <-ready:
	case <-h.done:
		t.Fatalf("the helper exited before its cluster was up:\n%s\n%s", strings.Join(lines, "\n"), stderr.String())
	case <-time.After(2 * proccluster.StartTimeout):
		t.Fatalf("the helper's cluster was not up within %v", 2*proccluster.StartTimeout)
	}
	if len(h.pids) < 3 {
		t.Fatalf("the helper's cluster has processes %v; want the control plane, the agent and the machine", h.pids)
	}
	return h
}

// TestCleanupAfterPanic: a test whose cluster is up, with a machine
// running, panics; once it has exited nothing of its cluster is left.
func TestCleanupAfterPanic(t *testing.T) {
	h := startHelper(t, "panic")
	select {
	case <-h.done:
	case <-time.After(2 * proccluster.StartTimeout):
		t.Fatalf("the panicking helper did not exit within %v", 2*proccluster.StartTimeout)
	}
	if h.cmd.ProcessState.Success() {
		t.Fatal("the helper did not fail")
	}
	checkGone(t, h.name, h.pids)
}

// TestSweepAfterKill: a test binary SIGKILLed with its cluster up leaves
// the machine running in its namespace (the servers and agents die with
// it); Sweep, from another run, removes every trace.
func TestSweepAfterKill(t *testing.T) {
	h := startHelper(t, "hang")
	h.cmd.Process.Signal(syscall.SIGKILL)
	<-h.done
	if _, err := os.Stat(filepath.Join("/run/netns", h.name+"-ams-1")); err != nil {
		t.Fatalf("the killed run left no namespace: %v", err)
	}
	// Its machine runs on: the exec driver keeps workloads apart from
	// the agent, so they outlive it.
	running := 0
	for _, pid := range h.pids {
		if syscall.Kill(pid, 0) == nil && !zombie(pid) {
			running++
		}
	}
	if running == 0 {
		t.Fatalf("nothing of the killed run's processes %v runs on: nothing to sweep", h.pids)
	}
	if err := proccluster.Sweep(); err != nil {
		t.Fatal(err)
	}
	checkGone(t, h.name, h.pids)
}

// checkGone fails t when anything named for the cluster, or any of its
// processes, is left.
func checkGone(t *testing.T, name string, pids []int) {
	t.Helper()
	for _, dir := range []string{"/run/netns", os.TempDir()} {
		es, _ := os.ReadDir(dir)
		for _, e := range es {
			if strings.HasPrefix(e.Name(), name) {
				t.Errorf("%s left behind", filepath.Join(dir, e.Name()))
			}
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, name) {
			t.Errorf("link %s left behind", l.Attrs().Name)
		}
	}
	// The processes are gone; the kernel reaps a killed process's
	// namespaces at once, but its parent may take a moment to reap it.
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for {
			err := syscall.Kill(pid, 0)
			if errors.Is(err, syscall.ESRCH) || zombie(pid) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("process %d left behind (%v)", pid, err)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// zombie reports whether pid has exited and waits for its parent.
func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && s[i+2] == 'Z'
}
