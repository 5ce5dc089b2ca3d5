package exec

import "github.com/flamehq/flame/internal/driver/hostproc"

// handle identifies a workload durably (see hostproc.Handle).
type handle = hostproc.Handle

// procStat is what the driver reads of /proc/<pid>/stat.
type procStat = hostproc.Stat

var (
	parseHandle   = hostproc.ParseHandle
	readProcStat  = hostproc.ReadStat
	parseProcStat = hostproc.ParseStat
	readBootID    = hostproc.BootID
	errNoProcess  = hostproc.ErrNoProcess
)
