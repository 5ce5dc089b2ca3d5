package agent

import (
	"context"
	"errors"
	"os"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/machinelog"
)

// openLog starts tailing the machine's log file, once.
func (a *Agent) openLog(m *mach) *machinelog.Log {
	m.logMu.Lock()
	defer m.logMu.Unlock()
	if m.log != nil {
		return m.log
	}
	r := m.rec.Load()
	if r.State == machine.Destroying || r.State == machine.Destroyed {
		return nil // its files are going or gone
	}
	lc := machinelog.Config{Path: a.spec(r).LogPath, Lines: a.cfg.LogLines, Watcher: a.logWatch}
	if a.cfg.OnLog != nil {
		app, id, region := r.App, r.ID, r.Region
		lc.OnLines = func(lines []machinelog.Line) {
			out := make([]api.LogEntry, len(lines))
			for i, line := range lines {
				out[i] = api.LogEntry{Timestamp: line.Time.UTC(), Message: line.Text, MachineID: id, Region: region}
			}
			a.cfg.OnLog(app, out)
		}
	}
	l, err := machinelog.New(lc, a.cfg.Logger)
	if err == nil {
		err = l.Start(a.ctx)
	}
	if err != nil {
		a.log.Warn("open machine log", "machine", r.ID, "err", err)
		return nil
	}
	m.log = l
	return l
}

func (m *mach) closeLog() {
	m.logMu.Lock()
	defer m.logMu.Unlock()
	if m.log != nil {
		m.log.Close()
		m.log = nil
	}
}

// MachineLogs sends the machine's output lines to emit: the last o.Tail of them,
// then, with o.Follow, every new one until ctx ends.
func (a *Agent) MachineLogs(ctx context.Context, ref api.MachineRef, o api.LogOptions, emit func(api.LogEntry) error) error {
	m, err := a.find(ref)
	if err != nil {
		return err
	}
	r := m.rec.Load()
	if _, err := os.Stat(a.spec(r).LogPath); err != nil && !o.Follow {
		return nil // never ran: no output yet
	}
	l := a.openLog(m)
	if l == nil {
		return api.Errorf(500, "machine %s: log unavailable", r.ID)
	}
	send := func(line machinelog.Line) error {
		return emit(api.LogEntry{Timestamp: line.Time.UTC(), Message: line.Text, MachineID: r.ID, Region: r.Region})
	}
	if !o.Follow {
		for _, line := range l.Tail(o.Tail) {
			if err := send(line); err != nil {
				return err
			}
		}
		return nil
	}
	err = l.Follow(ctx, o.Tail, send)
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	return err
}
