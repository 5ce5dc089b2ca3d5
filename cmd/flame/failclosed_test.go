package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
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

// flame dev run by a user other than root runs its machines as that user's
// processes, saying so, with no flag needed: that user is its only tenant.
func TestDevNotRootUsesExecDriverSayingSo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run flame dev as another user")
	}
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
	data := filepath.Join(home, "data")
	cmd := exec.Command(bin, "dev", "--data-dir", data, "--no-demo", "--regions", "ams", "--hosts-per-region", "1",
		"--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
		"--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tcp-ports=")
	cmd.Env = []string{"HOME=" + home, "TMPDIR=" + home, "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}, Setpgid: true}
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	}()
	running := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "flame dev is running") {
				running <- sc.Text()
				break
			}
		}
		close(running)
		for sc.Scan() {
		}
	}()
	select {
	case line, ok := <-running:
		if !ok {
			t.Fatalf("flame dev as another user ended before running; stderr:\n%s", stderr.String())
		}
		if !strings.Contains(line, "exec driver") {
			t.Errorf("banner %q does not name the exec driver", line)
		}
	case <-time.After(startupTimeout):
		t.Fatalf("flame dev as another user did not start; stderr:\n%s", stderr.String())
	}
	if fi, err := os.Stat(data); err != nil {
		t.Error(err)
	} else if fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir has mode %v, want 0700", fi.Mode().Perm())
	}
	if !strings.Contains(stderr.String(), "WARNING: exec driver") {
		t.Errorf("flame dev did not say machines run unisolated; stderr:\n%s", stderr.String())
	}
	cmd.Process.Signal(syscall.SIGINT)
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
