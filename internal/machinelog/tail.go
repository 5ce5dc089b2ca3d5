package machinelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
)

// tailer is the reading side of a Log, owned by its goroutine.
type tailer struct {
	path    string
	f       *os.File
	ino     uint64
	off     int64  // how far f has been read
	partial []byte // a last line not completed yet
	buf     []byte
}

// Start opens the file (creating it if missing), loads its last lines and
// starts following it until ctx ends or Close is called.
func (l *Log) Start(ctx context.Context) error {
	l.mu.Lock()
	if l.started || l.closed {
		l.mu.Unlock()
		return errors.New("machinelog: already started or closed")
	}
	l.started = true
	l.mu.Unlock()

	f, err := os.OpenFile(l.cfg.Path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open log: %w", err)
	}
	t := &tailer{path: l.cfg.Path, f: f, ino: inode(fi), buf: make([]byte, 64<<10)}
	lines, err := t.load(fi.Size(), l.cfg.Lines)
	if err != nil {
		f.Close()
		return fmt.Errorf("load log: %w", err)
	}
	mtime := fi.ModTime()
	old := make([]Line, len(lines))
	for i, text := range lines {
		old[i] = Line{Time: mtime, Text: text}
	}
	l.add(old)
	l.tail = t

	poll := l.cfg.Poll
	wake := make(chan struct{}, 1)
	unwatch, err := l.watch(wake)
	if err != nil {
		l.logger.Warn("no inotify, polling", "err", err)
		if poll == 0 {
			poll = fallbackPoll
		}
	}
	if poll == 0 {
		poll = defaultPoll
	}
	l.wg.Add(1)
	go l.run(ctx, poll, unwatch, wake)
	return nil
}

// watch asks the Config's Watcher, or one of the Log's own, to send on wake
// when the file may have changed. The returned function ends that (and
// closes the Log's own Watcher).
func (l *Log) watch(wake chan<- struct{}) (func(), error) {
	w := l.cfg.Watcher
	if w != nil {
		return w.add(l.cfg.Path, wake)
	}
	w, err := NewWatcher()
	if err != nil {
		return nil, err
	}
	remove, err := w.add(l.cfg.Path, wake)
	if err != nil {
		w.Close()
		return nil, err
	}
	return func() { remove(); w.Close() }, nil
}

// Close stops tailing, ends every Follow and waits for the Log's goroutines.
// The file stays.
func (l *Log) Close() error {
	l.closeOnce.Do(func() { close(l.stop) })
	l.wg.Wait()
	l.markClosed()
	return nil
}

// run reads whatever is new whenever woken or polled.
func (l *Log) run(ctx context.Context, poll time.Duration, unwatch func(), wake <-chan struct{}) {
	defer l.wg.Done()
	defer l.markClosed()
	defer l.tail.f.Close()
	if unwatch != nil {
		defer unwatch()
	}
	ticker := time.NewTicker(poll)
	defer ticker.Stop()
	for {
		l.step()
		select {
		case <-l.stop:
			return
		case <-ctx.Done():
			return
		case <-wake:
		case <-ticker.C:
		}
	}
}

// step reads new lines, follows a replaced file and rotates a big one.
func (l *Log) step() {
	t := l.tail
	if err := l.readNew(); err != nil {
		l.logger.Warn("read log", "err", err)
		return
	}
	fi, err := os.Stat(t.path)
	if err == nil && inode(fi) != t.ino {
		// Replaced by another file: read that one from its start.
		if f, err := os.Open(t.path); err == nil {
			if nfi, err := f.Stat(); err == nil {
				t.f.Close()
				t.f, t.ino, t.off = f, inode(nfi), 0
				fi = nfi
				if err := l.readNew(); err != nil {
					l.logger.Warn("read log", "err", err)
					return
				}
			} else {
				f.Close()
			}
		}
	}
	if err == nil && l.cfg.MaxBytes > 0 && t.off > l.cfg.MaxBytes {
		if err := l.rotate(); err != nil {
			l.logger.Warn("rotate log", "err", err)
		}
	}
}

// readNew reads f from where it was left to its end into the ring.
func (l *Log) readNew() error {
	t := l.tail
	fi, err := t.f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < t.off {
		// Truncated by someone else; start over.
		t.off = 0
	}
	var lines []Line
	for {
		n, err := t.f.ReadAt(t.buf, t.off)
		if n > 0 {
			t.off += int64(n)
			var texts []string
			texts, t.partial = split(t.partial, t.buf[:n], maxLine)
			now := time.Now()
			for _, text := range texts {
				lines = append(lines, Line{Time: now, Text: text})
			}
		}
		if err == io.EOF || n == 0 {
			break
		}
		if err != nil {
			l.add(lines)
			return err
		}
	}
	l.add(lines)
	return nil
}

// rotate copies the file to <path>.1 and truncates it.
func (l *Log) rotate() error {
	t := l.tail
	dst := t.path + ".1"
	tmp, err := os.OpenFile(dst+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	copied := int64(0)
	copyRest := func() error {
		n, err := io.Copy(tmp, io.NewSectionReader(t.f, copied, t.off-copied))
		copied += n
		return err
	}
	// Copy, catch what was written meanwhile, and again, a few rounds: a
	// writer that never pauses must not hold rotation up. The last round
	// ends right before the truncation, to keep the window short.
	for round := 0; round < 4; round++ {
		if err := copyRest(); err != nil {
			tmp.Close()
			return err
		}
		before := t.off
		if err := l.readNew(); err != nil {
			tmp.Close()
			return err
		}
		if t.off == before {
			break
		}
	}
	if err := copyRest(); err != nil {
		tmp.Close()
		return err
	}
	if err := os.Truncate(t.path, 0); err != nil {
		tmp.Close()
		return err
	}
	t.off = 0
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return err
	}
	l.logger.Debug("rotated log", "bytes", copied)
	return nil
}

// load reads the last lines of the file (of size bytes), at most n of them,
// and leaves t at its end with a trailing partial line held.
func (t *tailer) load(size int64, n int) ([]string, error) {
	window := int64(64 << 10)
	var data []byte
	for {
		start := max(0, size-window)
		data = make([]byte, size-start)
		if _, err := t.f.ReadAt(data, start); err != nil && err != io.EOF {
			return nil, err
		}
		if start > 0 {
			// The window cut its first line; drop it.
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				data = data[:0]
			} else {
				data = data[i+1:]
			}
		}
		if start == 0 || bytes.Count(data, []byte{'\n'}) >= n {
			break
		}
		window *= 4
	}
	lines, partial := split(nil, data, maxLine)
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	t.partial = partial
	t.off = size
	return lines, nil
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
