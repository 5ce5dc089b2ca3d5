package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/api"
)

// limits are what a machine's cgroup enforces.
type limits struct {
	memoryBytes int64
	cpuQuotaUs  int64 // per cpuPeriodUs
	cpuPeriodUs int64
	cpuShares   uint64 // cgroup v1 scale: 1024 is one "performance" core
	pids        int64
}

const (
	cpuPeriodUs = 100_000
	// sharesPerCPU is the weight of one shared vCPU: 1/16 of the weight
	// of a full core (1024), as Fly's shared vCPUs guarantee 1/16 core.
	sharesPerCPU = 1024 / 16
	// pidsLimit caps the tasks (processes and threads) of a machine.
	pidsLimit = 4096
	// defaultMemoryMB is the default guest's memory.
	defaultMemoryMB = api.DefaultGuestMemoryMB
)

// limitsFor maps a guest size to cgroup limits (see the package doc).
func limitsFor(memoryMB, cpus int) limits {
	if memoryMB <= 0 {
		memoryMB = defaultMemoryMB
	}
	if cpus <= 0 {
		cpus = api.DefaultGuestCPUs
	}
	return limits{
		memoryBytes: int64(memoryMB) << 20,
		cpuQuotaUs:  int64(cpus) * cpuPeriodUs,
		cpuPeriodUs: cpuPeriodUs,
		cpuShares:   uint64(cpus) * sharesPerCPU,
		pids:        pidsLimit,
	}
}

// cpuWeight converts v1 shares to a v2 cpu.weight (1..10000), the same
// mapping container runtimes use.
func cpuWeight(shares uint64) uint64 {
	if shares < 2 {
		shares = 2
	}
	return 1 + ((shares-2)*9999)/262142
}

// cgroups puts machines in cgroups under one parent, on cgroup v2 (one
// unified hierarchy) or v1 (one hierarchy per controller).
type cgroups struct {
	v2 bool
	// bare is a v2 hierarchy without controllers: cgroups hold processes
	// and enforce no limit. Only tests use it, to run the v2 paths on a
	// host whose v2 hierarchy has no controllers (its v1 ones have them).
	bare bool
	// roots are the parent directories of the machines' cgroups: one for
	// v2; memory, cpu and pids (in that order) for v1.
	roots []string
	// mounts are the v1 hierarchies' mount points, in the order of roots.
	mounts []string
}

// detectCgroups finds the hierarchies to use from /proc/self/mountinfo:
// cgroup v2 when its root offers the memory, cpu and pids controllers,
// else cgroup v1 with those three mounted.
func detectCgroups(parent string) (*cgroups, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("detect cgroups: %w", err)
	}
	v1 := map[string]string{}
	var v2 string
	for line := range bytes.SplitSeq(b, []byte{'\n'}) {
		mnt, fstype, opts, ok := parseMountinfoLine(string(line))
		if !ok {
			continue
		}
		switch fstype {
		case "cgroup2":
			if v2 == "" {
				v2 = mnt
			}
		case "cgroup":
			for o := range strings.SplitSeq(opts, ",") {
				if o == "memory" || o == "cpu" || o == "pids" {
					if _, dup := v1[o]; !dup {
						v1[o] = mnt
					}
				}
			}
		}
	}
	if v2 != "" {
		ctrl, _ := os.ReadFile(filepath.Join(v2, "cgroup.controllers"))
		have := strings.Fields(string(ctrl))
		if hasAll(have, "memory", "cpu", "pids") {
			return &cgroups{v2: true, roots: []string{filepath.Join(v2, parent)}}, nil
		}
	}
	if v1["memory"] != "" && v1["cpu"] != "" && v1["pids"] != "" {
		return &cgroups{roots: []string{
			filepath.Join(v1["memory"], parent),
			filepath.Join(v1["cpu"], parent),
			filepath.Join(v1["pids"], parent),
		}, mounts: []string{v1["memory"], v1["cpu"], v1["pids"]}}, nil
	}
	return nil, errors.New("detect cgroups: neither cgroup v2 with the memory, cpu and pids controllers nor cgroup v1 hierarchies for them are mounted")
}

// parseMountinfoLine returns the mount point, file system type and super
// block options of one line of /proc/self/mountinfo.
func parseMountinfoLine(line string) (mnt, fstype, superOpts string, ok bool) {
	pre, post, found := strings.Cut(line, " - ")
	if !found {
		return "", "", "", false
	}
	f := strings.Fields(pre)
	g := strings.Fields(post)
	if len(f) < 5 || len(g) < 3 {
		return "", "", "", false
	}
	return unescapeMountinfo(f[4]), g[0], g[2], true
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hasAll(have []string, want ...string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			if h == w {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func (c *cgroups) version() int {
	if c.v2 {
		return 2
	}
	return 1
}

// dirs are the directories of the cgroup called name.
func (c *cgroups) dirs(name string) []string {
	out := make([]string, len(c.roots))
	for i, r := range c.roots {
		out[i] = filepath.Join(r, name)
	}
	return out
}

// create makes the cgroup called name with limits l. It fails if the
// cgroup exists.
func (c *cgroups) create(name string, l limits) error {
	for _, r := range c.roots {
		if err := os.Mkdir(r, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup parent: %w", err)
		}
	}
	if c.v2 && !c.bare {
		// The parent's parent (the hierarchy's root, or a delegated
		// cgroup) must hand the controllers down to the parent, and the
		// parent to the machines.
		root := c.roots[0]
		for _, d := range []string{filepath.Dir(root), root} {
			if err := writeFile(filepath.Join(d, "cgroup.subtree_control"), "+memory +cpu +pids"); err != nil {
				return fmt.Errorf("enable cgroup controllers in %s: %w", d, err)
			}
		}
	}
	for _, d := range c.dirs(name) {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
	}
	return c.setLimits(name, l)
}

// setLimits writes l to the cgroup called name.
func (c *cgroups) setLimits(name string, l limits) error {
	if c.bare {
		return nil
	}
	dirs := c.dirs(name)
	var files [][2]string
	if c.v2 {
		d := dirs[0]
		files = [][2]string{
			{filepath.Join(d, "memory.max"), strconv.FormatInt(l.memoryBytes, 10)},
			{filepath.Join(d, "memory.swap.max"), "0"},
			{filepath.Join(d, "cpu.max"), fmt.Sprintf("%d %d", l.cpuQuotaUs, l.cpuPeriodUs)},
			{filepath.Join(d, "cpu.weight"), strconv.FormatUint(cpuWeight(l.cpuShares), 10)},
			{filepath.Join(d, "pids.max"), strconv.FormatInt(l.pids, 10)},
		}
	} else {
		mem, cpu, pids := dirs[0], dirs[1], dirs[2]
		memory := [][2]string{
			{filepath.Join(mem, "memory.limit_in_bytes"), strconv.FormatInt(l.memoryBytes, 10)},
			// memory+swap: the same limit, so the machine cannot swap.
			{filepath.Join(mem, "memory.memsw.limit_in_bytes"), strconv.FormatInt(l.memoryBytes, 10)},
		}
		// The kernel keeps memsw >= memory at every write: a limit that
		// grows is raised on memsw first, one that shrinks on memory.
		if growing(filepath.Join(mem, "memory.limit_in_bytes"), l.memoryBytes) {
			memory[0], memory[1] = memory[1], memory[0]
		}
		files = append(memory, [][2]string{
			{filepath.Join(cpu, "cpu.cfs_period_us"), strconv.FormatInt(l.cpuPeriodUs, 10)},
			{filepath.Join(cpu, "cpu.cfs_quota_us"), strconv.FormatInt(l.cpuQuotaUs, 10)},
			{filepath.Join(cpu, "cpu.shares"), strconv.FormatUint(l.cpuShares, 10)},
			{filepath.Join(pids, "pids.max"), strconv.FormatInt(l.pids, 10)},
		}...)
	}
	for _, f := range files {
		err := writeFile(f[0], f[1])
		if err != nil && errors.Is(err, os.ErrNotExist) && optionalCgroupFile(f[0]) {
			continue // no swap accounting on this kernel
		}
		if err != nil {
			return fmt.Errorf("set cgroup limit %s: %w", filepath.Base(f[0]), err)
		}
	}
	return nil
}

// growing reports whether limit is above what the cgroup file at path
// holds now (a file that cannot be read: no).
func growing(path string, limit int64) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	cur, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return err == nil && limit > cur
}

func optionalCgroupFile(path string) bool {
	b := filepath.Base(path)
	return b == "memory.swap.max" || b == "memory.memsw.limit_in_bytes"
}

// openDir opens the cgroup v2 directory of name, for CLONE_INTO_CGROUP.
func (c *cgroups) openDir(name string) (*os.File, error) {
	return os.OpenFile(c.dirs(name)[0], unix.O_PATH|unix.O_DIRECTORY, 0)
}

// add moves pid into the cgroup called name. On cgroup v1 a move waits for
// an RCU grace period (milliseconds) before it returns.
func (c *cgroups) add(name string, pid int) error {
	s := strconv.Itoa(pid)
	for _, d := range c.dirs(name) {
		if err := writeFile(filepath.Join(d, "cgroup.procs"), s); err != nil {
			return fmt.Errorf("join cgroup %s: %w", d, err)
		}
	}
	return nil
}

// oomFile is the file whose "oom_kill N" line counts the OOM kills in the
// cgroup called name.
func (c *cgroups) oomFile(name string) string {
	if c.bare {
		return filepath.Join(c.dirs(name)[0], "cgroup.events") // no oom_kill line: 0
	}
	if c.v2 {
		return filepath.Join(c.dirs(name)[0], "memory.events")
	}
	return filepath.Join(c.dirs(name)[0], "memory.oom_control")
}

// cpuStat is the cgroup's cpu.stat (nr_throttled and friends).
func (c *cgroups) cpuStat(name string) string {
	if c.v2 {
		return filepath.Join(c.dirs(name)[0], "cpu.stat")
	}
	return filepath.Join(c.dirs(name)[1], "cpu.stat")
}

// exists reports whether the cgroup called name exists.
func (c *cgroups) exists(name string) bool {
	_, err := os.Stat(c.dirs(name)[0])
	return err == nil
}

// remove kills whatever still runs in the cgroup called name and removes
// it. A missing cgroup is not an error.
func (c *cgroups) remove(name string) error {
	var errs []error
	for _, d := range c.dirs(name) {
		if err := removeCgroupDir(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeCgroupDir empties d of processes and removes it. A cgroup whose last
// process has just died can stay busy for a moment, so rmdir is retried for
// up to two seconds.
func removeCgroupDir(d string) error {
	deadline := time.Now().Add(2 * time.Second)
	wait := 100 * time.Microsecond
	for {
		err := unix.Rmdir(d)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", d, err)
		}
		if b, rerr := os.ReadFile(filepath.Join(d, "cgroup.procs")); rerr == nil {
			for f := range strings.FieldsSeq(string(b)) {
				// Never this process, should one of its
				// threads be in the cgroup.
				if pid, perr := strconv.Atoi(f); perr == nil && pid > 0 && pid != os.Getpid() {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			}
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// readCounter returns the value of the line "key N" in a cgroup file.
func readCounter(b []byte, key string) (int64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// writeFile writes s to an existing file, as cgroup and proc files want:
// one write, no create, no truncate.
func writeFile(path, s string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(s)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
