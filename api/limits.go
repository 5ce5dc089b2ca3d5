package api

import (
	"strings"
	"time"
	"unicode/utf8"
)

// Limits on what a machine's config, and the calls about a machine, may
// hold. They are one set for the whole platform: the API refuses (422,
// naming the field) anything beyond them, and the cluster's gossip
// validator checks every record against the same constants and names, so a
// config the API accepts is always one every host can publish.
const (
	// MaxNameLen bounds process group and check names (and app and org
	// names, whose rules are stricter).
	MaxNameLen = 63

	// Services and checks, as the proxy and every host's view carry them.
	MaxServices         = 16
	MaxPortsPerService  = 32
	MaxHandlersPerPort  = 8
	MaxChecks           = 32      // service checks and top-level checks together
	MaxConcurrencyLimit = 1 << 20 // soft_limit and hard_limit
	// MaxMinMachinesRunning bounds services[].min_machines_running: the
	// machines an app keeps started in its primary region.
	MaxMinMachinesRunning = 1000

	// Metadata: Fly publishes no limits; these keep a machine's record (sent
	// whole on every GET and written whole on every change) small.
	MaxMetadataKeys     = 64
	MaxMetadataKeyLen   = 64
	MaxMetadataValueLen = 1024

	// The environment (env and processes[].env): one variable, "NAME=value",
	// stays well below Linux's 128 KiB limit on one string of a new
	// program's environment, and all of them below its default 2 MiB limit
	// on arguments and environment together, leaving room for the command
	// and the app's secrets.
	MaxEnvVarBytes = 64 << 10
	MaxEnvBytes    = 512 << 10

	// An app's secrets join every machine's environment, so they are
	// bounded together as the config's env is ("NAME=value" and a NUL
	// each): with it, they stay below the kernel's 2 MiB; sealed, they
	// also fit in one catalog record (1 MiB at most).
	MaxSecrets      = 256
	MaxSecretsBytes = 512 << 10

	// MaxGroupsPerApp bounds the groups an app declares: the reconciler
	// passes over every group of every app.
	MaxGroupsPerApp = 32

	// MaxImageRefLen bounds an image reference.
	MaxImageRefLen = 512

	// MaxStopTimeout bounds stop_config.timeout and a stop's timeout: Fly's
	// kill_timeout may be at most 300 s.
	MaxStopTimeout = 5 * time.Minute

	// MaxLeaseTTL bounds a lease's ttl (lease_ttl of a create, ttl of a
	// lease), in seconds. Leases are meant to be refreshed while a deploy
	// runs (flyctl holds them for 13 s at a time), not held for days.
	MaxLeaseTTL = 3600
)

// MetadataProcessGroup is the metadata key that names a machine's process
// group (the group of fly.toml's [processes]); it must be a valid name.
const MetadataProcessGroup = "fly_process_group"

// ValidName reports whether s is a name as process groups and the cluster's
// records use them: 1 to MaxNameLen of ASCII letters, digits, '-' and '_',
// starting with a letter or digit.
func ValidName(s string) bool { return ValidWord(s, MaxNameLen, "") }

// ServiceCheckPrefix begins the name of every check of services[].checks:
// only those gate routing (the edge proxy tells them by it), so no
// top-level check may take a name that begins with it (Validate refuses
// one).
const ServiceCheckPrefix = "servicecheck-"

// ValidCheckName reports whether s may name a check: as ValidName, with
// '.' and ':' allowed after the first character.
func ValidCheckName(s string) bool { return ValidWord(s, MaxNameLen, ".:") }

// ValidWord reports whether s is 1..max characters of [A-Za-z0-9_-] and
// extra, starting with a letter or digit: the one shape of the names, ids
// and codes the API and the cluster's records carry.
func ValidWord(s string, max int, extra string) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '-' || c == '_'):
		case i > 0 && containsByte(extra, c):
		default:
			return false
		}
	}
	return true
}

func containsByte(s string, c byte) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return true
		}
	}
	return false
}

// ValidMetadataKey reports whether s may be a metadata key: 1 to
// MaxMetadataKeyLen of ASCII letters, digits, '_', '-' and '.'.
func ValidMetadataKey(s string) bool {
	if len(s) == 0 || len(s) > MaxMetadataKeyLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// ValidateMetadata checks a machine's whole metadata against the limits and
// the process group's name; field names it in the error ("config.metadata",
// or "metadata" for a write of one key).
func ValidateMetadata(field string, md map[string]string) error {
	if len(md) > MaxMetadataKeys {
		return invalid(field, "has %d keys; at most %d are allowed", len(md), MaxMetadataKeys)
	}
	for k, v := range md {
		switch {
		case !ValidMetadataKey(k):
			return invalid(field, "has an invalid key %q: use 1 to %d letters, digits, '_', '-' and '.'", clipped(k), MaxMetadataKeyLen)
		case len(v) > MaxMetadataValueLen:
			return invalid(field+"."+k, "is %d bytes; at most %d are allowed", len(v), MaxMetadataValueLen)
		case k == MetadataProcessGroup && !ValidName(v):
			return invalid(field+"."+k, "%q is not a process group name: use 1 to %d letters, digits, '-' and '_', starting with a letter or digit", clipped(v), MaxNameLen)
		}
	}
	return nil
}

// CheckStopTimeout refuses a stop timeout that is negative or above
// MaxStopTimeout, naming field.
func CheckStopTimeout(field string, d time.Duration) error {
	if d < 0 || d > MaxStopTimeout {
		return invalid(field, "must be between 0 and %s, not %s", MaxStopTimeout, d)
	}
	return nil
}

// CheckLeaseTTL refuses a lease ttl (seconds) that is negative or above
// MaxLeaseTTL, naming field.
func CheckLeaseTTL(field string, seconds int) error {
	if seconds < 0 || seconds > MaxLeaseTTL {
		return invalid(field, "must be between 0 and %d seconds, not %d", MaxLeaseTTL, seconds)
	}
	return nil
}

// Clip makes s valid UTF-8 (dropping invalid bytes) of at most max bytes,
// cut at a character boundary and ending in "…" when it was cut: the one
// way messages quote back what a client sent, and records bound a text
// they carry.
func Clip(s string, max int) string {
	s = strings.ToValidUTF8(s, "")
	if len(s) <= max {
		return s
	}
	const ellipsis = "…"
	n := max - len(ellipsis)
	if n <= 0 {
		return ellipsis[:0]
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + ellipsis
}

// clipped shortens what an error quotes back.
func clipped(s string) string { return Clip(s, 64) }

// envSize is the bytes the variables of env take in a program's
// environment ("NAME=value" and its terminating NUL each), checking each
// against MaxEnvVarBytes and its name's shape.
func envSize(field string, env map[string]string) (int, error) {
	n := 0
	for k, v := range env {
		if k == "" || len(k) > MaxEnvVarBytes {
			return 0, invalid(field, "has an invalid variable name %q", clipped(k))
		}
		for i := 0; i < len(k); i++ {
			if k[i] == '=' || k[i] == 0 {
				return 0, invalid(field, "has an invalid variable name %q", clipped(k))
			}
		}
		if strings.IndexByte(v, 0) >= 0 {
			return 0, invalid(field+"."+clipped(k), "contains a NUL byte")
		}
		size := len(k) + 1 + len(v) + 1
		if size > MaxEnvVarBytes {
			return 0, invalid(field+"."+clipped(k), "is %d bytes; a variable may take at most %d", size, MaxEnvVarBytes)
		}
		n += size
	}
	return n, nil
}

func limitErr(field string, n, max int, what string) error {
	return invalid(field, "has %d %s; at most %d are allowed", n, what, max)
}
