// Package fake is an in-memory driver for the agent's tests: workloads that
// run until the test ends them, with knobs to fail, ignore signals and count
// calls. It starts no processes, and uses no clock but timers (Stop's
// timeout), so it runs under testing/synctest.
//
// Images: an empty image, or one whose name starts with "fake/bad", fails
// Prepare and Start with driver.ErrImage. Every other image "runs", unless
// the test made Prepare fail (Driver.FailPrepare).
//
// A running workload ends when the test calls Proc.Exit, Proc.Crash or
// Proc.OOM, or when a signal reaches it: any signal but 0 ends it as killed
// by that signal, unless it ignores signals (Driver.IgnoreStop,
// Proc.IgnoreSignals), in which case only SIGKILL does.
//
// Share one *Driver between an old and a new agent to test adoption: the
// driver outlives both and keeps its workloads by handle.
package fake

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/flamehq/flame/internal/driver"
)

// BadImagePrefix starts the names of images that fail with driver.ErrImage.
const BadImagePrefix = "fake/bad"

// Counts is how many times each driver call ran for one machine, failed
// calls included.
type Counts struct {
	Prepare, Start, Adopt, Exec, Cleanup int
}

// ExecFunc answers Exec for a machine.
type ExecFunc func(command []string, stdin []byte) (driver.ExecResult, error)

// Driver is the fake driver. It is safe for concurrent use.
type Driver struct {
	mu         sync.Mutex
	next       int
	byHandle   map[string]*Proc
	byMachine  map[string][]*Proc // in start order
	failStart  map[string]error
	failPrep   error
	ignoreStop map[string]bool
	exec       map[string]ExecFunc
	counts     map[string]*Counts
	started    chan struct{} // closed and replaced on every start
}

var _ driver.Driver = (*Driver)(nil)

// New returns an empty fake driver.
func New() *Driver {
	return &Driver{
		byHandle:   make(map[string]*Proc),
		byMachine:  make(map[string][]*Proc),
		failStart:  make(map[string]error),
		ignoreStop: make(map[string]bool),
		exec:       make(map[string]ExecFunc),
		counts:     make(map[string]*Counts),
		started:    make(chan struct{}),
	}
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return "fake" }

// FailStart makes every Start of machineID fail with err from now on; a nil
// err lets it start again.
func (d *Driver) FailStart(machineID string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		delete(d.failStart, machineID)
		return
	}
	d.failStart[machineID] = err
}

// FailPrepare makes every Prepare fail with err from now on (wrap
// driver.ErrUnavailable to play a registry that is down); a nil err lets
// Prepare resolve images again.
func (d *Driver) FailPrepare(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.failPrep = err
}

// IgnoreStop makes workloads of machineID started from now on ignore every
// signal but SIGKILL, so that Stop waits out its timeout and escalates.
func (d *Driver) IgnoreStop(machineID string, ignore bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ignoreStop[machineID] = ignore
}

// SetExec makes Exec on machineID call fn. Without one, Exec succeeds and
// echoes the command line, space separated, on stdout.
func (d *Driver) SetExec(machineID string, fn ExecFunc) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.exec[machineID] = fn
}

// Counts reports how many times each call ran for machineID.
func (d *Driver) Counts(machineID string) Counts {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c := d.counts[machineID]; c != nil {
		return *c
	}
	return Counts{}
}

// Process returns the workload of machineID started last, running or not,
// or nil if none was.
func (d *Driver) Process(machineID string) *Proc {
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := d.byMachine[machineID]
	if len(ps) == 0 {
		return nil
	}
	return ps[len(ps)-1]
}

// Processes returns every workload started for machineID, oldest first.
func (d *Driver) Processes(machineID string) []*Proc {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*Proc(nil), d.byMachine[machineID]...)
}

// WaitProcess waits until machineID's latest workload is not after, and
// returns it: with a nil after, the first workload; with the current one,
// the next.
func (d *Driver) WaitProcess(ctx context.Context, machineID string, after *Proc) (*Proc, error) {
	for {
		d.mu.Lock()
		var latest *Proc
		if ps := d.byMachine[machineID]; len(ps) > 0 {
			latest = ps[len(ps)-1]
		}
		started := d.started
		d.mu.Unlock()
		if latest != nil && latest != after {
			return latest, nil
		}
		select {
		case <-started:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for a workload of %s: %w", machineID, ctx.Err())
		}
	}
}

// count returns machineID's counters; d.mu must be held.
func (d *Driver) count(machineID string) *Counts {
	c := d.counts[machineID]
	if c == nil {
		c = &Counts{}
		d.counts[machineID] = c
	}
	return c
}

func checkImage(image string) error {
	if image == "" || strings.HasPrefix(image, BadImagePrefix) {
		return fmt.Errorf("image %q: fake image that never resolves: %w", image, driver.ErrImage)
	}
	return nil
}

// Prepare implements driver.Driver.
// The digest is made up from the image name, so it is stable.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	d.mu.Lock()
	d.count(spec.MachineID).Prepare++
	failPrep := d.failPrep
	d.mu.Unlock()
	if failPrep != nil {
		return driver.Image{}, fmt.Errorf("prepare %s: %w", spec.MachineID, failPrep)
	}
	if err := checkImage(spec.Image); err != nil {
		return driver.Image{}, err
	}
	sum := sha256.Sum256([]byte(spec.Image))
	return driver.Image{Ref: spec.Image, Digest: "sha256:" + hex.EncodeToString(sum[:])}, nil
}

// Start implements driver.Driver.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Process, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.count(spec.MachineID).Start++
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	if err := checkImage(spec.Image); err != nil {
		return nil, err
	}
	if err := d.failStart[spec.MachineID]; err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	d.next++
	p := &Proc{
		handle: "fake-" + strconv.Itoa(d.next),
		pid:    100000 + d.next,
		spec:   cloneSpec(spec),
		ignore: d.ignoreStop[spec.MachineID],
		done:   make(chan struct{}),
	}
	d.byHandle[p.handle] = p
	d.byMachine[spec.MachineID] = append(d.byMachine[spec.MachineID], p)
	close(d.started)
	d.started = make(chan struct{})
	return &process{p}, nil
}

// Adopt returns the workload named by handle if it still runs, and fails
// with driver.ErrGone otherwise. With an empty handle it returns the latest
// running workload of spec's machine and instance.
func (d *Driver) Adopt(ctx context.Context, spec driver.Spec, handle string) (driver.Process, error) {
	d.mu.Lock()
	d.count(spec.MachineID).Adopt++
	p := d.byHandle[handle]
	if handle == "" {
		ps := d.byMachine[spec.MachineID]
		for i := len(ps) - 1; i >= 0; i-- {
			if ps[i].spec.InstanceID == spec.InstanceID && ps[i].Running() {
				p = ps[i]
				break
			}
		}
	}
	d.mu.Unlock()
	if p == nil {
		return nil, fmt.Errorf("adopt %s: no workload %q: %w", spec.MachineID, handle, driver.ErrGone)
	}
	if p.spec.MachineID != spec.MachineID {
		return nil, fmt.Errorf("adopt %s: workload %q belongs to machine %s", spec.MachineID, handle, p.spec.MachineID)
	}
	if !p.Running() {
		return nil, fmt.Errorf("adopt %s: workload %q ended: %w", spec.MachineID, handle, driver.ErrGone)
	}
	return &process{p}, nil
}

// Exec implements driver.Driver with the machine's ExecFunc.
func (d *Driver) Exec(ctx context.Context, spec driver.Spec, command []string, stdin []byte) (driver.ExecResult, error) {
	d.mu.Lock()
	d.count(spec.MachineID).Exec++
	fn := d.exec[spec.MachineID]
	d.mu.Unlock()
	if len(command) == 0 {
		return driver.ExecResult{}, fmt.Errorf("exec %s: empty command", spec.MachineID)
	}
	if err := ctx.Err(); err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: %w", spec.MachineID, err)
	}
	if fn == nil {
		return driver.ExecResult{Stdout: []byte(strings.Join(command, " ") + "\n")}, nil
	}
	return fn(command, stdin)
}

// Cleanup implements driver.Driver; it only counts.
func (d *Driver) Cleanup(ctx context.Context, spec driver.Spec) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.count(spec.MachineID).Cleanup++
	return nil
}

func cloneSpec(s driver.Spec) driver.Spec {
	s.Entrypoint = append([]string(nil), s.Entrypoint...)
	s.Cmd = append([]string(nil), s.Cmd...)
	env := make(map[string]string, len(s.Env))
	for k, v := range s.Env {
		env[k] = v
	}
	s.Env = env
	return s
}

// Proc is a fake workload as the test sees and controls it.
type Proc struct {
	handle string
	pid    int
	spec   driver.Spec
	done   chan struct{}

	mu      sync.Mutex
	ignore  bool
	signals []syscall.Signal
	exit    driver.Exit
	ended   bool
}

// Handle is the workload's handle, as Start's Process reports it.
func (p *Proc) Handle() string { return p.handle }

// Pid is the workload's made-up pid.
func (p *Proc) Pid() int { return p.pid }

// Spec is the spec the workload was started with.
func (p *Proc) Spec() driver.Spec { return p.spec }

// Done is closed once the workload ended.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Running reports whether the workload has not ended.
func (p *Proc) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.ended
}

// Result is how the workload ended; the zero Exit while it runs.
func (p *Proc) Result() driver.Exit {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit
}

// Signals returns every signal delivered to the workload so far, in order.
func (p *Proc) Signals() []syscall.Signal {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]syscall.Signal(nil), p.signals...)
}

// IgnoreSignals sets whether the workload ignores every signal but SIGKILL.
func (p *Proc) IgnoreSignals(ignore bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ignore = ignore
}

// Exit ends the workload with code. Ending an ended workload does nothing.
func (p *Proc) Exit(code int) { p.end(driver.Exit{Code: code}) }

// Crash ends the workload as killed by sig.
func (p *Proc) Crash(sig syscall.Signal) { p.end(driver.Exit{Code: -1, Signal: sig}) }

// OOM ends the workload as killed by the out-of-memory killer.
func (p *Proc) OOM() { p.end(driver.Exit{Code: -1, Signal: syscall.SIGKILL, OOMKilled: true}) }

func (p *Proc) end(e driver.Exit) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLocked(e)
}

func (p *Proc) endLocked(e driver.Exit) {
	if p.ended {
		return
	}
	e.At = time.Now()
	p.exit = e
	p.ended = true
	close(p.done)
}

// signal records sig and ends the workload unless it ignores sig.
func (p *Proc) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended {
		return fmt.Errorf("signal %s: %w", p.handle, os.ErrProcessDone)
	}
	if sig == 0 {
		return nil
	}
	p.signals = append(p.signals, sig)
	if sig == syscall.SIGKILL || !p.ignore {
		p.endLocked(driver.Exit{Code: -1, Signal: sig})
	}
	return nil
}

// process is the driver.Process view of a Proc that Start and Adopt return.
type process struct{ p *Proc }

var _ driver.Process = (*process)(nil)

func (v *process) Handle() string                  { return v.p.handle }
func (v *process) Pid() int                        { return v.p.pid }
func (v *process) Done() <-chan struct{}           { return v.p.done }
func (v *process) Exit() driver.Exit               { return v.p.Result() }
func (v *process) Signal(sig syscall.Signal) error { return v.p.signal(sig) }

// Stop delivers sig (SIGTERM when 0), waits up to timeout, then SIGKILL.
func (v *process) Stop(ctx context.Context, sig syscall.Signal, timeout time.Duration) (driver.Exit, error) {
	p := v.p
	select {
	case <-p.done:
		return p.Result(), nil
	default:
	}
	if sig == 0 {
		sig = syscall.SIGTERM
	}
	_ = p.signal(sig) // an error means it just ended
	t := time.NewTimer(max(timeout, 0))
	defer t.Stop()
	select {
	case <-p.done:
		return p.Result(), nil
	case <-ctx.Done():
		return driver.Exit{}, fmt.Errorf("stop %s: %w", p.handle, ctx.Err())
	case <-t.C:
	}
	_ = p.signal(syscall.SIGKILL)
	<-p.done
	return p.Result(), nil
}
