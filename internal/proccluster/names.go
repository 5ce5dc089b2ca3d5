package proccluster

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
)

// Every name a cluster gives to something of the machine's starts with
// namePrefix, then the pid of the process that made it in base 36, padded
// to pidDigits, then a random id of the cluster: "flpc00abc3f9e".
const (
	namePrefix = "flpc"
	pidDigits  = 5 // 36^5 > 2^22, Linux's largest pid_max
	idChars    = 4
)

// netnsDir is where named network namespaces are bound (as `ip netns`).
const netnsDir = "/run/netns"

// runName returns the prefix of a new cluster's names: this process's pid
// and a random id. It is 13 characters, so that a one-character role and a
// one-character index still fit an interface name (15).
func runName() string {
	var b [idChars / 2]byte
	rand.Read(b[:])
	return pidName(os.Getpid()) + hex.EncodeToString(b[:])
}

// pidName is the prefix of every name of the run with pid.
func pidName(pid int) string {
	s := strconv.FormatInt(int64(pid), 36)
	return namePrefix + strings.Repeat("0", pidDigits-len(s)) + s
}

// namePid returns the pid of the run that made something named name, and
// false for a name that is not one of this package's.
func namePid(name string) (int, bool) {
	if !strings.HasPrefix(name, namePrefix) || len(name) < len(namePrefix)+pidDigits {
		return 0, false
	}
	pid, err := strconv.ParseInt(name[len(namePrefix):len(namePrefix)+pidDigits], 36, 64)
	if err != nil || pid <= 0 {
		return 0, false
	}
	return int(pid), true
}

// alive reports whether a process with pid exists.
func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// leftover reports whether name was made by a run that is dead.
func leftover(name string) bool {
	pid, ok := namePid(name)
	return ok && !alive(pid)
}

// Sweep removes what runs that died without cleaning up left behind: their
// network namespaces (and every process still in one: the machines of
// their hosts), bridges and veths, and temporary directories. Only names of
// this package whose run's pid is dead are touched; everything of a live
// run, this one's included, stays.
func Sweep() error {
	var errs []error
	if es, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range es {
			if !leftover(e.Name()) {
				continue
			}
			p := filepath.Join(netnsDir, e.Name())
			if err := killNetns(p); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := deleteNetns(p); err != nil {
				errs = append(errs, err)
			}
		}
	} else if !os.IsNotExist(err) {
		errs = append(errs, fmt.Errorf("sweep: %w", err))
	}
	links, err := netlink.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("sweep: list links: %w", err))
	}
	for _, l := range links {
		if leftover(l.Attrs().Name) {
			if err := netlink.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
				errs = append(errs, fmt.Errorf("sweep: delete link %s: %w", l.Attrs().Name, err))
			}
		}
	}
	if es, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range es {
			if leftover(e.Name()) {
				// A sandbox host's machines outlive its namespace: their
				// cgroups and mounts go first.
				hosts, _ := os.ReadDir(filepath.Join(os.TempDir(), e.Name()))
				for _, h := range hosts {
					if h.IsDir() {
						if err := sweepSandbox(filepath.Join(os.TempDir(), e.Name(), h.Name())); err != nil {
							errs = append(errs, err)
						}
					}
				}
				if err := os.RemoveAll(filepath.Join(os.TempDir(), e.Name())); err != nil {
					errs = append(errs, fmt.Errorf("sweep: %w", err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// randRead fills b with random bytes.
func randRead(b []byte) (int, error) { return rand.Read(b) }
