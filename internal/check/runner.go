package check

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"
)

// maxFirstDelay bounds the random delay before a check's first run.
const maxFirstDelay = time.Second

// Status is the current state of one check.
type Status struct {
	Name   string
	Status string // api.CheckPassing, CheckWarning or CheckCritical
	Output string
	// UpdatedAt is when Status or Output last changed, as Fly's "last
	// updated" means.
	UpdatedAt time.Time
	Service   bool
}

// RunnerConfig is what a Runner needs.
type RunnerConfig struct {
	Specs []Spec
	// Host is the address checks dial: the machine's private IP, or
	// 127.0.0.1 for a workload on the host's loopback.
	Host string
	// Dial opens connections; nil means a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// OnChange receives every status whenever one changes. Calls never
	// overlap; changes that happen while it runs are coalesced into the
	// next call. It is not called after Close returns.
	OnChange func([]Status)
	// Now is the clock statuses and the grace period are judged by;
	// nil means time.Now. Schedules run on real timers.
	Now func() time.Time
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// Validate reports a config a Runner cannot run with.
func (c RunnerConfig) Validate() error {
	if c.Host == "" {
		return errors.New("check: runner config: no host")
	}
	names := map[string]bool{}
	for _, s := range c.Specs {
		if err := s.Validate(); err != nil {
			return err
		}
		if names[s.Name] {
			return errors.New("check: two checks named " + s.Name)
		}
		names[s.Name] = true
	}
	return nil
}

// Runner runs one machine's checks from Start to Close.
type Runner struct {
	cfg     RunnerConfig
	log     *slog.Logger
	now     func() time.Time
	probers []*prober

	mu       sync.Mutex
	hist     []History
	statuses []Status
	state    int // stateNew, stateStarted, stateClosed

	notify chan struct{}
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

const (
	stateNew = iota
	stateStarted
	stateClosed
)

// New builds a runner. Every check is warning until its first result.
func New(cfg RunnerConfig) (*Runner, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	cfg.Specs = slices.Clone(cfg.Specs) // the caller may reuse its slice
	dial := cfg.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	r := &Runner{
		cfg:    cfg,
		log:    log.With("component", "check"),
		now:    now,
		notify: make(chan struct{}, 1),
	}
	t := now()
	for _, s := range cfg.Specs {
		r.probers = append(r.probers, newProber(s, cfg.Host, dial))
		r.hist = append(r.hist, History{Started: t})
		status, output := Decide(History{Started: t}, s.GracePeriod, t)
		r.statuses = append(r.statuses, Status{Name: s.Name, Status: status, Output: output, UpdatedAt: t, Service: s.Service})
	}
	return r, nil
}

// Start begins checking; the grace periods count from now. The checks stop
// when ctx ends or Close is called.
func (r *Runner) Start(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case stateStarted:
		return errors.New("check: runner already started")
	case stateClosed:
		return errors.New("check: runner closed")
	}
	r.state = stateStarted
	t := r.now()
	for i := range r.hist {
		r.hist[i].Started = t
	}
	ctx, r.cancel = context.WithCancel(ctx)
	for i := range r.probers {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.loop(ctx, i)
		}()
	}
	if r.cfg.OnChange != nil {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.notifier(ctx)
		}()
	}
	return nil
}

// Close stops every check and waits for the runner's goroutines, including
// an OnChange call in progress.
func (r *Runner) Close() error {
	r.mu.Lock()
	r.state = stateClosed
	cancel := r.cancel
	r.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	r.wg.Wait()
	for _, p := range r.probers {
		p.closeIdle()
	}
	return nil
}

// Statuses returns every check's status, in spec order.
func (r *Runner) Statuses() []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Status, len(r.statuses))
	copy(out, r.statuses)
	return out
}

// loop runs check i on its schedule, and re-judges it when its grace
// period ends.
func (r *Runner) loop(ctx context.Context, i int) {
	spec := r.cfg.Specs[i]
	first := time.Now().Add(rand.N(min(spec.Interval, maxFirstDelay)))
	timer := time.NewTimer(time.Until(first))
	defer timer.Stop()

	var graceC <-chan time.Time
	if spec.GracePeriod > 0 {
		r.mu.Lock()
		left := r.hist[i].Started.Add(spec.GracePeriod).Sub(r.now())
		r.mu.Unlock()
		g := time.NewTimer(left)
		defer g.Stop()
		graceC = g.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-graceC:
			graceC = nil
			r.update(i, nil)
		case <-timer.C:
			ok, out := r.probers[i].probe(ctx)
			if ctx.Err() != nil {
				return // stopped mid-probe: the result means nothing
			}
			r.update(i, &Result{At: r.now(), OK: ok, Output: out})
			timer.Reset(time.Until(nextRun(first, spec.Interval, time.Now())))
		}
	}
}

// update adds a result (if any) to check i's history, decides its status,
// and signals the notifier when the status or output changed.
func (r *Runner) update(i int, res *Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if res != nil {
		r.hist[i] = r.hist[i].Add(*res)
	}
	now := r.now()
	status, output := Decide(r.hist[i], r.cfg.Specs[i].GracePeriod, now)
	st := &r.statuses[i]
	if st.Status == status && st.Output == output {
		return
	}
	if st.Status != status {
		r.log.Info("check status", "check", st.Name, "from", st.Status, "to", status, "output", output)
	}
	st.Status, st.Output, st.UpdatedAt = status, output, now
	select {
	case r.notify <- struct{}{}:
	default: // a notification is already pending; it will read this change
	}
}

// notifier calls OnChange once per pending change signal, skipping a
// snapshot it already delivered (two signals can carry one change).
func (r *Runner) notifier(ctx context.Context) {
	var last []Status
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.notify:
			if ctx.Err() != nil {
				return
			}
			st := r.Statuses()
			if slices.Equal(st, last) {
				continue
			}
			last = st
			r.cfg.OnChange(st)
		}
	}
}
