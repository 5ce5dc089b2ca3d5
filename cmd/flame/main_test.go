package main

// These tests build the flame binary and drive it as a user would: as real
// processes on loopback, through the Machines API.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

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

// proc is a running flame command whose output is scanned for a line.
type proc struct {
	cmd  *exec.Cmd
	out  chan string
	done chan struct{}
}

func startFlame(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(flameBin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = testWriter{t}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, out: make(chan string, 100), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			t.Logf("flame %s: %s", args[0], sc.Text())
			select {
			case p.out <- sc.Text():
			default:
			}
		}
		cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	return p
}

// apiURL waits for the line announcing the Machines API and returns its URL.
func (p *proc) apiURL(t *testing.T) string {
	t.Helper()
	return p.waitLine(t, regexp.MustCompile(`(?:Machines API|machines API on)\s+(http://[0-9.:]+)`), "its API")
}

// token reads the token `flame dev` prints after its API.
func (p *proc) token(t *testing.T) string {
	t.Helper()
	return p.waitLine(t, regexp.MustCompile(`^\s+Token\s+(\S+)`), "its token")
}

// waitLine reads output until a line matches re and returns its first group.
func (p *proc) waitLine(t *testing.T, re *regexp.Regexp, what string) string {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line := <-p.out:
			if m := re.FindStringSubmatch(line); m != nil {
				return m[1]
			}
		case <-p.done:
			t.Fatalf("flame exited before printing %s", what)
		case <-timeout:
			t.Fatalf("flame did not print %s", what)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
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
	args := []string{"agent", "--data-dir", dir, "--token", "secret", "--api-addr", "127.0.0.1:0", "--driver", "exec"}
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
	<-agent.done
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
	dev := startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--driver", "exec")
	var stateDir string
	for stateDir == "" {
		if m := regexp.MustCompile(`state in (\S+)\)`).FindStringSubmatch(<-dev.out); m != nil {
			stateDir = m[1]
		}
	}
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
	select {
	case <-dev.done:
	case <-time.After(20 * time.Second):
		t.Fatal("flame dev did not exit on SIGINT")
	}
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
	dev := startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
		"--driver", "sandbox", "--regions", "ams,syd", "--hosts-per-region", "1", "--no-demo")
	var stateDir string
	hosts := map[string][2]string{} // id → API URL, DNS address
	re := regexp.MustCompile(`^\s+(ams-1|syd-1)\s+\S+\s+(http://\S+)\s+(\S+)$`)
	deadline := time.After(60 * time.Second)
	for stateDir == "" {
		select {
		case line := <-dev.out:
			if m := regexp.MustCompile(`state in (\S+)\)`).FindStringSubmatch(line); m != nil {
				stateDir = m[1]
			}
		case <-dev.done:
			t.Fatal("flame dev exited")
		case <-deadline:
			t.Fatal("flame dev did not start")
		}
	}
	url := dev.apiURL(t)
	token := dev.token(t)
	for len(hosts) < 2 {
		select {
		case line := <-dev.out:
			if m := re.FindStringSubmatch(line); m != nil {
				hosts[m[1]] = [2]string{m[2], m[3]}
			}
		case <-dev.done:
			t.Fatal("flame dev exited")
		case <-deadline:
			t.Fatal("flame dev did not list its hosts")
		}
	}
	c := api.NewClient(url, token)
	if _, err := c.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	m, err := c.Create(ctx, "demo", api.LaunchMachineInput{Region: "syd", Config: &api.MachineConfig{Image: "flame/demo-app"}})
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

	dev.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-dev.done:
	case <-time.After(30 * time.Second):
		t.Fatal("flame dev did not exit on SIGINT")
	}
	if n := workloads(m.ID); n != 0 {
		t.Errorf("%d processes of machine %s left behind", n, m.ID)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if stateDir != "" && strings.Contains(string(mounts), stateDir) {
		t.Errorf("mounts under %s left behind", stateDir)
	}
	for _, p := range []string{"/sys/class/net/flame0", "/sys/class/net/flame1", "/sys/fs/cgroup/memory/flame-0", "/sys/fs/cgroup/pids/flame-1", stateDir} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind", p)
		}
	}
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
