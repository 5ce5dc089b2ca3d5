// Package lockfile holds machine-wide claims as lock files: an exclusive
// flock on a file made for the purpose, taken without waiting, and the file
// removed when its holder lets go, so a machine that makes many claims over
// time is not left a file per claim. Several Flames on one machine (and the
// tests) claim names, prefixes and slots this way.
package lockfile

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Take takes an exclusive flock of the file at path, made if absent,
// without waiting (unix.EWOULDBLOCK while another holds it). Holders remove
// the file when they let go (Release), so a lock taken on a file that is no
// longer the one at path is not the lock: it is taken again on the file
// there now.
func Take(path string) (*os.File, error) {
	for range 10 {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			return nil, err
		}
		held, err1 := f.Stat()
		now, err2 := os.Stat(path)
		if err1 == nil && err2 == nil && os.SameFile(held, now) {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("%s keeps being replaced", path)
}

// Release removes a lock file Take gave, then lets go of it.
func Release(f *os.File) {
	os.Remove(f.Name())
	f.Close()
}
