package proccluster

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"sync"
	"syscall"
	"time"
)

// StartTimeout bounds the wait for the line a flame process prints once it
// serves: a process that prints nothing for this long is broken, not slow
// (a server or agent prints it within a second on a quiet machine).
const StartTimeout = 60 * time.Second

// proc is one flame process in a host's namespace: its stdout is kept
// (the lines it prints when it serves), both streams go to its log file.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it exited and its output was read

	mu    sync.Mutex
	lines []string
	more  chan struct{} // signalled on each line and at the end
	ended bool
}

// startProc starts bin with args in the namespace at path, in a process
// group of its own, killed if this process dies; its output is appended
// to logPath.
func startProc(path, bin, logPath string, args []string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = w
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = startIn(path, cmd)
	w.Close()
	if err != nil {
		r.Close()
		logf.Close()
		return nil, fmt.Errorf("start flame %s: %w", args[0], err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), more: make(chan struct{}, 1)}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(r)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			fmt.Fprintf(logf, "stdout: %s\n", sc.Text())
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
			p.signal()
		}
		io.Copy(io.Discard, r)
	}()
	go func() {
		cmd.Wait()
		// Whatever still holds the pipe (a machine the agent started
		// keeps no copy, but be sure) is in the host's namespace and is
		// killed with it; the read ends by then, or is cut short.
		select {
		case <-read:
		case <-time.After(killTimeout):
		}
		r.Close()
		logf.Close()
		p.mu.Lock()
		p.ended = true
		p.mu.Unlock()
		p.signal()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) signal() {
	select {
	case p.more <- struct{}{}:
	default:
	}
}

// waitLine waits for a line of stdout matching re and returns its groups,
// failing when the process ends or StartTimeout passes first.
func (p *proc) waitLine(re *regexp.Regexp) ([]string, error) {
	deadline := time.NewTimer(StartTimeout)
	defer deadline.Stop()
	seen := 0
	for {
		p.mu.Lock()
		lines, ended := p.lines[seen:], p.ended
		seen = len(p.lines)
		p.mu.Unlock()
		for _, l := range lines {
			if m := re.FindStringSubmatch(l); m != nil {
				return m, nil
			}
		}
		if ended {
			return nil, fmt.Errorf("flame exited (%v) without printing a line like %q", p.cmd.ProcessState, re)
		}
		select {
		case <-p.more:
		case <-deadline.C:
			return nil, fmt.Errorf("flame printed no line like %q within %v", re, StartTimeout)
		}
	}
}

// wait waits for the process to exit (it was killed), at most killTimeout.
func (p *proc) wait() error {
	select {
	case <-p.done:
		return nil
	case <-time.After(2 * killTimeout):
		return fmt.Errorf("flame %s (pid %d) still running %v after SIGKILL", p.cmd.Args[1], p.cmd.Process.Pid, 2*killTimeout)
	}
}
