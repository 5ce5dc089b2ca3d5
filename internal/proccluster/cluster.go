package proccluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/pki"
)

// ControlID is the control plane's name among the members, and in faults.
const ControlID = "control"

// The ports every member listens on, at its own address: each is alone in
// its namespace, so they are fixed.
const (
	serverAPIPort = 4280
	agentAPIPort  = 4281
	backhaulPort  = 4282
	natsPort      = 4222
	gossipPort    = 7946
	edgePort      = 80
)

// HostSpec is one agent of a cluster.
type HostSpec struct {
	ID, Region string
	Edge       bool // it serves an edge proxy
}

// Config is a cluster: a control plane and its hosts.
type Config struct {
	Hosts []HostSpec
	// ControlRegion is the control plane's region (default: the first
	// host's).
	ControlRegion string
	// Sandbox runs the hosts with the sandbox driver and the private
	// network between them (sandbox.go); without it they run the exec
	// driver and no mesh.
	Sandbox bool
}

// State is what a member is doing, as the faults left it.
type State string

const (
	Up      State = "up"
	Killed  State = "killed"
	Stalled State = "stalled"
)

// Member is the control plane or one host: its process, namespace and
// address.
type Member struct {
	ID, Region string
	IP         net.IP
	Edge       bool

	netns   string // path of its named namespace
	veth    string // its end on the bridge
	dataDir string
	logPath string
	args    []string
	proc    *proc
	state   State
}

// APIURL is the member's Machines API: the control plane's, or the host's
// (mutual TLS: Cluster.HostClient calls it).
func (m *Member) APIURL() string {
	if m.ID == ControlID {
		return "http://" + net.JoinHostPort(m.IP.String(), strconv.Itoa(serverAPIPort))
	}
	return "https://" + net.JoinHostPort(m.IP.String(), strconv.Itoa(agentAPIPort))
}

// EdgeURL is the host's edge proxy ("" for a host without one).
func (m *Member) EdgeURL() string {
	if !m.Edge {
		return ""
	}
	return "http://" + net.JoinHostPort(m.IP.String(), strconv.Itoa(edgePort))
}

// Cluster is a control plane and its hosts, each a process in a network
// namespace of its own on one bridge.
type Cluster struct {
	t    testing.TB
	name string
	dir  string
	net  *network
	// AdminToken is the control plane's admin token.
	AdminToken string
	// operator is the client certificate the cluster calls hosts with.
	operator *pki.Operator

	mu      sync.Mutex
	members []*Member // the control plane first
	byID    map[string]*Member
	cut     map[[2]string]bool // pairs of members partitioned apart

	sandbox bool
	hosts   []sandboxHost // read once the hosts serve
}

// New starts a cluster and waits until every member sees every other
// alive. It skips t when not root, and fails it when anything the cluster
// needs cannot be made. Everything it made is removed when t ends.
func New(t testing.TB, cfg Config) *Cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("real-process clusters need root (network namespaces, nftables)")
	}
	if flameBin == "" {
		t.Fatal("proccluster: the flame binary is not built: call proccluster.Main from TestMain")
	}
	if len(cfg.Hosts) == 0 || len(cfg.Hosts) > 35 {
		t.Fatalf("proccluster: %d hosts; 1 to 35", len(cfg.Hosts))
	}
	if err := Sweep(); err != nil {
		t.Logf("proccluster: sweeping leftovers of dead runs: %v", err)
	}
	c := &Cluster{t: t, name: runName(), byID: map[string]*Member{}, cut: map[[2]string]bool{}, sandbox: cfg.Sandbox}
	c.dir = filepath.Join(os.TempDir(), c.name)
	// Registered first, run last: once every other cleanup of the
	// cluster has run, nothing of it may be left.
	t.Cleanup(func() {
		if left := leftovers(c.name, c.hosts); len(left) > 0 {
			t.Errorf("proccluster: left on the machine: %s", strings.Join(left, "; "))
		}
	})
	if err := os.Mkdir(c.dir, 0o755); err != nil {
		t.Fatalf("proccluster: %v", err)
	}
	// Cleanups run last registered first: processes and namespaces, then
	// the bridge, then the directory; the logs are shown first.
	t.Cleanup(func() {
		if err := os.RemoveAll(c.dir); err != nil {
			t.Errorf("proccluster: %v", err)
		}
	})
	n, err := newNetwork(c.name + "br")
	if err != nil {
		t.Fatalf("proccluster: %v", err)
	}
	c.net = n
	t.Cleanup(func() {
		if err := n.close(); err != nil {
			t.Errorf("proccluster: delete bridge %s: %v", n.bridge, err)
		}
	})
	region := cfg.ControlRegion
	if region == "" {
		region = cfg.Hosts[0].Region
	}
	specs := append([]HostSpec{{ID: ControlID, Region: region}}, cfg.Hosts...)
	for i, s := range specs {
		if _, dup := c.byID[s.ID]; dup || s.ID == "" {
			t.Fatalf("proccluster: host id %q twice or empty", s.ID)
		}
		m := &Member{ID: s.ID, Region: s.Region, Edge: s.Edge, IP: n.addr(2 + i).IP,
			dataDir: filepath.Join(c.dir, s.ID), logPath: filepath.Join(c.dir, s.ID+".log")}
		c.members = append(c.members, m)
		c.byID[s.ID] = m
		p, err := newNetns(c.name + "-" + s.ID)
		if err != nil {
			t.Fatalf("proccluster: %v", err)
		}
		m.netns = p
		t.Cleanup(func() { c.remove(m) })
		m.veth = c.name + "v" + strconv.FormatInt(int64(i), 36)
		if err := n.attach(p, m.veth, 2+i); err != nil {
			t.Fatalf("proccluster: %s: %v", s.ID, err)
		}
		if err := (firewall{p}).create(); err != nil {
			t.Fatalf("proccluster: %s: %v", s.ID, err)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.showLogs()
		}
	})
	ctl := c.members[0]
	ctl.args = []string{"server", "--data-dir", ctl.dataDir,
		"--api-addr", c.addr(ctl, serverAPIPort), "--region", ctl.Region, "--host-id", ControlID,
		"--gossip-addr", c.addr(ctl, gossipPort), "--nats-addr", c.addr(ctl, natsPort), "--plain-http"}
	if err := c.start(ctl); err != nil {
		t.Fatalf("proccluster: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(ctl.dataDir, "admin-token"))
	if err != nil {
		t.Fatalf("proccluster: the control plane's admin token: %v", err)
	}
	c.AdminToken = strings.TrimSpace(string(b))
	if err := c.enroll(); err != nil {
		t.Fatalf("proccluster: %v", err)
	}
	for _, m := range c.members[1:] {
		// Each agent enrolls with a join token minted for it, from a file;
		// started again, it finds its identity in its data dir.
		driver := []string{"--driver", "exec", "--allow-host-exec"}
		if c.sandbox {
			driver = []string{"--driver", "sandbox", "--mesh-addr", c.addr(m, meshPort),
				"--registry", net.JoinHostPort("127.0.0.1", strconv.Itoa(registryPort))}
			f, err := forward(m.netns, driver[len(driver)-1], c.addr(ctl, serverAPIPort))
			if err != nil {
				t.Fatalf("proccluster: %s: %v", m.ID, err)
			}
			t.Cleanup(f.close)
		}
		m.args = []string{"agent", "--data-dir", m.dataDir, "--join-token-file", m.dataDir + ".join-token",
			"--control-plane", ctl.APIURL()}
		m.args = append(m.args, driver...)
		m.args = append(m.args, "--api-addr", c.addr(m, agentAPIPort), "--region", m.Region, "--host-id", m.ID,
			"--gossip-addr", c.addr(m, gossipPort), "--backhaul-addr", c.addr(m, backhaulPort),
			"--nats-url", "nats://"+c.addr(ctl, natsPort), "--edge-tcp-ports=")
		for _, o := range c.members {
			if o != m {
				m.args = append(m.args, "--join", c.addr(o, gossipPort))
			}
		}
		if m.Edge {
			m.args = append(m.args, "--edge-addr", c.addr(m, edgePort))
		}
	}
	errs := make([]error, len(c.members))
	var wg sync.WaitGroup
	for i, m := range c.members[1:] {
		wg.Go(func() { errs[i] = c.start(m) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("proccluster: %v", err)
	}
	if c.sandbox {
		if c.hosts, err = c.sandboxHosts(); err != nil {
			t.Fatalf("proccluster: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), FormBound(len(c.members)))
	defer cancel()
	if err := c.WaitViews(ctx); err != nil {
		t.Fatalf("proccluster: the cluster did not form within %v: %v", FormBound(len(c.members)), err)
	}
	return c
}

func (c *Cluster) addr(m *Member, port int) string {
	return net.JoinHostPort(m.IP.String(), strconv.Itoa(port))
}

var readyLine = regexp.MustCompile(`(?:Machines API|machines API) on https?://`)

// enroll mints a join token for every host, in a file beside its data dir,
// and gets the cluster a client certificate to call the hosts with.
func (c *Cluster) enroll() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := c.Client()
	for _, m := range c.members[1:] {
		jt, err := cl.CreateJoinToken(ctx, api.CreateJoinTokenInput{HostID: m.ID})
		if err != nil {
			return fmt.Errorf("join token for %s: %w", m.ID, err)
		}
		if err := os.WriteFile(m.dataDir+".join-token", []byte(jt.Token+"\n"), 0o600); err != nil {
			return err
		}
	}
	key, err := pki.NewKey()
	if err != nil {
		return err
	}
	csr, err := pki.NewCSR(key, pki.RoleControl, "proccluster")
	if err != nil {
		return err
	}
	cc, err := cl.IssueClientCertificate(ctx, api.ClientCertificateInput{CSR: csr})
	if err != nil {
		return fmt.Errorf("client certificate: %w", err)
	}
	c.operator, err = pki.NewOperator(key, []byte(cc.Certificate), []byte(cc.CA))
	return err
}

// HostClient is host id's own Machines API, over mutual TLS with the
// cluster's client certificate.
func (c *Cluster) HostClient(m *Member) *api.Client {
	cl := api.NewClient(m.APIURL(), "")
	cl.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: c.operator.TLS(m.ID), DisableKeepAlives: true}}
	return cl
}

// start starts m's process and waits until it serves.
func (c *Cluster) start(m *Member) error {
	p, err := startProc(m.netns, flameBin, m.logPath, m.args)
	if err != nil {
		return fmt.Errorf("%s: %w", m.ID, err)
	}
	c.mu.Lock()
	m.proc, m.state = p, Up
	c.mu.Unlock()
	if _, err := p.waitLine(readyLine); err != nil {
		return fmt.Errorf("%s: %w (log: %s)", m.ID, err, tail(m.logPath, 20))
	}
	return nil
}

// remove kills everything in m's namespace and deletes the namespace. A
// sandbox host is asked to stop first (its driver and mesh let go of what
// they hold), and what its machines left outside the namespace is removed.
func (c *Cluster) remove(m *Member) {
	var first []int
	if m.proc != nil {
		first = []int{-m.proc.cmd.Process.Pid}
		if c.sandbox && m.ID != ControlID && c.State(m.ID) == Up && !m.stop() {
			c.t.Errorf("proccluster: %s did not stop within %v of SIGTERM", m.ID, stopTimeout)
		}
	}
	if err := killNetns(m.netns, first...); err != nil {
		c.t.Errorf("proccluster: %v", err)
	}
	if m.proc != nil {
		if err := m.proc.wait(); err != nil {
			c.t.Errorf("proccluster: %v", err)
		}
	}
	if c.sandbox {
		if err := sweepSandbox(m.dataDir); err != nil {
			c.t.Errorf("proccluster: %s: %v", m.ID, err)
		}
	}
	// The veth pair goes with the namespace, but only once the kernel
	// has freed it, a moment later: deleted here, it is gone at once.
	if err := deleteLink(m.veth); err != nil {
		c.t.Errorf("proccluster: delete veth of %s: %v", m.ID, err)
	}
	if err := deleteNetns(m.netns); err != nil {
		c.t.Errorf("proccluster: delete netns of %s: %v", m.ID, err)
	}
}

// showLogs logs the end of every member's log.
func (c *Cluster) showLogs() {
	for _, m := range c.members {
		c.t.Logf("--- log of %s (%s), last lines:\n%s", m.ID, m.state, tail(m.logPath, 40))
	}
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Name is the prefix of every name the cluster gave to something of the
// machine: namespaces, links, its directory.
func (c *Cluster) Name() string { return c.name }

// Members returns the control plane and the hosts, in order.
func (c *Cluster) Members() []*Member { return slices.Clone(c.members) }

// Member returns the member named id, or nil.
func (c *Cluster) Member(id string) *Member { return c.byID[id] }

// State returns what id is doing.
func (c *Cluster) State(id string) State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byID[id].state
}

// Client is the control plane's API with the admin token.
func (c *Cluster) Client() *api.Client { return api.NewClient(c.members[0].APIURL(), c.AdminToken) }

func (c *Cluster) member(id string) (*Member, error) {
	m := c.byID[id]
	if m == nil {
		return nil, fmt.Errorf("proccluster: no member %q", id)
	}
	return m, nil
}

// Kill SIGKILLs member id and every process of its namespace: its
// machines are gone with it.
func (c *Cluster) Kill(id string) error {
	m, err := c.member(id)
	if err != nil {
		return err
	}
	c.mu.Lock()
	st := m.state
	c.mu.Unlock()
	if st == Killed {
		return fmt.Errorf("proccluster: %s is already killed", id)
	}
	if err := killNetns(m.netns, -m.proc.cmd.Process.Pid); err != nil {
		return err
	}
	if err := m.proc.wait(); err != nil {
		return err
	}
	c.mu.Lock()
	m.state = Killed
	c.mu.Unlock()
	return nil
}

// Revive starts a killed member again on its data dir and waits until it
// serves.
func (c *Cluster) Revive(id string) error {
	m, err := c.member(id)
	if err != nil {
		return err
	}
	if c.State(id) != Killed {
		return fmt.Errorf("proccluster: %s is not killed", id)
	}
	return c.start(m)
}

// Stall stops every process of member id with SIGSTOP, the member's own
// first: it neither answers nor sends, as a paused VM.
func (c *Cluster) Stall(id string) error {
	m, err := c.member(id)
	if err != nil {
		return err
	}
	if c.State(id) != Up {
		return fmt.Errorf("proccluster: %s is %s", id, c.State(id))
	}
	if _, err := signalNetns(m.netns, syscall.SIGSTOP, -m.proc.cmd.Process.Pid); err != nil {
		return err
	}
	c.mu.Lock()
	m.state = Stalled
	c.mu.Unlock()
	return nil
}

// Resume continues a stalled member with SIGCONT.
func (c *Cluster) Resume(id string) error {
	m, err := c.member(id)
	if err != nil {
		return err
	}
	if c.State(id) != Stalled {
		return fmt.Errorf("proccluster: %s is not stalled", id)
	}
	if _, err := signalNetns(m.netns, syscall.SIGCONT); err != nil {
		return err
	}
	c.mu.Lock()
	m.state = Up
	c.mu.Unlock()
	return nil
}

// expand turns names — member ids, "control", region codes (every host of
// the region) — into members.
func (c *Cluster) expand(names []string) ([]*Member, error) {
	var out []*Member
	for _, n := range names {
		found := false
		for _, m := range c.members {
			if m.ID == n || (m.ID != ControlID && m.Region == n) {
				found = true
				if !slices.Contains(out, m) {
					out = append(out, m)
				}
			}
		}
		if !found {
			return nil, fmt.Errorf("proccluster: no host or region %q", n)
		}
	}
	return out, nil
}

// Partition cuts every member of a from every member of b: each side's
// namespace drops the other's packets, both ways.
func (c *Cluster) Partition(a, b []string) error {
	as, err := c.expand(a)
	if err != nil {
		return err
	}
	bs, err := c.expand(b)
	if err != nil {
		return err
	}
	for _, m := range as {
		if slices.Contains(bs, m) {
			return fmt.Errorf("proccluster: %s is on both sides", m.ID)
		}
	}
	ips := func(ms []*Member) []net.IP {
		var out []net.IP
		for _, m := range ms {
			out = append(out, m.IP)
		}
		return out
	}
	for _, side := range [2][2][]*Member{{as, bs}, {bs, as}} {
		for _, m := range side[0] {
			if err := (firewall{m.netns}).drop(ips(side[1])); err != nil {
				return err
			}
		}
	}
	c.mu.Lock()
	for _, x := range as {
		for _, y := range bs {
			c.cut[[2]string{x.ID, y.ID}] = true
			c.cut[[2]string{y.ID, x.ID}] = true
		}
	}
	c.mu.Unlock()
	return nil
}

// Heal removes every partition.
func (c *Cluster) Heal() error {
	for _, m := range c.members {
		fw := firewall{m.netns}
		if err := fw.flush(); err != nil {
			return err
		}
		if n, err := fw.rules(); err != nil || n != 0 {
			return fmt.Errorf("proccluster: %s keeps %d rules after heal (%v)", m.ID, n, err)
		}
	}
	c.mu.Lock()
	clear(c.cut)
	c.mu.Unlock()
	return nil
}

// Rules counts the partition rules in member id's namespace.
func (c *Cluster) Rules(id string) (int, error) {
	m, err := c.member(id)
	if err != nil {
		return 0, err
	}
	return firewall{m.netns}.rules()
}

// Pids returns the processes in member id's namespace: its own and its
// machines'.
func (c *Cluster) Pids(id string) ([]int, error) {
	m, err := c.member(id)
	if err != nil {
		return nil, err
	}
	return netnsPids(m.netns)
}

// View is one host's view of the cluster: member id → status.
type View map[string]cluster.HostStatus

// ReadView asks host id (an agent that is up) for its view of the cluster.
func (c *Cluster) ReadView(ctx context.Context, id string) (View, error) {
	m, err := c.member(id)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, "GET", m.APIURL()+"/v1/cluster/hosts", nil)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: c.operator.TLS(m.ID), DisableKeepAlives: true}}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("view of %s: %w", id, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("view of %s: %s", id, resp.Status)
	}
	var hs []host.ClusterHost
	if err := json.NewDecoder(resp.Body).Decode(&hs); err != nil {
		return nil, fmt.Errorf("view of %s: %w", id, err)
	}
	v := View{}
	for _, h := range hs {
		v[h.ID] = cluster.HostStatus(h.Status)
	}
	return v, nil
}

// Expected is the view every host that is up should converge to, given the
// faults in force: a member is alive in an observer's view when it is up
// and not cut off from the observer, dead otherwise.
func (c *Cluster) Expected(observer string) View {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := View{}
	for _, m := range c.members {
		if m.state == Up && !c.cut[[2]string{observer, m.ID}] {
			v[m.ID] = cluster.StatusAlive
		} else {
			v[m.ID] = cluster.StatusDead
		}
	}
	return v
}

// Hosts returns the ids of the hosts (not the control plane) that are up.
func (c *Cluster) Hosts() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, m := range c.members[1:] {
		if m.state == Up {
			out = append(out, m.ID)
		}
	}
	return out
}

// Diff describes how the views of observers (hosts that are up; none: all
// of them) differ from what they should be, "" when they all agree.
func (c *Cluster) Diff(ctx context.Context, observers ...string) string {
	if len(observers) == 0 {
		observers = c.Hosts()
	}
	var out []string
	for _, id := range observers {
		v, err := c.ReadView(ctx, id)
		if err != nil {
			out = append(out, err.Error())
			continue
		}
		want := c.Expected(id)
		for _, o := range c.members {
			if o.ID == id {
				continue // a host is alive to itself
			}
			if got := v[o.ID]; got != want[o.ID] {
				out = append(out, fmt.Sprintf("%s sees %s %q, want %q", id, o.ID, got, want[o.ID]))
			}
		}
	}
	return strings.Join(out, "; ")
}

// WaitViews waits until the views of observers (hosts that are up; none:
// all of them) are as Expected, and returns the last difference when ctx
// ends first.
func (c *Cluster) WaitViews(ctx context.Context, observers ...string) error {
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		d := c.Diff(rctx, observers...)
		cancel()
		if d == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("views differ: %s", d)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
