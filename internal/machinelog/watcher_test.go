package machinelog

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// inotifyInstances counts the process's open inotify descriptors.
func inotifyInstances(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.Contains(target, "anon_inode:inotify") {
			n++
		}
	}
	return n
}

func newWatcher(t *testing.T) *Watcher {
	t.Helper()
	w, err := NewWatcher()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// Many machines' logs on one host share one inotify instance: 300 Logs,
// more than the kernel's default of 128 instances per user, each in its own
// directory as machines' logs are, all follow appends through change notices
// (their polls are an hour long), and the process holds one instance.
func TestManyLogsOneWatcher(t *testing.T) {
	const n = 300
	before := inotifyInstances(t)
	w := newWatcher(t)
	root := t.TempDir()
	logs := make([]*Log, n)
	chans := make([]<-chan Line, n)
	writers := make([]*os.File, n)
	for i := range n {
		dir := filepath.Join(root, fmt.Sprintf("m%03d", i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "log")
		logs[i] = start(t, Config{Path: path, Poll: time.Hour, Watcher: w, Lines: 10})
		chans[i] = follow(t, logs[i], 0)
		writers[i] = appender(t, path)
	}
	if got := inotifyInstances(t) - before; got != 1 {
		t.Fatalf("%d logs hold %d inotify instances, want 1", n, got)
	}
	if got := w.watches(); got != n {
		t.Fatalf("watcher has %d watches, want %d", got, n)
	}
	for round := range 2 {
		t0 := time.Now()
		for i := range n {
			fmt.Fprintf(writers[i], "line %d of %d\n", round, i)
		}
		for i := range n {
			receive(t, chans[i], fmt.Sprintf("line %d of %d", round, i))
		}
		t.Logf("round %d: %d lines, one per log, reached their followers in %v", round, n, time.Since(t0))
	}

	// Logs closing take their watches with them; the instance stays.
	for _, l := range logs[:n/2] {
		l.Close()
	}
	if got := w.watches(); got != n-n/2 {
		t.Errorf("after closing half the logs: %d watches, want %d", got, n-n/2)
	}
	fmt.Fprintln(writers[n-1], "still")
	receive(t, chans[n-1], "still")
}

// Two Logs in one directory share its watch, and each is woken for its own
// file only; the watch goes when the last of them closes.
func TestWatcherSharedDirectory(t *testing.T) {
	w := newWatcher(t)
	dir := t.TempDir()
	a := start(t, Config{Path: filepath.Join(dir, "a"), Poll: time.Hour, Watcher: w})
	b := start(t, Config{Path: filepath.Join(dir, "b"), Poll: time.Hour, Watcher: w})
	if got := w.watches(); got != 1 {
		t.Fatalf("watches = %d, want 1 for one directory", got)
	}
	ca, cb := follow(t, a, 0), follow(t, b, 0)
	fmt.Fprintln(appender(t, filepath.Join(dir, "a")), "to a")
	fmt.Fprintln(appender(t, filepath.Join(dir, "b")), "to b")
	receive(t, ca, "to a")
	receive(t, cb, "to b")
	a.Close()
	if got := w.watches(); got != 1 {
		t.Fatalf("watches after one closed = %d, want 1", got)
	}
	fmt.Fprintln(appender(t, filepath.Join(dir, "b")), "again")
	receive(t, cb, "again")
	b.Close()
	if got := w.watches(); got != 0 {
		t.Fatalf("watches after both closed = %d, want 0", got)
	}
}

// A watched directory removed (the kernel drops its watch) wakes whoever
// watched it and leaves the other watches alone; a closed Watcher leaves its
// Logs polling.
func TestWatcherDirectoryRemovedAndClosed(t *testing.T) {
	w, err := NewWatcher()
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	gone := filepath.Join(root, "gone")
	os.Mkdir(gone, 0o755)
	woken := make(chan struct{}, 1)
	if _, err := w.add(filepath.Join(gone, "log"), woken); err != nil {
		t.Fatal(err)
	}
	kept := filepath.Join(root, "kept", "log")
	os.Mkdir(filepath.Dir(kept), 0o755)
	l := start(t, Config{Path: kept, Poll: 20 * time.Millisecond, Watcher: w})
	ch := follow(t, l, 0)
	if err := os.RemoveAll(gone); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the removed directory's watch dropped", func() bool { return w.watches() == 1 })
	select {
	case <-woken:
	default:
		t.Error("the removed directory's watcher was not woken")
	}
	fmt.Fprintln(appender(t, kept), "one")
	receive(t, ch, "one")

	before := inotifyInstances(t)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got := before - inotifyInstances(t); got != 1 {
		t.Errorf("Close released %d inotify instances, want 1", got)
	}
	fmt.Fprintln(appender(t, kept), "two")
	receive(t, ch, "two") // by the Log's poll
	if _, err := w.add(kept, make(chan struct{}, 1)); err == nil {
		t.Error("a closed watcher took a new watch")
	}
}

// A Log without a Watcher has one of its own, released when it closes.
func TestOwnWatcherReleased(t *testing.T) {
	before := inotifyInstances(t)
	l, err := New(Config{Path: filepath.Join(t.TempDir(), "log"), Poll: time.Hour}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := inotifyInstances(t) - before; got != 1 {
		t.Errorf("a Log of its own holds %d instances, want 1", got)
	}
	l.Close()
	if got := inotifyInstances(t) - before; got != 0 {
		t.Errorf("after Close: %d instances left, want 0", got)
	}
}
