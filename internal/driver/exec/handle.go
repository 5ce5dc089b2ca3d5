package exec

import "github.com/flamehq/flame/internal/driver/hostproc"

// handle identifies a workload durably (see hostproc.Handle).
type handle = hostproc.Handle
