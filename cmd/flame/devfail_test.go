package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDevFailedStartLeavesNothing: a `flame dev` whose start fails once its
// hosts ran (here: the global entry's port is taken) exits with the reason
// and leaves none of its bridges, cgroups or spare inits behind.
func TestDevFailedStartLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	dir := t.TempDir()
	p := startFlame(t, "dev", "--data-dir", dir, "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0",
		"--edge-tls-addr", "127.0.0.1:0", "--global-addr", taken.Addr().String(), "--driver", "sandbox", "--regions", "ams,syd", "--hosts-per-region", "1", "--no-demo")
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		t.Fatal("flame dev did not exit when its global entry could not listen")
	}
	if p.cmd.ProcessState.Success() {
		t.Fatal("flame dev exited 0 after a failed start")
	}
	b, err := os.ReadFile(filepath.Join(dir, "instance-id"))
	if err != nil {
		t.Fatalf("the hosts never ran, so the test proves nothing: %v", err)
	}
	d := &sideDev{name: "the failed dev", devBanner: devBanner{instance: strings.TrimSpace(string(b))}, hosts: 2}
	for _, path := range append(d.cgroupDirs(), prefixed("/sys/class/net/", d.bridges())...) {
		if _, err := os.Stat(path); err == nil {
			t.Errorf("a failed start left %s behind", path)
		}
	}
}
