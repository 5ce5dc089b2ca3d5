package machinelog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// Watcher notices changes to log files through one inotify instance shared
// by every Log given it (Config.Watcher): a host runs one for all its
// machines, since the kernel allows each user few instances (128 by
// default) but many watches. Events are dispatched by watch descriptor and
// file name to the Logs that asked for them.
//
// NewWatcher starts it; Close stops it and waits for its goroutine. Logs
// still using it after Close fall back on their polls.
type Watcher struct {
	f  *os.File // the inotify descriptor, non-blocking, in the runtime's poller
	fd int
	wg sync.WaitGroup

	mu     sync.Mutex
	dirs   map[int32]*watchedDir // by watch descriptor
	closed bool
}

// watchedDir is one watch: a directory and the files in it that Logs follow.
type watchedDir struct {
	path string
	subs map[*subscription]struct{}
}

// subscription is one Log's interest in one file.
type subscription struct {
	wd   int32
	name string          // the file's base name
	wake chan<- struct{} // capacity 1; sent to without blocking
}

// watchMask is what a watched directory reports: a file written, created,
// moved in, closed after writing, or its metadata changed (truncation).
const watchMask = unix.IN_MODIFY | unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_CLOSE_WRITE | unix.IN_ATTRIB

// NewWatcher opens an inotify instance and starts reading it.
func NewWatcher() (*Watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify_init1: %w", err)
	}
	w := &Watcher{f: os.NewFile(uintptr(fd), "inotify"), fd: fd, dirs: map[int32]*watchedDir{}}
	w.wg.Add(1)
	go w.run()
	return w, nil
}

// Close stops the Watcher and waits for its goroutine.
func (w *Watcher) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	w.dirs = map[int32]*watchedDir{}
	w.mu.Unlock()
	err := w.f.Close() // ends run's read
	w.wg.Wait()
	return err
}

// errWatcherClosed is add's answer after Close.
var errWatcherClosed = errors.New("machinelog: watcher closed")

// add asks for a send on wake (without blocking) whenever the file at path
// may have changed. The returned function ends that.
func (w *Watcher) add(path string, wake chan<- struct{}) (remove func(), err error) {
	dir, name := filepath.Dir(path), filepath.Base(path)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil, errWatcherClosed
	}
	// The kernel answers the same descriptor for a directory already
	// watched through this instance.
	wd, err := unix.InotifyAddWatch(w.fd, dir, watchMask)
	if err != nil {
		return nil, fmt.Errorf("inotify_add_watch %s: %w", dir, err)
	}
	d := w.dirs[int32(wd)]
	if d == nil {
		d = &watchedDir{path: dir, subs: map[*subscription]struct{}{}}
		w.dirs[int32(wd)] = d
	}
	s := &subscription{wd: int32(wd), name: name, wake: wake}
	d.subs[s] = struct{}{}
	var once sync.Once
	return func() { once.Do(func() { w.remove(s) }) }, nil
}

// remove ends s, and the watch of its directory when it was the last.
func (w *Watcher) remove(s *subscription) {
	w.mu.Lock()
	defer w.mu.Unlock()
	d := w.dirs[s.wd]
	if d == nil {
		return // closed, or the directory went away
	}
	delete(d.subs, s)
	if len(d.subs) == 0 {
		delete(w.dirs, s.wd)
		// EINVAL when the kernel dropped the watch already (the
		// directory was removed): nothing to undo.
		_, _ = unix.InotifyRmWatch(w.fd, uint32(s.wd))
	}
}

// watches reports how many directories are watched.
func (w *Watcher) watches() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.dirs)
}

// run reads events until the descriptor is closed and wakes the Logs they
// concern; an overflowed queue wakes every Log.
func (w *Watcher) run() {
	defer w.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return
		}
		w.dispatch(buf[:n])
	}
}

// dispatch wakes the subscribers of a batch of events.
func (w *Watcher) dispatch(b []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for len(b) >= unix.SizeofInotifyEvent {
		wd := int32(binary.NativeEndian.Uint32(b[0:4]))
		mask := binary.NativeEndian.Uint32(b[4:8])
		nameLen := int(binary.NativeEndian.Uint32(b[12:16]))
		end := unix.SizeofInotifyEvent + nameLen
		if end > len(b) || mask&unix.IN_Q_OVERFLOW != 0 {
			w.wakeAllLocked()
			return
		}
		name := b[unix.SizeofInotifyEvent:end]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		b = b[end:]
		d := w.dirs[wd]
		if d == nil {
			continue
		}
		if mask&unix.IN_IGNORED != 0 {
			// The kernel dropped the watch (its directory is gone):
			// wake its Logs, which go on polling.
			delete(w.dirs, wd)
			for s := range d.subs {
				wake(s.wake)
			}
			continue
		}
		for s := range d.subs {
			if s.name == string(name) {
				wake(s.wake)
			}
		}
	}
}

func (w *Watcher) wakeAllLocked() {
	for _, d := range w.dirs {
		for s := range d.subs {
			wake(s.wake)
		}
	}
}

func wake(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
