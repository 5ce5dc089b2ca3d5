package exec

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// handle identifies a workload durably: see the package doc.
type handle struct {
	pid    int
	start  uint64 // clock ticks since boot
	bootID string
}

func (h handle) String() string {
	return strconv.Itoa(h.pid) + ":" + strconv.FormatUint(h.start, 10) + ":" + h.bootID
}

func parseHandle(s string) (handle, error) {
	pidStr, rest, ok1 := strings.Cut(s, ":")
	startStr, bootID, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return handle{}, fmt.Errorf("bad handle %q: want pid:starttime:bootid", s)
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid <= 0 {
		return handle{}, fmt.Errorf("bad handle %q: bad pid", s)
	}
	start, err := strconv.ParseUint(startStr, 10, 64)
	if err != nil {
		return handle{}, fmt.Errorf("bad handle %q: bad start time", s)
	}
	return handle{pid: pid, start: start, bootID: bootID}, nil
}

// procStat is what the driver needs from /proc/<pid>/stat.
type procStat struct {
	state byte   // field 3: R, S, D, Z, X, ...
	pgrp  int    // field 5
	start uint64 // field 22, clock ticks since boot
}

// errNoProcess means /proc has no such pid.
var errNoProcess = errors.New("no such process")

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, errESRCH) {
			return procStat{}, errNoProcess
		}
		return procStat{}, err
	}
	return parseProcStat(b)
}

// parseProcStat decodes the contents of /proc/<pid>/stat. The command name
// (field 2) is in parentheses and may itself hold spaces and parentheses, so
// fields are counted from the last ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("parse /proc stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3.
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, errors.New("parse /proc stat: too few fields")
	}
	pgrp, err := strconv.Atoi(f[5-3])
	if err != nil {
		return procStat{}, fmt.Errorf("parse /proc stat: pgrp: %w", err)
	}
	start, err := strconv.ParseUint(f[22-3], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("parse /proc stat: starttime: %w", err)
	}
	return procStat{state: f[0][0], pgrp: pgrp, start: start}, nil
}

// readBootID returns the kernel's boot id, or "" when it cannot be read.
func readBootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
