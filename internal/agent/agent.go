// Package agent is the host agent: it owns the machines of one host, records
// every lifecycle step durably in bbolt before acting on it, runs workloads
// through a driver, applies restart policies, and resumes whatever it was
// doing after a crash. It answers the Machines API for its own machines
// (it implements api.Backend).
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/machinelog"
)

// Config configures an agent.
type Config struct {
	// DataDir holds the store and one directory per machine.
	DataDir string
	// Region is the region this host is in.
	Region string
	// Driver runs workloads.
	Driver driver.Driver
	// Logger receives the agent's logs; nil discards them.
	Logger *slog.Logger
	// Backoff spaces automatic restarts; zero means machine.DefaultBackoff.
	Backoff machine.Backoff
	// StopTimeout is how long a stop waits before SIGKILL when the machine's
	// stop_config does not say (default 5 s, Fly's kill_timeout).
	StopTimeout time.Duration
	// LogLines is how many lines of each machine's output stay in memory
	// (default 1000).
	LogLines int
	// Now is the clock (default time.Now).
	Now func() time.Time
	// OnChange, if set, is called after any machine changed (state, config,
	// checks). It must not block; calls may come from several goroutines.
	OnChange func()
	// OnEvent, if set, is called with each machine event once it is
	// recorded (the host publishes them on the event bus). It must not
	// block and must not change ev.
	OnEvent func(app, machineID string, ev *api.MachineEvent)
	// OnLog, if set, is called with each batch of new log lines of a
	// machine of app, as they are read. It must not block.
	OnLog func(app string, lines []api.LogEntry)
	// Capacity bounds what the host runs at once: a create, start or
	// update that would exceed it is refused with 503. Zero is unlimited.
	Capacity Capacity
	// DestroyedRetention is how long a destroyed machine's record stays
	// (listed with include_deleted, with its events) before it is deleted
	// (default 24 h).
	DestroyedRetention time.Duration
	// DestroyedPerApp and DestroyedPerHost bound how many destroyed
	// records stay, per app and in all; past them the oldest are deleted
	// first (defaults 20 and 200).
	DestroyedPerApp  int
	DestroyedPerHost int
	// OrgNumbers, when set, numbers the orgs of creates that come without
	// a number (no control plane) in place of this host's store: a dev
	// cluster of hosts only gives all its hosts one numbering (see
	// orgnet.go).
	OrgNumbers OrgNumbering
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Backoff == (machine.Backoff{}) {
		c.Backoff = machine.DefaultBackoff
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = 5 * time.Second
	}
	if c.LogLines == 0 {
		c.LogLines = 1000
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.DestroyedRetention == 0 {
		c.DestroyedRetention = 24 * time.Hour
	}
	if c.DestroyedPerApp == 0 {
		c.DestroyedPerApp = 20
	}
	if c.DestroyedPerHost == 0 {
		c.DestroyedPerHost = 200
	}
}

// Validate reports what is missing or wrong.
func (c *Config) Validate() error {
	switch {
	case c.DataDir == "":
		return errors.New("agent: data dir is required")
	case c.Region == "":
		return errors.New("agent: region is required")
	case c.Driver == nil:
		return errors.New("agent: driver is required")
	case c.StopTimeout < 0:
		return errors.New("agent: stop timeout must not be negative")
	case c.DestroyedRetention < 0 || c.DestroyedPerApp < 0 || c.DestroyedPerHost < 0:
		return errors.New("agent: destroyed machines' retention and bounds must not be negative")
	}
	return nil
}

// Agent owns the machines of one host.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	store *store
	// logWatch notices new output in every machine's log through one
	// inotify instance (nil where inotify is unavailable: logs poll).
	logWatch *machinelog.Watcher

	ctx    context.Context // ends when the agent closes
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the agent owns

	// capMu is held from an admission check until the admitted machine's
	// state shows it occupies its share (see admit).
	capMu sync.Mutex
	// pruneMu serializes deleting destroyed records (pruneDestroyed).
	pruneMu sync.Mutex

	mu       sync.RWMutex
	machines map[string]*mach
	started  bool
	closed   bool
}

// mach is the live side of one machine.
type mach struct {
	// opMu serializes operations on the machine. Readers never take it: they
	// read rec, the last stored record, which is never mutated.
	opMu sync.Mutex
	rec  atomic.Pointer[record]

	// Under opMu:
	proc    driver.Process // the running workload, if any
	oldProc driver.Process // the workload of a version being replaced
	gen     uint64         // bumped on every start; restart timers check it

	changeMu sync.Mutex
	changed  chan struct{} // closed and replaced on every change

	logMu sync.Mutex
	log   *machinelog.Log // opened when the machine first starts

	// checks runs the health checks while the machine is started; written
	// under opMu, read by views without it.
	checks atomic.Pointer[machineChecks]
}

func newMach(r *record) *mach {
	m := &mach{changed: make(chan struct{})}
	m.rec.Store(r)
	return m
}

// publish makes r the machine's visible state and wakes waiters.
func (m *mach) publish(r *record) {
	m.rec.Store(r)
	m.changeMu.Lock()
	close(m.changed)
	m.changed = make(chan struct{})
	m.changeMu.Unlock()
}

// watch returns the current record and a channel closed on the next change.
func (m *mach) watch() (*record, <-chan struct{}) {
	m.changeMu.Lock()
	defer m.changeMu.Unlock()
	return m.rec.Load(), m.changed
}

// New opens the agent's store. Call Start to resume its machines.
func New(cfg Config) (*Agent, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "machines"), 0o700); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	st, err := openStore(filepath.Join(cfg.DataDir, "agent.db"))
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	log := cfg.Logger.With("component", "agent")
	lw, err := machinelog.NewWatcher()
	if err != nil {
		log.Warn("machine logs will be polled", "err", err)
		lw = nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Agent{
		cfg:      cfg,
		log:      log,
		store:    st,
		logWatch: lw,
		ctx:      ctx,
		cancel:   cancel,
		machines: map[string]*mach{},
	}, nil
}

// Start loads every machine from the store and returns: the API answers at
// once, each machine as its record stands. Meanwhile every machine resumes
// on its own goroutine, under its own lock, taken here before any call can
// take it: workloads that still run are re-adopted, ones that died meanwhile
// go through their restart policy, and operations cut short are finished (a
// stop by the deadline it recorded). Readers see the recorded state until a
// machine has resumed; an operation on it waits until then.
func (a *Agent) Start(ctx context.Context) error {
	recs, err := a.store.all()
	if err != nil {
		return fmt.Errorf("agent: load machines: %w", err)
	}
	// Destroyed records past their bounds go before anything reads them.
	if gone := expiredDestroyed(recs, a.now(), a.cfg.DestroyedRetention, a.cfg.DestroyedPerApp, a.cfg.DestroyedPerHost); len(gone) > 0 {
		if err := a.store.delete(gone); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		drop := make(map[string]bool, len(gone))
		for _, id := range gone {
			drop[id] = true
		}
		recs = slices.DeleteFunc(recs, func(r *record) bool { return drop[r.ID] })
	}
	a.mu.Lock()
	if a.started || a.closed {
		a.mu.Unlock()
		return errors.New("agent: already started")
	}
	a.started = true
	for _, r := range recs {
		if r.OrgNet == 0 {
			// Recorded before machines had an org's network: numbered
			// here, as a host without a control plane does.
			if r.OrgNet, err = a.orgOf(r.Org, 0); err != nil {
				a.mu.Unlock()
				return fmt.Errorf("agent: %w", err)
			}
		}
		m := newMach(r)
		m.opMu.Lock() // released by the machine's resume
		a.machines[r.ID] = m
		// Spawned under a.mu, so a Close that follows waits for it.
		a.goOwned(func() {
			defer m.opMu.Unlock()
			if err := a.resumeLocked(m); err != nil {
				a.log.Error("resume machine", "machine", r.ID, "state", r.State, "err", err)
			}
		})
	}
	a.mu.Unlock()
	a.log.Info("agent started", "region", a.cfg.Region, "machines", len(recs), "driver", a.cfg.Driver.Name())
	return nil
}

// Close stops the agent's own goroutines and closes its store. Workloads keep
// running: a new agent on the same data dir adopts them. Use StopAll first to
// stop them too.
func (a *Agent) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	a.mu.Unlock()
	a.cancel()
	a.stopChecks()
	a.wg.Wait()
	for _, m := range a.all() {
		m.closeLog()
	}
	if a.logWatch != nil {
		a.logWatch.Close()
	}
	return a.store.close()
}

// StopAll stops every running machine the way a user stop does, in parallel,
// and waits for them.
func (a *Agent) StopAll(ctx context.Context) {
	a.mu.RLock()
	closed := a.closed
	a.mu.RUnlock()
	if closed {
		return
	}
	var wg sync.WaitGroup
	for _, m := range a.all() {
		switch m.rec.Load().State {
		case machine.Started, machine.Restarting, machine.Starting:
		default:
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.stop(m, "", 0, sourceFlyd); err != nil && !errors.Is(err, machine.ErrIllegalTransition) {
				a.log.Warn("stop machine", "machine", m.rec.Load().ID, "err", err)
			}
		}()
	}
	wg.Wait()
}

// DestroyAll destroys every machine of the host, running or not, in
// parallel: for a host whose state is going away with it.
func (a *Agent) DestroyAll(ctx context.Context) {
	var wg sync.WaitGroup
	for _, m := range a.all() {
		if m.rec.Load().State == machine.Destroyed {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.opMu.Lock()
			defer m.opMu.Unlock()
			if err := a.destroyLocked(m, true, sourceFlyd); err != nil {
				a.log.Warn("destroy machine", "machine", m.rec.Load().ID, "err", err)
			}
		}()
	}
	wg.Wait()
}

func (a *Agent) lookup(id string) *mach {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.machines[id]
}

func (a *Agent) all() []*mach {
	a.mu.RLock()
	defer a.mu.RUnlock()
	out := make([]*mach, 0, len(a.machines))
	for _, m := range a.machines {
		out = append(out, m)
	}
	slices.SortFunc(out, func(x, y *mach) int {
		rx, ry := x.rec.Load(), y.rec.Load()
		if c := rx.CreatedAt.Compare(ry.CreatedAt); c != 0 {
			return c
		}
		if rx.ID < ry.ID {
			return -1
		}
		return 1
	})
	return out
}

// goOwned runs fn on a goroutine the agent waits for in Close.
func (a *Agent) goOwned(fn func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		fn()
	}()
}

func (a *Agent) now() time.Time { return a.cfg.Now() }

func (a *Agent) machineDir(id string) string {
	return filepath.Join(a.cfg.DataDir, "machines", id)
}
