package agent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/flamehq/flame/api"
)

// processGroup lists the processes in the process group led by pgid, read
// from /proc.
func processGroup(pgid int) ([]api.ProcessStat, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	pageKB := uint64(os.Getpagesize() / 1024)
	out := []api.ProcessStat{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, ok := readStat(pid)
		if !ok || st.pgrp != pgid {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		cmd, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		cwd, _ := os.Readlink(filepath.Join(dir, "cwd"))
		out = append(out, api.ProcessStat{
			Pid:       int32(pid),
			Command:   strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '}))),
			Directory: cwd,
			CPU:       st.utime + st.stime,
			Stime:     st.stime,
			Rtime:     st.utime,
			RSS:       st.rssPages * pageKB * 1024,
		})
	}
	return out, nil
}

type procStat struct {
	pgrp         int
	utime, stime uint64
	rssPages     uint64
}

// readStat parses the fields of /proc/<pid>/stat that ps needs. The command
// name may hold spaces and parentheses, so fields are counted from the last ')'.
func readStat(pid int) (procStat, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field n is f[n-3].
	if len(f) < 22 {
		return procStat{}, false
	}
	num := func(n int) uint64 { v, _ := strconv.ParseUint(f[n-3], 10, 64); return v }
	return procStat{pgrp: int(num(5)), utime: num(14), stime: num(15), rssPages: num(24)}, true
}
