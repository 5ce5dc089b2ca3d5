package leftover

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/atomicfile"
)

// IPv6 forwarding has no switch of a network interface's own on most
// kernels: net.ipv6.conf.<if>.forwarding only makes <if> behave as a
// router's (no router advertisements taken, no router solicitations sent),
// and a packet is forwarded only while net.ipv6.conf.all.forwarding is on
// (kernels from 6.17 have conf.<if>.force_forwarding, which turns it on for
// what comes in on <if>; writing 0 to all.forwarding clears it on every
// interface). Machines reach the world and other hosts through the host's
// routing, so a Flame needs all.forwarding on, and turns it on. What it
// turns on it turns off again: the values before (all, default and each
// interface's, all of which writing all.forwarding overwrites) are kept in
// a file beside the records while Flames hold it, and written back when
// the last record holding it goes (closed, or swept once its owner died).
// A switch that was already on when the first Flame came is the host's:
// never turned off. A host that takes its own IPv6 route from router
// advertisements while forwarding needs accept_ra 2 on that interface.

// forwardingPath is the switch of the calling thread's network namespace.
const forwardingPath = "/proc/sys/net/ipv6/conf/all/forwarding"

// forwardingLock serializes every hold and release of the switch.
const forwardingLock = ".forwarding.lock"

// before is what the switches were before a Flame turned forwarding on.
type before struct {
	All     string            `json:"all"`
	Default string            `json:"default"`
	Ifaces  map[string]string `json:"ifaces"` // interface → its forwarding then
}

func prevFile(dir, netns string) string {
	return filepath.Join(dir, "forwarding-"+strings.ReplaceAll(netns, ":", "-")+".prev")
}

// Forwarding turns the host's IPv6 forwarding on for the record's owner,
// for as long as the record lives (see above); log (nil: none) hears of it
// when it was off.
func (r *Record) Forwarding(log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	netns, err := Netns()
	if err != nil {
		return err
	}
	if netns != r.st.Netns {
		return fmt.Errorf("ipv6 forwarding: the record is of network namespace %s, not %s", r.st.Netns, netns)
	}
	// Held first: a release meanwhile sees this record and leaves the
	// switch on.
	if err := r.Add(Thing{Kind: KindForward}); err != nil {
		return err
	}
	unlock, err := lockForwarding(r.dir)
	if err != nil {
		return err
	}
	defer unlock()
	cur, err := readSysctl(forwardingPath)
	if err != nil {
		return fmt.Errorf("ipv6 forwarding: %w", err)
	}
	if cur == "1" {
		return nil // on: the host's, or another Flame's (whose file says what it was)
	}
	// Off: what a file of an earlier hold says is stale (the switch was
	// turned off since, or the file is of a namespace gone whose number
	// this one reuses).
	b, err := json.Marshal(snapshotForwarding())
	if err != nil {
		return err
	}
	if err := atomicfile.Write(prevFile(r.dir, netns), b, ""); err != nil {
		return fmt.Errorf("ipv6 forwarding: keep the values before: %w", err)
	}
	if err := os.WriteFile(forwardingPath, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("ipv6 forwarding: %w", err)
	}
	log.Info("IPv6 forwarding switched on (it was off): machines reach the world and other hosts through this host; switched off again when the last Flame here closes")
	return nil
}

// snapshotForwarding reads every forwarding switch of the calling thread's
// network namespace.
func snapshotForwarding() before {
	b := before{Ifaces: map[string]string{}}
	b.All, _ = readSysctl(forwardingPath)
	b.Default, _ = readSysctl("/proc/sys/net/ipv6/conf/default/forwarding")
	entries, _ := os.ReadDir("/proc/sys/net/ipv6/conf")
	for _, e := range entries {
		if n := e.Name(); n != "all" && n != "default" {
			if v, err := readSysctl("/proc/sys/net/ipv6/conf/" + n + "/forwarding"); err == nil {
				b.Ifaces[n] = v
			}
		}
	}
	return b
}

// releaseForwarding runs release (which removes a record holding the
// switch of netns) and, when no record left in dir holds it, restores the
// switches as they were before a Flame turned forwarding on (if one did),
// in netns: the calling thread's, or one enter (nil: none) moves it into.
// A switch of a namespace it cannot reach (a dead owner's other
// namespace) goes with its namespace: only its file is removed.
func releaseForwarding(dir, netns string, enter func() (leave func(), err error), release func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	unlock, err := lockForwarding(dir)
	if err != nil {
		return errors.Join(release(), err)
	}
	defer unlock()
	if err := release(); err != nil {
		return err
	}
	if held, err := forwardingHeld(dir, netns); err != nil || held {
		return err
	}
	prev := prevFile(dir, netns)
	b, err := os.ReadFile(prev)
	if errors.Is(err, os.ErrNotExist) {
		return nil // on before any Flame: the host's
	}
	if err != nil {
		return fmt.Errorf("ipv6 forwarding: %w", err)
	}
	if own, err := Netns(); err != nil || own != netns {
		if enter == nil {
			os.Remove(prev)
			return err
		}
		leave, err := enter()
		if err != nil {
			os.Remove(prev)
			return fmt.Errorf("ipv6 forwarding: %w", err)
		}
		defer leave()
	}
	var was before
	if err := json.Unmarshal(b, &was); err != nil {
		os.Remove(prev)
		return fmt.Errorf("ipv6 forwarding: %s: %w", prev, err)
	}
	var errs []error
	if was.All == "0" {
		// Writing all sets default and every interface alike.
		errs = append(errs, os.WriteFile(forwardingPath, []byte("0"), 0o644))
		if was.Default != "" && was.Default != "0" {
			errs = append(errs, os.WriteFile("/proc/sys/net/ipv6/conf/default/forwarding", []byte(was.Default), 0o644))
		}
		for n, v := range was.Ifaces {
			if v == "0" || strings.ContainsAny(n, "/.") {
				continue
			}
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+n+"/forwarding", []byte(v), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, os.Remove(prev))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ipv6 forwarding: restore: %w", err)
	}
	return nil
}

// forwardingHeld reports whether a record in dir holds the switch of netns.
func forwardingHeld(dir, netns string) (bool, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*"+recordExt))
	if err != nil {
		return false, err
	}
	for _, p := range paths {
		st, err := readState(p)
		if err != nil {
			continue
		}
		if st.Netns != netns {
			continue
		}
		for _, t := range st.Things {
			if t.Kind == KindForward {
				return true, nil
			}
		}
	}
	return false, nil
}

func lockForwarding(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ipv6 forwarding: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, forwardingLock), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ipv6 forwarding: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ipv6 forwarding: lock: %w", err)
	}
	return func() { f.Close() }, nil
}

func readSysctl(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}
