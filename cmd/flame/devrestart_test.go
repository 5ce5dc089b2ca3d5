package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// devBanner is what a `flame dev` start printed: its API, tokens, state
// dir and, with the sandbox driver, its instance.
type devBanner struct {
	url, token, admin, stateDir, instance string
}

var (
	reState     = regexp.MustCompile(`state in (\S+)\)`)
	reAPI       = regexp.MustCompile(`Machines API\s+(http://[0-9.:]+)`)
	reToken     = regexp.MustCompile(`^\s+Token\s+(\S+)`)
	reAdmin     = regexp.MustCompile(`^\s+Admin token\s+(\S+)`)
	reInstance  = regexp.MustCompile(`^\s+Instance\s+([0-9a-f]{8})\s`)
	reBannerEnd = regexp.MustCompile(`^The demo app runs`)
)

// readBanner reads a `flame dev`'s banner, up to the line after the hosts'
// table, within a minute (a sandbox dev builds and pushes an image first).
func readBanner(t *testing.T, p *proc) devBanner {
	t.Helper()
	var b devBanner
	deadline := time.After(90 * time.Second)
	for {
		select {
		case line := <-p.out:
			for re, dst := range map[*regexp.Regexp]*string{reState: &b.stateDir, reAPI: &b.url, reToken: &b.token, reAdmin: &b.admin, reInstance: &b.instance} {
				if m := re.FindStringSubmatch(line); m != nil {
					*dst = m[1]
				}
			}
			if reBannerEnd.MatchString(line) {
				if b.url == "" || b.token == "" {
					t.Fatalf("flame dev's banner lacks its API or token: %+v", b)
				}
				return b
			}
		case <-p.done:
			t.Fatal("flame dev exited before its banner")
		case <-deadline:
			t.Fatalf("flame dev printed no banner (so far %+v)", b)
		}
	}
}

// interrupt stops a flame command with SIGINT and waits for it to exit 0.
func interrupt(t *testing.T, p *proc) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		t.Fatal("flame did not exit on SIGINT")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("flame exit status %d", code)
	}
}

// TestDevRestartKeeps restarts `flame dev --data-dir`: the tokens it prints
// are those of the first start (kept in the data dir, owner-only), and the
// demo group the user changed stays as the user left it.
func TestDevRestartKeeps(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	args := []string{"dev", "--data-dir", dir, "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0",
		"--driver", "exec", "--allow-host-exec", "--regions", "ams,iad", "--hosts-per-region", "1"}
	p1 := startFlame(t, args...)
	first := readBanner(t, p1)
	if first.admin == "" {
		t.Fatal("the first start printed no admin token")
	}
	cl := api.NewClient(first.url, first.token)
	g, err := cl.GetGroup(ctx, "demo", "app")
	if err != nil {
		t.Fatal(err)
	}
	g.Regions = map[string]int{"ams": 2}
	if _, err := cl.PutGroup(ctx, "demo", *g); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct{ name, want string }{{"personal-token", first.token}, {"admin-token", first.admin}} {
		path := filepath.Join(dir, f.name)
		st, err := os.Stat(path)
		if err != nil {
			t.Errorf("token not kept: %v", err)
			continue
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f.name, st.Mode().Perm())
		}
		if b, _ := os.ReadFile(path); strings.TrimSpace(string(b)) != f.want {
			t.Errorf("%s holds %q, want the printed %q", f.name, b, f.want)
		}
	}
	// The demo's machines die with the test, whatever happens.
	ms, _ := cl.List(ctx, "demo", api.ListMachinesOptions{})
	for _, m := range ms {
		t.Cleanup(func() { killWorkloads(m.ID) })
	}
	interrupt(t, p1)

	p := startFlame(t, args...)
	again := readBanner(t, p)
	if again.token != first.token || again.admin != first.admin {
		t.Errorf("a restart printed tokens %q and %q, want the first start's %q and %q", again.token, again.admin, first.token, first.admin)
	}
	cl = api.NewClient(again.url, again.token)
	g, err = cl.GetGroup(ctx, "demo", "app")
	if err != nil {
		t.Fatal(err)
	}
	if len(g.Regions) != 1 || g.Regions["ams"] != 2 {
		t.Errorf("after a restart the demo group wants %v, want the user's {ams: 2}", g.Regions)
	}
	if _, err := api.NewClient(again.url, again.admin).ListApps(ctx, "personal"); err != nil {
		t.Errorf("the kept admin token: %v", err)
	}
	ms, _ = cl.List(ctx, "demo", api.ListMachinesOptions{})
	for _, m := range ms {
		t.Cleanup(func() { killWorkloads(m.ID) })
	}
	interrupt(t, p)
}
