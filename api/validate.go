package api

import (
	"fmt"
	"net/http"
	"path"
	"strconv"
	"strings"
	"syscall"
)

// signals are the signal names a config or a call may use.
var signals = map[string]syscall.Signal{
	"SIGHUP": syscall.SIGHUP, "SIGINT": syscall.SIGINT, "SIGQUIT": syscall.SIGQUIT,
	"SIGKILL": syscall.SIGKILL, "SIGUSR1": syscall.SIGUSR1, "SIGUSR2": syscall.SIGUSR2,
	"SIGTERM": syscall.SIGTERM, "SIGSTOP": syscall.SIGSTOP, "SIGCONT": syscall.SIGCONT,
	"SIGWINCH": syscall.SIGWINCH, "SIGPWR": syscall.SIGPWR, "SIGALRM": syscall.SIGALRM,
	"SIGABRT": syscall.SIGABRT, "SIGTRAP": syscall.SIGTRAP,
}

// ParseSignal reads a signal name ("SIGTERM", "term") or number ("15").
func ParseSignal(name string) (syscall.Signal, error) {
	n := strings.ToUpper(strings.TrimSpace(name))
	if i, err := strconv.Atoi(n); err == nil {
		if i < 1 || i > 31 {
			return 0, fmt.Errorf("invalid signal %q: numbers run from 1 to 31", name)
		}
		return syscall.Signal(i), nil
	}
	if !strings.HasPrefix(n, "SIG") {
		n = "SIG" + n
	}
	if s, ok := signals[n]; ok {
		return s, nil
	}
	return 0, fmt.Errorf("invalid signal %q: want a name like SIGTERM or a number", name)
}

// Validate checks a config for what the API must refuse: it returns an
// *Error with status 422 naming the first offending field.
func (c *MachineConfig) Validate() error {
	if c == nil {
		return invalid("config", "is required")
	}
	if err := CheckImageRef(c.Image); err != nil {
		return err
	}
	if err := c.validateEnv(); err != nil {
		return err
	}
	if err := ValidateMetadata("config.metadata", c.Metadata); err != nil {
		return err
	}
	if g := c.Guest; g != nil {
		switch {
		case g.CPUKind != "" && g.CPUKind != CPUKindShared && g.CPUKind != CPUKindPerformance:
			return invalid("config.guest.cpu_kind", "must be shared or performance, not %q", g.CPUKind)
		case g.CPUs < 0 || g.CPUs > 64:
			return invalid("config.guest.cpus", "must be between 1 and 64, not %d", g.CPUs)
		case g.MemoryMB < 0 || g.MemoryMB%256 != 0:
			return invalid("config.guest.memory_mb", "must be a positive multiple of 256, not %d", g.MemoryMB)
		case g.MemoryMB > 256*1024:
			return invalid("config.guest.memory_mb", "must be at most 262144, not %d", g.MemoryMB)
		case g.RootfsSizeMB < 0 || g.RootfsSizeMB > MaxGuestRootfsSizeMB:
			return invalid("config.guest.rootfs_size_mb", "must be between 1 and %d, not %d", MaxGuestRootfsSizeMB, g.RootfsSizeMB)
		}
	}
	if r := c.Restart; r != nil {
		switch r.Policy {
		case "", RestartNo, RestartOnFailure, RestartAlways:
		default:
			return invalid("config.restart.policy", "must be no, on-failure or always, not %q", r.Policy)
		}
		if r.MaxRetries < 0 {
			return invalid("config.restart.max_retries", "must not be negative")
		}
	}
	if s := c.StopConfig; s != nil {
		if s.Signal != nil {
			if _, err := ParseSignal(*s.Signal); err != nil {
				return invalid("config.stop_config.signal", "%v", err)
			}
		}
		if s.Timeout != nil {
			if err := CheckStopTimeout("config.stop_config.timeout", s.Timeout.Duration); err != nil {
				return err
			}
		}
	}
	for i, m := range c.Mounts {
		if !path.IsAbs(m.Path) {
			return invalid(fmt.Sprintf("config.mounts[%d].path", i), "must be an absolute path, not %q", m.Path)
		}
	}
	for i, f := range c.Files {
		if f == nil || !path.IsAbs(f.GuestPath) {
			return invalid(fmt.Sprintf("config.files[%d].guest_path", i), "must be an absolute path")
		}
	}
	if len(c.Services) > MaxServices {
		return limitErr("config.services", len(c.Services), MaxServices, "services")
	}
	checks := len(c.Checks)
	for i, s := range c.Services {
		if err := s.validate(fmt.Sprintf("config.services[%d]", i)); err != nil {
			return err
		}
		checks += len(s.Checks)
	}
	if checks > MaxChecks {
		return limitErr("config.checks", checks, MaxChecks, "checks (with the services' checks)")
	}
	for name, ch := range c.Checks {
		f := "config.checks." + name
		if !ValidCheckName(name) || strings.HasPrefix(name, ServiceCheckPrefix) {
			return invalid("config.checks", "has an invalid name %q: use 1 to %d letters, digits, '-', '_', '.' and ':', starting with a letter or digit and not with %q (kept for services' checks)", clipped(name), MaxNameLen, ServiceCheckPrefix)
		}
		if err := validateCheck(f, ch.Type, ch.Port, ch.Interval, ch.Timeout, ch.GracePeriod, ch.Path); err != nil {
			return err
		}
	}
	return nil
}

func (s *MachineService) validate(f string) error {
	switch s.Protocol {
	case "tcp", "udp":
	case "":
		return invalid(f+".protocol", "is required (tcp or udp)")
	default:
		return invalid(f+".protocol", "must be tcp or udp, not %q", s.Protocol)
	}
	if !validPort(s.InternalPort) {
		return invalid(f+".internal_port", "must be a port between 1 and 65535, not %d", s.InternalPort)
	}
	if s.MinMachinesRunning != nil && *s.MinMachinesRunning < 0 {
		return invalid(f+".min_machines_running", "must not be negative")
	}
	if s.MinMachinesRunning != nil && *s.MinMachinesRunning > MaxMinMachinesRunning {
		return invalid(f+".min_machines_running", "must be at most %d, not %d", MaxMinMachinesRunning, *s.MinMachinesRunning)
	}
	if len(s.Ports) > MaxPortsPerService {
		return limitErr(f+".ports", len(s.Ports), MaxPortsPerService, "ports")
	}
	for i, p := range s.Ports {
		pf := fmt.Sprintf("%s.ports[%d]", f, i)
		if len(p.Handlers) > MaxHandlersPerPort {
			return limitErr(pf+".handlers", len(p.Handlers), MaxHandlersPerPort, "handlers")
		}
		switch {
		case p.Port != nil && (p.StartPort != nil || p.EndPort != nil):
			return invalid(pf, "sets both port and start_port/end_port")
		case p.Port != nil && !validPort(*p.Port):
			return invalid(pf+".port", "must be between 1 and 65535, not %d", *p.Port)
		case p.Port == nil && (p.StartPort == nil || p.EndPort == nil):
			return invalid(pf, "needs port, or start_port and end_port")
		case p.Port == nil && (!validPort(*p.StartPort) || !validPort(*p.EndPort) || *p.StartPort > *p.EndPort):
			return invalid(pf, "has an invalid port range %d-%d", *p.StartPort, *p.EndPort)
		}
		if o := p.ProxyProtoOptions; o != nil && o.Version != "" && o.Version != ProxyProtoV1 && o.Version != ProxyProtoV2 {
			return invalid(pf+".proxy_proto_options.version", "must be v1 or v2, not %q", Clip(o.Version, 16))
		}
		for _, h := range p.Handlers {
			switch h {
			case "http", "tls", "proxy_proto", "pg_tls", "edge_http":
			default:
				return invalid(pf+".handlers", "has an unknown handler %q", h)
			}
		}
	}
	if c := s.Concurrency; c != nil {
		switch {
		case c.Type != "" && c.Type != ConcurrencyConnections && c.Type != ConcurrencyRequests:
			return invalid(f+".concurrency.type", "must be connections or requests, not %q", c.Type)
		case c.SoftLimit < 0 || c.HardLimit < 0:
			return invalid(f+".concurrency", "limits must not be negative")
		case c.SoftLimit > MaxConcurrencyLimit:
			return invalid(f+".concurrency.soft_limit", "must be at most %d, not %d", MaxConcurrencyLimit, c.SoftLimit)
		case c.HardLimit > MaxConcurrencyLimit:
			return invalid(f+".concurrency.hard_limit", "must be at most %d, not %d", MaxConcurrencyLimit, c.HardLimit)
		case c.HardLimit > 0 && c.SoftLimit > c.HardLimit:
			return invalid(f+".concurrency.soft_limit", "(%d) must not exceed hard_limit (%d)", c.SoftLimit, c.HardLimit)
		}
	}
	for i, ch := range s.Checks {
		if err := validateCheck(fmt.Sprintf("%s.checks[%d]", f, i), ch.Type, ch.Port, ch.Interval, ch.Timeout, ch.GracePeriod, ch.Path); err != nil {
			return err
		}
	}
	return nil
}

func validateCheck(f string, typ *string, port *int, interval, timeout, grace *Duration, p *string) error {
	if typ != nil && *typ != "tcp" && *typ != "http" {
		return invalid(f+".type", "must be tcp or http, not %q", *typ)
	}
	if port != nil && !validPort(*port) {
		return invalid(f+".port", "must be between 1 and 65535, not %d", *port)
	}
	for name, d := range map[string]*Duration{"interval": interval, "timeout": timeout, "grace_period": grace} {
		if d != nil && d.Duration < 0 {
			return invalid(f+"."+name, "must not be negative")
		}
	}
	if p != nil && *p != "" && !strings.HasPrefix(*p, "/") {
		return invalid(f+".path", "must start with /, not %q", *p)
	}
	return nil
}

// validateEnv bounds the environment the workload gets from the config:
// each variable, and all of them (env and every process's env) together.
func (c *MachineConfig) validateEnv() error {
	total, err := envSize("config.env", c.Env)
	if err != nil {
		return err
	}
	for i, p := range c.Processes {
		n, err := envSize(fmt.Sprintf("config.processes[%d].env", i), p.Env)
		if err != nil {
			return err
		}
		total += n
	}
	if total > MaxEnvBytes {
		return invalid("config.env", "takes %d bytes; the environment may take at most %d", total, MaxEnvBytes)
	}
	return nil
}

func validPort(p int) bool { return p >= 1 && p <= 65535 }

func invalid(field, format string, args ...any) *Error {
	return &Error{Status: http.StatusUnprocessableEntity, Message: field + " " + fmt.Sprintf(format, args...)}
}
