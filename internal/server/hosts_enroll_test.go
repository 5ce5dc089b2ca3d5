package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/pki"
)

// TestJoinTokens: only an admin mints join tokens; a token enrolls once,
// only the host it names, only before it expires, only with a proof of its
// secret; an enrolled id or address is not taken over with another token.
func TestJoinTokens(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	_, orgTok := orgWithApp(t, c, "acme", "shop")
	if _, err := api.NewClient(c.Plane.URL(), orgTok).CreateJoinToken(ctx, api.CreateJoinTokenInput{}); status(err) != 403 {
		t.Errorf("an org token minted a join token: %v", err)
	}
	if _, err := api.NewClient(c.Plane.URL(), "").CreateJoinToken(ctx, api.CreateJoinTokenInput{}); status(err) != 401 {
		t.Errorf("no token minted a join token: %v", err)
	}
	if _, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{TTLSeconds: 8 * 24 * 3600}); status(err) != 422 {
		t.Errorf("a join token for 8 days: %v", err)
	}
	enroll := func(tok, id, addr string) error {
		_, err := host.Enroll(ctx, host.Enrollment{DataDir: t.TempDir(), PlaneURL: c.Plane.URL(), JoinToken: tok,
			HostID: id, Region: "ams", APIAddr: addr})
		return err
	}
	bound, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{HostID: "new-1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := enroll(bound.Token, "new-2", "127.0.0.1:9"); status(err) != 403 {
		t.Errorf("a token for new-1 enrolled new-2: %v", err)
	}
	// A request changed on the way (another address) fails the proof.
	jt, _ := pki.ParseJoinToken(bound.Token)
	key, _ := pki.NewKey()
	csr, _ := pki.NewCSR(key, pki.RoleHost, "new-1")
	claim := pki.EnrollClaim{TokenID: jt.ID, HostID: "new-1", Region: "ams", APIAddr: "127.0.0.1:9", CSR: csr}
	in := api.EnrollHostInput{TokenID: jt.ID, HostID: "new-1", Region: "ams", APIAddr: "10.6.6.6:9", CSR: csr, Proof: pki.Proof(jt.Secret, claim)}
	if _, err := api.NewClient(c.Plane.URL(), "").EnrollHost(ctx, in); status(err) != 401 {
		t.Errorf("a proof for another address enrolled: %v", err)
	}
	if err := enroll(bound.Token, "new-1", "127.0.0.1:9"); err != nil {
		t.Fatalf("enroll new-1: %v", err)
	}
	if err := enroll(bound.Token, "new-1", "127.0.0.1:9"); status(err) != 401 {
		t.Errorf("a join token enrolled twice: %v", err)
	}
	// An unbound token enrolls only new ids.
	free, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{})
	if err != nil {
		t.Fatal(err)
	}
	if err := enroll(free.Token, "ams-1", "127.0.0.1:10"); status(err) != 409 {
		t.Errorf("an unbound token took ams-1: %v", err)
	}
	short, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{TTLSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // past its expiry, however slow the machine
	if err := enroll(short.Token, "new-4", "127.0.0.1:11"); status(err) != 401 {
		t.Errorf("an expired token enrolled: %v", err)
	}
	// An admin, and only an admin, gets a client certificate that calls
	// hosts as the control plane does.
	opKey, _ := pki.NewKey()
	opCSR, _ := pki.NewCSR(opKey, pki.RoleControl, "tool")
	if _, err := api.NewClient(c.Plane.URL(), orgTok).IssueClientCertificate(ctx, api.ClientCertificateInput{CSR: opCSR}); status(err) != 403 {
		t.Errorf("an org token got a client certificate: %v", err)
	}
	cc, err := c.admin.IssueClientCertificate(ctx, api.ClientCertificateInput{CSR: opCSR})
	if err != nil {
		t.Fatal(err)
	}
	op, err := pki.NewOperator(opKey, []byte(cc.Certificate), []byte(cc.CA))
	if err != nil {
		t.Fatal(err)
	}
	direct := api.NewClient(c.Hosts[0].APIURL, "")
	tr := &http.Transport{TLSClientConfig: op.TLS(c.Hosts[0].ID)}
	defer tr.CloseIdleConnections()
	direct.HTTPClient = &http.Client{Transport: tr}
	if _, err := direct.List(ctx, "shop", api.ListMachinesOptions{}); err != nil {
		t.Errorf("an operator's certificate: %v", err)
	}
	hosts, err := c.admin.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, h := range hosts {
		ids = append(ids, h.ID+"@"+h.APIAddr)
	}
	if want := []string{"ams-1@" + c.Hosts[0].Addr(), "new-1@127.0.0.1:9"}; !slices.Equal(ids, want) {
		t.Errorf("enrolled hosts %v, want %v", ids, want)
	}
}

// TestRogueMemberNeverCalled: a member that joins the gossip without
// enrolling, advertising far more room than any host, is never offered a
// machine: the control plane calls only enrolled hosts.
func TestRogueMemberNeverCalled(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	// The rogue's API: it counts whoever connects.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var dialed atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			dialed.Add(1)
			conn.Close()
		}
	}()
	if _, err := c.Net.AddHost("rogue-1"); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Net.Transport("rogue-1", 7946)
	if err != nil {
		t.Fatal(err)
	}
	// It holds the gossip key (stolen): the keyring does not keep it out,
	// its missing enrollment does.
	rogue, err := cluster.New(cluster.Config{HostID: "rogue-1", Region: "ams", Transport: tr, GossipKeys: [][]byte{c.GossipKey()},
		Capacity: cluster.Resources{CPUs: 1000, MemoryMB: 1 << 20},
		Addrs:    map[string]string{"api": ln.Addr().String()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rogue.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rogue.Close() })
	if _, err := rogue.Join([]string{c.Hosts[0].Cluster.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	if err := rogue.Publish(cluster.HostFacts{Free: cluster.Resources{CPUs: 1000, MemoryMB: 1 << 20}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the control plane to see the rogue member", 20*time.Second, func() bool {
		h := c.Plane.Cluster.Snapshot().Host("rogue-1")
		return h != nil && h.Up()
	})
	for range 6 {
		if _, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); err != nil {
			t.Fatalf("create: %v", err)
		}
	}
	total := 0
	for _, h := range c.Hosts {
		total += machinesOn(t, c, h)
	}
	if total != 6 {
		t.Errorf("the enrolled hosts run %d machines, want all 6", total)
	}
	if n := dialed.Load(); n != 0 {
		t.Errorf("the control plane connected to the rogue member %d times", n)
	}
	// Its facts, signed by no enrolled key, were never believed.
	if h := c.Plane.Cluster.Snapshot().Host("rogue-1"); h == nil || h.Version != 0 || h.Free.CPUs != 0 {
		t.Errorf("the control plane took the rogue member's facts: %+v", h)
	}
}

// machinesOn counts the machines of shop a host's own API lists.
func machinesOn(t *testing.T, c *dev, h *devcluster.Host) int {
	t.Helper()
	ms, err := c.HostClient(h).List(context.Background(), "shop", api.ListMachinesOptions{})
	if err != nil {
		t.Fatalf("list on %s: %v", h.ID, err)
	}
	return len(ms)
}

// TestStolenHostCredentialAfterRevocation: once an admin revokes a host, its
// credentials are worth nothing: the control plane refuses to call it and
// places nothing there, its certificate and key (stolen from its data dir)
// open no other host's API, its id cannot enroll again, and its old join
// token is spent.
func TestStolenHostCredentialAfterRevocation(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	victim, other := c.Hosts[0], c.Hosts[1]
	stolen, err := host.LoadIdentity(victim.DataDir())
	if err != nil || stolen == nil {
		t.Fatalf("the victim's identity: %v", err)
	}
	var onVictim *api.Machine
	for i := 0; onVictim == nil && i < 20; i++ {
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.HostClient(victim).Get(ctx, "shop", m.ID); err == nil {
			onVictim = m
		}
	}
	if onVictim == nil {
		t.Fatal("no machine landed on the victim")
	}
	if _, err := cl.Get(ctx, "shop", onVictim.ID); err != nil {
		t.Fatalf("before revocation: %v", err)
	}
	// The stolen certificate is a host's: as a client it opens no host's
	// API, before revocation or after.
	thief := func() error {
		roots := x509.NewCertPool()
		roots.AddCert(stolen.CA)
		cert := stolen.Cert
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
			Certificates: []tls.Certificate{cert}, RootCAs: roots, InsecureSkipVerify: true}}}
		defer hc.CloseIdleConnections()
		tc := api.NewClient(other.APIURL, "")
		tc.HTTPClient = hc
		_, err := tc.List(ctx, "shop", api.ListMachinesOptions{})
		return err
	}
	if err := thief(); err == nil {
		t.Fatal("a host's certificate opened another host's API")
	}
	if err := api.NewClient(c.Plane.URL(), "").RevokeHost(ctx, victim.ID); status(err) != 401 {
		t.Errorf("revoked without a token: %v", err)
	}
	if err := c.admin.RevokeHost(ctx, victim.ID); err != nil {
		t.Fatal(err)
	}
	if err := cl.Stop(ctx, "shop", onVictim.ID, api.StopMachineInput{}); status(err) != 503 || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("the control plane called a revoked host: %v", err)
	}
	if m, err := cl.Get(ctx, "shop", onVictim.ID); err != nil || m.HostStatus != "unreachable" {
		t.Errorf("a machine of a revoked host: %v %+v", err, m)
	}
	if m, err := c.HostClient(victim).Get(ctx, "shop", onVictim.ID); err != nil || m.State != api.StateStarted {
		t.Errorf("the machine was stopped on the revoked host: %v %+v", err, m)
	}
	before := machinesOn(t, c, victim)
	for range 4 {
		if _, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); err != nil {
			t.Fatalf("create after revocation: %v", err)
		}
	}
	if n := machinesOn(t, c, victim); n != before {
		t.Errorf("a revoked host was given %d machines", n-before)
	}
	if err := thief(); err == nil {
		t.Fatal("the revoked certificate opened another host's API")
	}
	// It cannot enroll again: not with a new token for its id, not with an
	// unbound one, not with the token it used.
	if _, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{HostID: victim.ID}); status(err) != 409 {
		t.Errorf("a join token minted for a revoked host: %v", err)
	}
	free, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := host.Enroll(ctx, host.Enrollment{DataDir: t.TempDir(), PlaneURL: c.Plane.URL(), JoinToken: free.Token,
		HostID: victim.ID, Region: "ams", APIAddr: "127.0.0.1:12"}); status(err) != 403 {
		t.Errorf("a revoked host enrolled again: %v", err)
	}
	hosts, err := c.admin.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		if h.ID == victim.ID && !h.Revoked {
			t.Errorf("the hosts list shows %s not revoked", h.ID)
		}
	}
}
