package exec

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"

	"github.com/flamehq/flame/internal/driver"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// adoptUnrecorded finds spec's workload without a handle from the agent
// (it died between starting the program and recording it) by looking for a
// process-group leader whose environment holds spec's identity variables.
// This is rare, so a scan of /proc is cheaper overall than recording every
// handle on Start's path.
func (d *Driver) adoptUnrecorded(ctx context.Context, spec driver.Spec) (driver.Process, error) {
	want := identity(spec.Env)
	if len(want) == 0 {
		return nil, fmt.Errorf("adopt %s: no handle and no environment to search by: %w", spec.MachineID, driver.ErrGone)
	}
	h, err := d.findByEnv(want)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	return d.Adopt(ctx, spec, h.String())
}

// identityVars make a workload's environment unique to its instance.
var identityVars = []string{"FLY_MACHINE_ID", "FLY_MACHINE_VERSION", "FLY_ALLOC_ID"}

// identity is the part of env a workload is searched by: its identity
// variables when it has any, else all of it.
func identity(env map[string]string) []string {
	var out []string
	for _, k := range identityVars {
		if v, ok := env[k]; ok {
			out = append(out, k+"="+v)
		}
	}
	if len(out) == 0 {
		out = envList(env)
	}
	return out
}

// findByEnv looks through /proc for the newest live process-group leader
// whose initial environment holds every entry of want.
func (d *Driver) findByEnv(want []string) (handle, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return handle{}, err
	}
	self := os.Getpid()
	var best handle
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		st, err := hostproc.ReadStat(pid)
		if err != nil || st.Pgrp != pid || st.State == 'Z' || st.State == 'X' {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !holdsAll(b, want) {
			continue
		}
		if best.Pid == 0 || st.Start > best.Start {
			best = handle{Pid: pid, Start: st.Start, BootID: d.bootID}
		}
	}
	if best.Pid == 0 {
		return handle{}, fmt.Errorf("no process with the machine's environment: %w", driver.ErrGone)
	}
	return best, nil
}

// holdsAll reports whether a NUL-separated environment block holds every
// KEY=VALUE of want.
func holdsAll(environ []byte, want []string) bool {
	have := make(map[string]bool)
	for kv := range bytes.SplitSeq(environ, []byte{0}) {
		if len(kv) > 0 {
			have[string(kv)] = true
		}
	}
	for _, kv := range want {
		if !have[kv] {
			return false
		}
	}
	return true
}
