package main

// These tests build the flame binary and drive it as a user would: as real
// processes on loopback, through the Machines API.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flamehq/flame/api"
)

var flameBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "flame-e2e-")
	if err != nil {
		panic(err)
	}
	flameBin = filepath.Join(dir, "flame")
	out, err := exec.Command("go", "build", "-o", flameBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build flame: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running flame command. Every line of its output comes out of
// out, in order: none is dropped, however long the test takes to read.
type proc struct {
	cmd    *exec.Cmd
	out    chan string   // every line of stdout, in order
	outEnd chan struct{} // closed once out has given the last line
	done   chan struct{} // closed when the process has exited
}

// lineQueue holds the lines read and not yet passed on: a reader never
// waits for the test, and nothing is lost.
type lineQueue struct {
	mu    sync.Mutex
	lines []string
	eof   bool
	more  chan struct{} // signalled when a line comes or the output ends
}

func (q *lineQueue) put(line string, eof bool) {
	q.mu.Lock()
	if eof {
		q.eof = true
	} else {
		q.lines = append(q.lines, line)
	}
	q.mu.Unlock()
	select {
	case q.more <- struct{}{}:
	default:
	}
}

// take returns the next line; ok is false once the output ended and every
// line was taken, or stop closed.
func (q *lineQueue) take(stop <-chan struct{}) (line string, ok bool) {
	for {
		q.mu.Lock()
		if len(q.lines) > 0 {
			line = q.lines[0]
			q.lines = q.lines[1:]
			q.mu.Unlock()
			return line, true
		}
		eof := q.eof
		q.mu.Unlock()
		if eof {
			return "", false
		}
		select {
		case <-q.more:
		case <-stop:
			return "", false
		}
	}
}

// logWriter logs what is written to it as long as the test runs.
type logWriter struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
	over   bool
}

func (w *logWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.over {
		w.t.Log(w.prefix + strings.TrimRight(string(b), "\n"))
	}
	return len(b), nil
}

func (w *logWriter) stop() {
	w.mu.Lock()
	w.over = true
	w.mu.Unlock()
}

// startupTimeout bounds the wait for a line flame prints as it starts: a
// flame that prints nothing for this long is broken, not slow (it prints its
// API within a second on a quiet machine).
const startupTimeout = 60 * time.Second

// exitTimeout bounds the wait for flame to exit once told to.
const exitTimeout = 30 * time.Second

func startFlame(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(flameBin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Stdout is a pipe of the test's own, read to its end whatever the
	// process does; stderr is copied by exec, which WaitDelay bounds when a
	// child keeps it open.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := &logWriter{t: t, prefix: "flame " + args[0] + ": "}
	cmd.Stdout = w
	cmd.Stderr = logs
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		t.Fatal(err)
	}
	w.Close()
	p := &proc{cmd: cmd, out: make(chan string), outEnd: make(chan struct{}), done: make(chan struct{})}
	q := &lineQueue{more: make(chan struct{}, 1)}
	stop := make(chan struct{})
	read := make(chan struct{})
	go func() {
		defer close(read)
		defer r.Close()
		sc := bufio.NewScanner(r)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			logs.Write([]byte(sc.Text()))
			q.put(sc.Text(), false)
		}
		q.put("", true)
	}()
	go func() {
		defer close(p.outEnd)
		for {
			line, ok := q.take(stop)
			if !ok {
				return
			}
			select {
			case p.out <- line:
			case <-stop:
				return
			}
		}
	}()
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		// The process group: flame and whatever it started that did not
		// leave it.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(exitTimeout):
			t.Errorf("flame %s (pid %d) still running %v after SIGKILL", args[0], cmd.Process.Pid, exitTimeout)
		}
		close(stop)
		select {
		case <-read:
		case <-time.After(exitTimeout):
			// A process outside the group holds the output; stop reading.
			r.Close()
		}
		logs.stop()
	})
	return p
}

// apiURL waits for the line announcing the Machines API and returns its URL.
func (p *proc) apiURL(t *testing.T) string {
	t.Helper()
	return p.waitLine(t, regexp.MustCompile(`(?:Machines API|machines API on)\s+(https?://[0-9.:]+)`), "its API")
}

// token reads the token `flame dev` prints after its API.
func (p *proc) token(t *testing.T) string {
	t.Helper()
	return p.waitLine(t, regexp.MustCompile(`^\s+Token\s+(\S+)`), "its token")
}

// waitMatch reads the output until a line matches re, and returns the
// match's groups (the whole match first). It fails t when the output ends
// or startupTimeout passes first.
func (p *proc) waitMatch(t *testing.T, re *regexp.Regexp, what string) []string {
	t.Helper()
	timeout := time.NewTimer(startupTimeout)
	defer timeout.Stop()
	for {
		select {
		case line := <-p.out:
			if m := re.FindStringSubmatch(line); m != nil {
				return m
			}
		case <-p.outEnd:
			t.Fatalf("flame ended its output without printing %s", what)
		case <-timeout.C:
			exited := "still running"
			select {
			case <-p.done:
				exited = "exited: " + p.cmd.ProcessState.String()
			default:
			}
			t.Fatalf("flame did not print %s within %v (%s)", what, startupTimeout, exited)
		}
	}
}

// waitLine is waitMatch returning the first group.
func (p *proc) waitLine(t *testing.T, re *regexp.Regexp, what string) string {
	t.Helper()
	return p.waitMatch(t, re, what)[1]
}

// waitExit waits for the process to exit, at most exitTimeout.
func (p *proc) waitExit(t *testing.T, what string) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(exitTimeout):
		t.Fatalf("flame did not exit within %v %s", exitTimeout, what)
	}
}

func freePort(t *testing.T) int {
	// Below the kernel's ephemeral range (from 32768 by Linux's default),
	// so that no outgoing connection and no listener on port 0 — of this
	// test or of anything else on the machine — takes it before the
	// process it is meant for binds it; free for TCP and UDP alike
	// (gossip uses both).
	for range 200 {
		port := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		pc, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(port))
		ln.Close()
		if err != nil {
			continue
		}
		pc.Close()
		return port
	}
	t.Fatal("no free port between 20000 and 32000")
	return 0
}

// demoIdentity asks a demo app for its identity.
func demoIdentity(t *testing.T, port int) map[string]any {
	t.Helper()
	var body map[string]any
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err := json.Unmarshal(b, &body); err != nil {
				t.Fatalf("demo app answered %q", b)
			}
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo app on port %d: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// flyVar reads one FLY_* variable from a demo app's identity.
func flyVar(who map[string]any, name string) string {
	env, _ := who["env"].(map[string]any)
	s, _ := env[name].(string)
	return s
}

// workloads counts the host processes that belong to machine id.
func workloads(id string) int { return len(workloadPids(id)) }

// killWorkloads makes sure a failed test leaves no machine running.
func killWorkloads(id string) {
	for _, pid := range workloadPids(id) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

func workloadPids(id string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		for _, kv := range strings.Split(string(env), "\x00") {
			if kv == "FLY_MACHINE_ID="+id {
				pid, _ := strconv.Atoi(e.Name())
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

func demoConfig(port int) *api.MachineConfig {
	return &api.MachineConfig{Image: "flame/demo-app", Env: map[string]string{"PORT": strconv.Itoa(port)}}
}

// TestAgentKilledResumes kills a real agent process with SIGKILL and starts
// a new one on the same data dir: the machines it ran keep running, are
// adopted, and nothing is started twice.
func TestAgentKilledResumes(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"agent", "--data-dir", dir, "--token-file", tokenFile, "--api-addr", "127.0.0.1:0", "--driver", "exec", "--allow-host-exec"}
	agent := startFlame(t, args...)
	c := api.NewClient(agent.apiURL(t), "secret")

	var ids []string
	ports := map[string]int{}
	for range 2 {
		port := freePort(t)
		m, err := c.Create(ctx, "demo", api.LaunchMachineInput{Config: demoConfig(port)})
		if err != nil {
			t.Fatal(err)
		}
		if m.State != api.StateStarted {
			t.Fatalf("created machine is %s", m.State)
		}
		ids = append(ids, m.ID)
		ports[m.ID] = port
		t.Cleanup(func() { killWorkloads(m.ID) })
	}
	pids := map[string]float64{}
	for _, id := range ids {
		who := demoIdentity(t, ports[id])
		if got := flyVar(who, "FLY_MACHINE_ID"); got != id {
			t.Fatalf("demo app says it is %q, want %s", got, id)
		}
		pids[id] = who["pid"].(float64)
	}

	agent.cmd.Process.Signal(syscall.SIGKILL)
	agent.waitExit(t, "after SIGKILL")
	for _, id := range ids {
		if got := demoIdentity(t, ports[id])["pid"].(float64); got != pids[id] {
			t.Fatalf("machine %s changed pid while the agent was down", id)
		}
	}

	agent2 := startFlame(t, args...)
	c = api.NewClient(agent2.apiURL(t), "secret")
	list, err := c.List(ctx, "demo", api.ListMachinesOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("after restart the agent lists %d machines, want 2", len(list))
	}
	for _, m := range list {
		if m.State != api.StateStarted {
			t.Errorf("machine %s is %s after restart, want started", m.ID, m.State)
		}
		if got := demoIdentity(t, ports[m.ID])["pid"].(float64); got != pids[m.ID] {
			t.Errorf("machine %s was restarted (pid %v → %v), want adopted", m.ID, pids[m.ID], got)
		}
		if n := workloads(m.ID); n != 1 {
			t.Errorf("machine %s has %d workload processes, want 1", m.ID, n)
		}
	}
	// The adopted machine is fully controllable.
	if err := c.Stop(ctx, "demo", ids[0], api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	if n := workloads(ids[0]); n != 0 {
		t.Errorf("stopped machine still has %d processes", n)
	}
	if err := c.Destroy(ctx, "demo", ids[1], true); err != nil {
		t.Fatal(err)
	}
	if n := workloads(ids[1]); n != 0 {
		t.Errorf("destroyed machine still has %d processes", n)
	}
}

// TestDevStopsCleanly runs `flame dev`: its control plane deploys the demo
// app to every region, takes a machine created through its API, and an
// interrupt stops every machine and removes the temporary state.
func TestDevStopsCleanly(t *testing.T) {
	ctx := context.Background()
	dev := startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0", "--driver", "exec", "--allow-host-exec")
	stateDir := dev.waitLine(t, regexp.MustCompile(`state in (\S+)\)`), "its state dir")
	url := dev.apiURL(t)
	c := api.NewClient(url, dev.token(t))
	if _, err := api.NewClient(url, "wrong").List(ctx, "demo", api.ListMachinesOptions{}); err == nil {
		t.Error("wrong token accepted")
	}
	// The demo app runs in every region.
	var demo []*api.Machine
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ms, err := c.List(ctx, "demo", api.ListMachinesOptions{})
		regions := map[string]bool{}
		for _, m := range ms {
			if m.State == api.StateStarted {
				regions[m.Region] = true
			}
		}
		if err == nil && len(regions) == 3 {
			demo = ms
			break
		}
		if time.Now().After(end) {
			t.Fatalf("demo app not running in every region: %v %+v", err, ms)
		}
	}
	port := freePort(t)
	m, err := c.Create(ctx, "demo", api.LaunchMachineInput{Region: "iad", Config: demoConfig(port)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killWorkloads(m.ID) })
	who := demoIdentity(t, port)
	if flyVar(who, "FLY_APP_NAME") != "demo" || flyVar(who, "FLY_REGION") != "iad" {
		t.Errorf("demo identity = %v", who)
	}
	dev.cmd.Process.Signal(syscall.SIGINT)
	dev.waitExit(t, "on SIGINT")
	if code := dev.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("flame dev exit status %d", code)
	}
	for _, dm := range append(demo, m) {
		if n := workloads(dm.ID); n != 0 {
			t.Errorf("flame dev left %d processes of machine %s behind", n, dm.ID)
		}
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("flame dev left its state dir %s behind (%v)", stateDir, err)
	}
}

// TestDevSandbox runs `flame dev` with the sandbox driver: the demo app is
// built and pushed as a real image at start, a machine in syd pulls and runs
// it in its own namespaces with a private IPv6 address, a host in ams finds
// it by DNS, and an interrupt leaves nothing behind — no process, mount,
// bridge or cgroup.
func TestDevSandbox(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	ctx := context.Background()
	// What is there before, to tell a leftover of this flame dev from a
	// name another instance holds.
	before := map[string]bool{}
	for _, mnt := range cgroupHierarchies(t) {
		es, _ := os.ReadDir(mnt)
		for _, e := range es {
			before[filepath.Join(mnt, e.Name())] = true
		}
	}
	links, _ := netlink.LinkList()
	for _, l := range links {
		before["link "+l.Attrs().Name] = true
	}
	dev := startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0",
		"--driver", "sandbox", "--regions", "ams,syd", "--hosts-per-region", "1", "--no-demo")
	stateDir := dev.waitLine(t, regexp.MustCompile(`state in (\S+)\)`), "its state dir")
	url := dev.apiURL(t)
	token := dev.token(t)
	hosts := map[string][2]string{} // id → API URL, DNS address
	re := regexp.MustCompile(`^\s+(ams-1|syd-1)\s+\S+\s+(https?://\S+)\s+(\S+)$`)
	for len(hosts) < 2 {
		m := dev.waitMatch(t, re, "its hosts")
		hosts[m[1]] = [2]string{m[2], m[3]}
	}
	amsEdge := dev.waitLine(t, regexp.MustCompile(`^\s+Edge\s+ams\s+http://<app>\.(localhost:\d+)/`), "the ams edge")
	c := api.NewClient(url, token)
	if _, err := c.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	port80 := 80
	m, err := c.Create(ctx, "demo", api.LaunchMachineInput{Region: "syd", Config: &api.MachineConfig{Image: "flame/demo-app",
		Services: []api.MachineService{{Protocol: "tcp", InternalPort: 8080, Ports: []api.MachinePort{{Port: &port80, Handlers: []string{"http"}}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	if m.State != api.StateStarted || !strings.HasPrefix(m.PrivateIP, "fdaa:") || m.ImageRef.Digest == "" {
		t.Fatalf("machine %+v", m)
	}
	var resp *http.Response
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if resp, err = http.Get("http://[" + m.PrivateIP + "]:8080/"); err == nil || time.Now().After(end) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	var who map[string]any
	json.NewDecoder(resp.Body).Decode(&who)
	resp.Body.Close()
	if flyVar(who, "FLY_REGION") != "syd" || flyVar(who, "FLY_PRIVATE_IP") != m.PrivateIP || who["pid"].(float64) > 20 {
		t.Errorf("demo app in its sandbox says %v", who)
	}
	// ams-1 resolves it over DNS once gossip has brought it over.
	found := false
	for end := time.Now().Add(10 * time.Second); !found && time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		found = strings.Contains(digAAAA(t, hosts["ams-1"][1], "demo.internal"), m.PrivateIP)
	}
	if !found {
		t.Errorf("demo.internal does not resolve to %s on ams-1", m.PrivateIP)
	}
	// The ams edge delivers to it, through syd-1's proxy.
	edgeURL := "http://" + strings.Replace(amsEdge, "localhost", "127.0.0.1", 1) + "/"
	var edgeWho map[string]any
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		req, _ := http.NewRequest("GET", edgeURL, nil)
		req.Host = "demo.localhost"
		if resp, err := http.DefaultClient.Do(req); err == nil {
			if resp.StatusCode == 200 {
				json.NewDecoder(resp.Body).Decode(&edgeWho)
			}
			resp.Body.Close()
			if edgeWho != nil {
				break
			}
		}
	}
	if flyVar(edgeWho, "FLY_REGION") != "syd" || flyVar(edgeWho, "FLY_MACHINE_ID") != m.ID {
		t.Errorf("the ams edge answered %v", edgeWho)
	}

	// What this flame dev has on the host, found from its sandboxes'
	// inits (spares included, one at least on each host), not from names:
	// their cgroups and the cgroups those are in, and their bridges.
	var cgroups, bridges []string
	for end := time.Now().Add(startupTimeout); ; time.Sleep(50 * time.Millisecond) {
		// Each host makes its spare init as it starts, in the background.
		if cgroups, bridges = sandboxFootprint(t); len(bridges) == 2 || time.Now().After(end) {
			break
		}
	}
	if len(cgroups) == 0 || len(bridges) != 2 {
		t.Fatalf("flame dev's sandboxes are in cgroups %v, on bridges %v; want cgroups and a bridge a host", cgroups, bridges)
	}
	t.Logf("flame dev's cgroups %v, bridges %v", cgroups, bridges)

	dev.cmd.Process.Signal(syscall.SIGINT)
	dev.waitExit(t, "on SIGINT")
	if n := workloads(m.ID); n != 0 {
		t.Errorf("%d processes of machine %s left behind", n, m.ID)
	}
	if n := len(sandboxInits()); n != 0 {
		t.Errorf("%d sandbox inits left behind", n)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), stateDir) {
		t.Errorf("mounts under %s left behind", stateDir)
	}
	shared := func(key string) string {
		if before[key] {
			return " (there before this flame dev started: another instance holds the name)"
		}
		if n := cgroupProcs(key); n > 0 {
			return fmt.Sprintf(" (%d processes of another instance in it: the name is shared)", n)
		}
		return ""
	}
	for _, p := range append(cgroups, stateDir) {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind%s", p, shared(p))
		}
	}
	for _, b := range bridges {
		if _, err := netlink.LinkByName(b); err == nil {
			t.Errorf("bridge %s left behind%s", b, shared("link "+b))
		}
	}
}

// sandboxInits returns the pids of the sandbox inits run from this test's
// flame binary: the `flame dev` of this test's, no other test's or
// instance's.
func sandboxInits() []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if args := strings.Split(string(b), "\x00"); err == nil && len(args) > 1 && args[0] == flameBin && args[1] == "sandbox-init" {
			pids = append(pids, pid)
		}
	}
	return pids
}

// sandboxFootprint returns the cgroup directories of this test's sandbox
// inits and their parents, on cgroup v1 or v2 alike, and the bridges their
// veth pairs are ports of.
func sandboxFootprint(t *testing.T) (cgroups, bridges []string) {
	t.Helper()
	hier := cgroupHierarchies(t)
	own := procCgroups(t, os.Getpid())
	seenCg, seenBr := map[string]bool{}, map[string]bool{}
	for _, pid := range sandboxInits() {
		for key, p := range procCgroups(t, pid) {
			// Hierarchies the sandbox driver leaves alone hold the init
			// where its parent was.
			if p == own[key] || p == "/" {
				continue
			}
			mnt, ok := hier[key]
			if !ok {
				t.Fatalf("pid %d is in cgroup %s of hierarchy %q, mounted nowhere", pid, p, key)
			}
			for _, d := range []string{p, filepath.Dir(p)} {
				if dir := filepath.Join(mnt, d); d != "/" && !seenCg[dir] {
					seenCg[dir] = true
					cgroups = append(cgroups, dir)
				}
			}
		}
		for _, b := range initBridges(t, pid) {
			if !seenBr[b] {
				seenBr[b] = true
				bridges = append(bridges, b)
			}
		}
	}
	for _, d := range cgroups {
		if _, err := os.Stat(d); err != nil {
			t.Fatalf("cgroup of a running sandbox: %v", err)
		}
	}
	return cgroups, bridges
}

// cgroupProcs counts the processes in the cgroup dir and below.
func cgroupProcs(dir string) int {
	n := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Name() == "cgroup.procs" {
			b, _ := os.ReadFile(p)
			n += len(strings.Fields(string(b)))
		}
		return nil
	})
	return n
}

// procCgroups reads /proc/<pid>/cgroup: hierarchy (its controllers, "" for
// cgroup v2) → path.
func procCgroups(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(f) == 3 {
			out[f[1]] = f[2]
		}
	}
	return out
}

// cgroupHierarchies maps each cgroup hierarchy mounted (as /proc/<pid>/cgroup
// names it: its controllers, "" for v2) to where its root is mounted.
func cgroupHierarchies(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for line := range strings.Lines(string(b)) {
		pre, post, ok := strings.Cut(strings.TrimSpace(line), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 3 || f[3] != "/" {
			continue
		}
		switch g[0] {
		case "cgroup2":
			out[""] = f[4]
		case "cgroup":
			var ctrls []string
			for _, o := range strings.Split(g[2], ",") {
				switch o {
				case "rw", "ro", "relatime", "noexec", "nosuid", "nodev", "clone_children", "xattr", "nsdelegate", "noprefix":
				default:
					if !strings.HasPrefix(o, "release_agent=") {
						ctrls = append(ctrls, o)
					}
				}
			}
			out[strings.Join(ctrls, ",")] = f[4]
		}
	}
	return out
}

// initBridges returns the bridges whose ports are the host ends of the
// veth pairs of pid's network namespace.
func initBridges(t *testing.T, pid int) []string {
	t.Helper()
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		t.Fatalf("network namespace of pid %d: %v", pid, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		if l.Type() != "veth" {
			continue
		}
		// A veth's parent index is its peer's, in the host's namespace.
		peer, err := netlink.LinkByIndex(l.Attrs().ParentIndex)
		if err != nil {
			t.Fatalf("host end of pid %d's %s: %v", pid, l.Attrs().Name, err)
		}
		br, err := netlink.LinkByIndex(peer.Attrs().MasterIndex)
		if err != nil {
			t.Fatalf("bridge of %s: %v", peer.Attrs().Name, err)
		}
		out = append(out, br.Attrs().Name)
	}
	return out
}

// digAAAA asks a DNS server for name's AAAA records and returns the answer
// as text.
func digAAAA(t *testing.T, server, name string) string {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(name), mdns.TypeAAAA)
	r, _, err := new(mdns.Client).Exchange(m, server)
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, rr := range r.Answer {
		b.WriteString(rr.String())
	}
	return b.String()
}
