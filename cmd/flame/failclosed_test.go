package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The exec driver runs machines as host processes: as root, flame agent
// refuses it unless --allow-host-exec says so.
func TestAgentExecDriverNeedsOptIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("as another user the exec driver is the only one")
	}
	ctx, cancel := context.WithTimeout(context.Background(), startupTimeout)
	defer cancel()
	for _, driver := range []string{"exec"} {
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, flameBin, "agent", "--data-dir", t.TempDir(),
			"--api-addr", "127.0.0.1:0", "--driver", driver)
		cmd.Env = append(os.Environ(), "FLAME_AGENT_TOKEN=t")
		cmd.Stderr = &stderr
		err := cmd.Run()
		if err == nil || ctx.Err() != nil {
			t.Fatalf("flame agent --driver %s without --allow-host-exec: %v (stderr %q)", driver, err, stderr.String())
		}
		if !strings.Contains(stderr.String(), "--allow-host-exec") {
			t.Errorf("flame agent --driver %s: stderr %q does not say how to allow it", driver, stderr.String())
		}
	}
}

// flame dev run by a user other than root with --driver exec runs its
// machines as that user's processes, saying so, with no flag needed: that
// user is its only tenant.
func TestDevNotRootUsesExecDriverSayingSo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run flame dev as another user")
	}
	dev := startDevAsNobody(t, "--no-demo", "--driver", "exec")
	if !strings.Contains(dev.banner, "exec driver") {
		t.Errorf("banner %q does not name the exec driver", dev.banner)
	}
	if fi, err := os.Stat(dev.data); err != nil {
		t.Error(err)
	} else if fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir has mode %v, want 0700", fi.Mode().Perm())
	}
	if !strings.Contains(dev.stderr.String(), "WARNING: exec driver") {
		t.Errorf("flame dev did not say machines run unisolated; stderr:\n%s", dev.stderr.String())
	}
}

// flame dev run by a user other than root, where the kernel allows
// unprivileged user namespaces (it does on the machines the tests run on:
// a failure here is a failure), runs its machines in rootless sandboxes,
// saying so, and its edge serves the demo app from one.
func TestDevNotRootRunsRootlessSandboxes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run flame dev as another user")
	}
	dev := startDevAsNobody(t, "--regions", "ams")
	if !strings.Contains(dev.banner, "sandbox driver") {
		t.Fatalf("banner %q does not name the sandbox driver; stderr:\n%s", dev.banner, dev.stderr.String())
	}
	if !strings.Contains(dev.stderr.String(), "flame dev: rootless sandbox:") {
		t.Errorf("flame dev did not say its sandboxes are rootless; stderr:\n%s", dev.stderr.String())
	}
	edge := dev.waitLine(t, regexp.MustCompile(`Edge ams +http://<app>\.localhost:(\d+)/`))
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(startupTimeout)
	var last string
	for {
		req, _ := http.NewRequest("GET", "http://127.0.0.1:"+edge[1]+"/", nil)
		req.Host = "demo.localhost"
		resp, err := client.Do(req)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var who struct {
				Env map[string]string `json:"env"`
			}
			if resp.StatusCode == 200 && json.Unmarshal(b, &who) == nil && strings.HasPrefix(who.Env["FLY_PRIVATE_IP"], "127.") {
				t.Logf("demo app answered from %s (%s)", who.Env["FLY_MACHINE_ID"], who.Env["FLY_PRIVATE_IP"])
				break
			}
			last = resp.Status + " " + string(b)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the edge did not serve the demo app from a rootless sandbox: %s; stderr:\n%s", last, dev.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// devAsNobody is a flame dev run by uid 65534.
type devAsNobody struct {
	data   string
	banner string // the "flame dev is running" line
	lines  chan string
	stderr *lockedBuffer
}

// waitLine waits for a line of the banner's stdout matching re.
func (d *devAsNobody) waitLine(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	timeout := time.After(startupTimeout)
	for {
		select {
		case line, ok := <-d.lines:
			if !ok {
				t.Fatalf("no line matching %s; stderr:\n%s", re, d.stderr.String())
			}
			if m := re.FindStringSubmatch(line); m != nil {
				return m
			}
		case <-timeout:
			t.Fatalf("no line matching %s in time", re)
		}
	}
}

// startDevAsNobody runs flame dev (one host, loopback ports of its own,
// args added) as uid 65534 until the test ends, and waits for its banner.
func startDevAsNobody(t *testing.T, args ...string) *devAsNobody {
	t.Helper()
	const nobody = 65534
	// t.TempDir's parent is root's alone: another user reaches only a
	// directory of its own in the system's temporary directory.
	binDir, err := os.MkdirTemp("", "flame-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(binDir) })
	if err := os.Chmod(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(flameBin)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(binDir, "flame")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(binDir, "home")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(home, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	dev := &devAsNobody{data: filepath.Join(home, "data"), lines: make(chan string, 256), stderr: &lockedBuffer{}}
	cmd := exec.Command(bin, append([]string{"dev", "--data-dir", dev.data, "--regions", "ams", "--hosts-per-region", "1",
		"--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
		"--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tcp-ports="}, args...)...)
	cmd.Env = []string{"HOME=" + home, "TMPDIR=" + home, "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}, Setpgid: true}
	cmd.Stderr = dev.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case dev.lines <- sc.Text():
			default: // nobody reads that far
			}
		}
		close(dev.lines)
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		// Ctrl-C: flame dev destroys its machines; then nothing of the
		// process group is left either way.
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(startupTimeout):
			t.Errorf("flame dev as another user did not stop on SIGINT")
		}
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	})
	dev.banner = dev.waitLine(t, regexp.MustCompile(`flame dev is running.*`))[0]
	return dev
}

// lockedBuffer is a bytes.Buffer safe for a writer and a reader at once.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
