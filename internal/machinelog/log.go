// Package machinelog keeps a machine's log: the workload appends its output
// to a file, and a Log tails that file into memory, serves its last lines and
// streams new ones to followers, and keeps the file from growing without
// bound.
//
// Lines already in the file when the Log starts carry the file's
// modification time; later lines carry the time the Log read them. A last
// line without its newline is held until it is completed (or grows past
// 64 KiB, which ends it).
//
// New lines are noticed through inotify on the file's directory, with a slow
// poll as a safety net, or a 50 ms poll where inotify is unavailable. A host
// shares one inotify instance (a Watcher) among all its Logs.
//
// # Rotation
//
// When the file grows past Config.MaxBytes, the Log copies it to
// "<path>.1" (replacing the previous one) and truncates it. The workload keeps
// writing through its O_APPEND descriptor, which lands at the new end of
// file. Output written between the Log's last read and the truncation, a
// window of microseconds, is lost from both files; a copy-then-truncate
// rotation cannot close it without the writer's help.
package machinelog

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"
)

// Line is one line of a machine's output.
type Line struct {
	Time time.Time
	Text string // without its newline
}

// Config configures a Log.
type Config struct {
	// Path is the log file; it is created if missing.
	Path string
	// Lines is how many lines are kept in memory (default 1000).
	Lines int
	// MaxBytes is the file size past which it is rotated (default
	// 10 MiB; negative: never).
	MaxBytes int64
	// Poll is how often the file is checked without a change notice
	// (default 1 s, or 50 ms where inotify is unavailable).
	Poll time.Duration
	// Watcher, if set, is the inotify instance that notices the file's
	// changes, shared with other Logs (a host's); nil gives the Log one of
	// its own. It must outlive the Log.
	Watcher *Watcher
	// OnLines, if set, is called with each batch of new lines as they are
	// read (the host publishes them on the event bus). It must not block.
	OnLines func([]Line)
}

// Defaults.
const (
	DefaultLines    = 1000
	DefaultMaxBytes = 10 << 20
	defaultPoll     = time.Second
	fallbackPoll    = 50 * time.Millisecond
	maxLine         = 64 << 10
)

// Validate reports a config that cannot work.
func (c Config) Validate() error {
	switch {
	case c.Path == "":
		return errors.New("machinelog: no path")
	case c.Lines < 0:
		return errors.New("machinelog: negative line count")
	case c.Poll < 0:
		return errors.New("machinelog: negative poll interval")
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.Lines == 0 {
		c.Lines = DefaultLines
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	return c
}

// Log tails one machine's log file. Its methods are safe for concurrent use.
type Log struct {
	cfg    Config
	logger *slog.Logger

	mu      sync.Mutex
	ring    []Line // line seq lives at ring[seq%len(ring)]
	first   uint64 // seq of the oldest line kept
	next    uint64 // seq of the next line
	changed chan struct{}
	closed  bool
	started bool

	tail      *tailer // owned by the goroutines once started
	stop      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// New returns a Log for cfg; Start starts tailing.
func New(cfg Config, logger *slog.Logger) (*Log, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	return &Log{
		cfg:     cfg,
		logger:  logger.With("component", "machinelog", "path", cfg.Path),
		ring:    make([]Line, cfg.Lines),
		changed: make(chan struct{}),
		stop:    make(chan struct{}),
	}, nil
}

// Tail returns the last n lines kept, oldest first; all of them when n <= 0.
func (l *Log) Tail(n int) []Line {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.linesLocked(l.startSeqLocked(n))
}

// Follow calls emit with the last n lines kept (all when n == 0, none when
// n < 0), then with every new line, in order, until ctx ends (returning
// ctx.Err()), the Log closes (nil) or emit fails (its error). No line is
// lost between the tail and the stream unless emit falls more than the
// ring's size behind, in which case the lines it missed are skipped.
func (l *Log) Follow(ctx context.Context, n int, emit func(Line) error) error {
	l.mu.Lock()
	seq := l.next
	if n >= 0 {
		seq = l.startSeqLocked(n)
	}
	l.mu.Unlock()
	for {
		l.mu.Lock()
		seq = max(seq, l.first)
		batch := l.linesLocked(seq)
		seq = l.next
		changed, closed := l.changed, l.closed
		l.mu.Unlock()
		for _, line := range batch {
			if err := emit(line); err != nil {
				return err
			}
		}
		if closed {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// startSeqLocked is the seq of the first of the last n lines (all: n <= 0).
func (l *Log) startSeqLocked(n int) uint64 {
	if n > 0 && uint64(n) < l.next-l.first {
		return l.next - uint64(n)
	}
	return l.first
}

// linesLocked copies the lines from seq on.
func (l *Log) linesLocked(seq uint64) []Line {
	if seq >= l.next {
		return nil
	}
	out := make([]Line, 0, l.next-seq)
	for s := seq; s < l.next; s++ {
		out = append(out, l.ring[s%uint64(len(l.ring))])
	}
	return out
}

// add appends lines to the ring and wakes followers.
func (l *Log) add(lines []Line) {
	if len(lines) == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	size := uint64(len(l.ring))
	for _, line := range lines {
		l.ring[l.next%size] = line
		l.next++
	}
	if l.next-l.first > size {
		l.first = l.next - size
	}
	close(l.changed)
	l.changed = make(chan struct{})
	if l.cfg.OnLines != nil {
		l.cfg.OnLines(lines)
	}
}

// markClosed ends every Follow once it has caught up.
func (l *Log) markClosed() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.changed)
		l.changed = make(chan struct{})
	}
}
