package sandbox

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// handle identifies a sandbox durably by its init: host pid, start time in
// clock ticks since boot (field 22 of /proc/<pid>/stat) and the kernel's
// boot id, so that a reused pid is never mistaken for the sandbox.
type handle struct {
	pid    int
	start  uint64
	bootID string
}

func (h handle) String() string {
	return strconv.Itoa(h.pid) + ":" + strconv.FormatUint(h.start, 10) + ":" + h.bootID
}

func parseHandle(s string) (handle, error) {
	f := strings.SplitN(s, ":", 3)
	if len(f) != 3 {
		return handle{}, fmt.Errorf("bad handle %q: want pid:starttime:bootid", s)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return handle{}, fmt.Errorf("bad handle %q: bad pid", s)
	}
	start, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return handle{}, fmt.Errorf("bad handle %q: bad start time", s)
	}
	return handle{pid: pid, start: start, bootID: f[2]}, nil
}

// errNoProcess means /proc has no such pid.
var errNoProcess = errors.New("no such process")

// procStat is what the driver needs of /proc/<pid>/stat.
type procStat struct {
	state byte   // field 3
	start uint64 // field 22
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return procStat{}, errNoProcess
		}
		return procStat{}, err
	}
	return parseProcStat(b)
}

// parseProcStat decodes /proc/<pid>/stat; fields are counted from the last
// ')', as the command name may hold anything.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("parse /proc stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, errors.New("parse /proc stat: too few fields")
	}
	start, err := strconv.ParseUint(f[22-3], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("parse /proc stat: starttime: %w", err)
	}
	return procStat{state: f[0][0], start: start}, nil
}

func readBootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
