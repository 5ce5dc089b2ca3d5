package exec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	osexec "os/exec"
	"sort"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// Config maps images to host programs.
type Config struct {
	// Images maps an image reference (repository[:tag]) to the argv that
	// runs it, e.g. "flame/demo": {"/usr/local/bin/flame", "demo"}.
	Images map[string][]string
}

// ErrClosed is returned for a workload the driver stopped watching when it
// was closed.
var ErrClosed = errors.New("exec driver closed")

// maxExecOutput caps what Exec keeps of each of stdout and stderr.
const maxExecOutput = 1 << 20

// Driver runs workloads as host processes. It is safe for concurrent use.
type Driver struct {
	cfg    Config
	logger *slog.Logger
	bootID string

	mu     sync.Mutex
	procs  map[*process]struct{} // watched and not yet ended
	closed bool
	wg     sync.WaitGroup
}

var _ driver.Driver = (*Driver)(nil)

// New returns a driver for cfg.
func New(cfg Config, logger *slog.Logger) *Driver {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Driver{
		cfg:    cfg,
		logger: logger.With("component", "driver/exec"),
		bootID: hostproc.BootID(),
		procs:  make(map[*process]struct{}),
	}
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return "exec" }

// Prepare checks that spec's image resolves to an executable program.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	argv, err := d.argv(spec)
	if err != nil {
		return driver.Image{}, err
	}
	return driver.Image{Ref: spec.Image + " (" + argv[0] + ")"}, nil
}

// Start starts spec's workload and returns once its program has been
// executed.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	argv, err := d.argv(spec)
	if err != nil {
		return nil, err
	}
	if spec.LogPath == "" {
		return nil, fmt.Errorf("start %s: no log path", spec.MachineID)
	}
	logf, err := os.OpenFile(spec.LogPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: open log: %w", spec.MachineID, err)
	}
	defer logf.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	defer devnull.Close()

	proc, err := os.StartProcess(argv[0], argv, &os.ProcAttr{
		Dir:   spec.Dir,
		Env:   envList(spec.Env),
		Files: []*os.File{devnull, logf, logf},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	p, err := d.watchChild(proc)
	if err != nil {
		// The child is ours and unreaped, so this is unexpected; do not
		// leave it behind.
		_ = unix.Kill(-proc.Pid, unix.SIGKILL)
		_, _ = proc.Wait()
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	d.logger.Debug("started", "machine", spec.MachineID, "pid", p.h.Pid, "argv", argv)
	return p, nil
}

// Adopt reattaches to the workload named by handle. It fails with
// driver.ErrGone unless a live process with the handle's pid, start time and
// boot id exists. With an empty handle it finds spec's workload by its
// environment's identity variables (see the package doc).
func (d *Driver) Adopt(ctx context.Context, spec driver.Spec, handle string) (driver.Process, error) {
	if handle == "" {
		return d.adoptUnrecorded(ctx, spec)
	}
	h, err := hostproc.ParseHandle(handle)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w: %w", spec.MachineID, err, driver.ErrGone)
	}
	if h.BootID != d.bootID {
		return nil, fmt.Errorf("adopt %s: handle %q is from another boot: %w", spec.MachineID, handle, driver.ErrGone)
	}
	if p := lookupChild(h); p != nil {
		return p, nil
	}
	p, err := d.watchAdopted(h)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	d.logger.Debug("adopted", "machine", spec.MachineID, "pid", p.h.Pid)
	return p, nil
}

// Exec runs command with spec's environment in spec's directory. A command
// that runs and fails is a result with its exit code, not an error; one that
// cannot be found exits 127, one that cannot be executed 126, and one killed
// by a signal 128+signal. The error is for a bad request or an expired ctx.
func (d *Driver) Exec(ctx context.Context, spec driver.Spec, command []string, stdin []byte) (driver.ExecResult, error) {
	if len(command) == 0 {
		return driver.ExecResult{}, fmt.Errorf("exec %s: empty command", spec.MachineID)
	}
	path, err := lookPath(command[0], spec)
	if err != nil {
		return driver.ExecResult{
			ExitCode: 127,
			Stderr:   fmt.Appendf(nil, "%s: %v\n", command[0], err),
		}, nil
	}
	var stdout, stderr cappedBuffer
	cmd := osexec.CommandContext(ctx, path)
	cmd.Args = command
	cmd.Env = envList(spec.Env)
	cmd.Dir = spec.Dir
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = time.Second
	err = cmd.Run()
	return hostproc.ExecResult(ctx, spec.MachineID, cmd, err, stdout.Bytes(), stderr.Bytes())
}

// Cleanup has nothing to remove: the exec driver leaves no files of its own
// (the log file and the machine's directory belong to the agent).
func (d *Driver) Cleanup(ctx context.Context, spec driver.Spec) error { return nil }

// Close stops watching every workload, as if the agent had died: the
// workloads keep running, and their Done channels never close. Adopt, from
// this or another driver, finds them again. Close waits for the driver's
// goroutines.
func (d *Driver) Close() error {
	d.mu.Lock()
	d.closed = true
	ps := make([]*process, 0, len(d.procs))
	for p := range d.procs {
		ps = append(ps, p)
	}
	d.mu.Unlock()
	for _, p := range ps {
		p.abandon()
	}
	d.wg.Wait()
	return nil
}

// track registers p for Close; it fails once the driver is closed.
func (d *Driver) track(p *process) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.procs[p] = struct{}{}
	d.wg.Add(1)
	return nil
}

func (d *Driver) untrack(p *process) {
	d.mu.Lock()
	delete(d.procs, p)
	d.mu.Unlock()
}

// envList renders env as KEY=VALUE pairs in a stable order. It is never nil:
// a nil environment would make os.StartProcess pass on the agent's own.
func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// cappedBuffer keeps the first maxExecOutput bytes written to it.
type cappedBuffer struct{ buf bytes.Buffer }

func (b *cappedBuffer) Write(p []byte) (int, error) {
	if room := maxExecOutput - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *cappedBuffer) Bytes() []byte { return b.buf.Bytes() }
