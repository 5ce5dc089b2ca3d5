package cluster

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"time"
	"unicode/utf8"

	"github.com/flamehq/flame/api"
	lifecycle "github.com/flamehq/flame/internal/machine"
)

// ErrInvalid marks a record, or published facts, that break the rules every
// host checks before using a record.
var ErrInvalid = errors.New("invalid record")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// maxClockSkew is how far in the future (by this host's clock) a version may
// be. Versions start from the owner's wall clock, so a version far ahead is
// a broken or hostile record that would otherwise freeze its owner's facts.
const maxClockSkew = 24 * time.Hour

// word is the one name shape of api, with the cluster's own bounds.
func word(s string, max int, extra string) bool { return api.ValidWord(s, max, extra) }

func validHostID(s string) bool    { return word(s, maxIDLen, ".") }
func validMachineID(s string) bool { return word(s, maxIDLen, "") }
func validName(s string) bool      { return api.ValidName(s) }
func validRegion(s string) bool    { return word(s, maxShortLen, "") }

// ValidRegion reports whether a region code is one a record may carry.
func ValidRegion(s string) bool { return validRegion(s) }

func validVersion(v uint64, now time.Time) bool {
	return v > 0 && v <= uint64(now.Add(maxClockSkew).UnixNano())
}

func validLoad(l float64) bool {
	return !math.IsNaN(l) && !math.IsInf(l, 0) && l >= 0 && l <= maxLoad
}

func validateResources(r Resources, what string) error {
	if r.CPUs < 0 || r.CPUs > maxCPUs || r.MemoryMB < 0 || r.MemoryMB > maxMemoryMB {
		return invalid("%s out of range", what)
	}
	return nil
}

// validateMachine checks one machine's fields.
func validateMachine(m *Machine) error {
	switch {
	case !validMachineID(m.ID):
		return invalid("machine id %q", m.ID)
	case !validName(m.App):
		return invalid("machine %s: app %q", m.ID, m.App)
	case m.Org != "" && !validName(m.Org):
		return invalid("machine %s: org %q", m.ID, m.Org)
	case !validRegion(m.Region):
		return invalid("machine %s: region %q", m.ID, m.Region)
	case !lifecycle.State(m.State).Valid():
		return invalid("machine %s: state %q", m.ID, m.State)
	case m.InstanceID != "" && !word(m.InstanceID, maxIDLen, ""):
		return invalid("machine %s: instance id %q", m.ID, m.InstanceID)
	case m.ProcessGroup != "" && !api.ValidName(m.ProcessGroup):
		return invalid("machine %s: process group %q", m.ID, m.ProcessGroup)
	case m.PrimaryRegion != "" && !validRegion(m.PrimaryRegion):
		return invalid("machine %s: primary region %q", m.ID, m.PrimaryRegion)
	case len(m.Services) > maxServices:
		return invalid("machine %s: %d services", m.ID, len(m.Services))
	case len(m.Checks) > maxChecks:
		return invalid("machine %s: %d checks", m.ID, len(m.Checks))
	case m.Load < 0 || m.Load > MaxLoad:
		return invalid("machine %s: load %d", m.ID, m.Load)
	}
	if m.PrivateIP != "" {
		if _, err := netip.ParseAddr(m.PrivateIP); err != nil {
			return invalid("machine %s: private ip %q", m.ID, m.PrivateIP)
		}
	}
	for i, s := range m.Services {
		if s.Protocol != "tcp" && s.Protocol != "udp" {
			return invalid("machine %s: service %d: protocol %q", m.ID, i, s.Protocol)
		}
		if s.InternalPort < 1 || s.InternalPort > maxPort {
			return invalid("machine %s: service %d: internal port %d", m.ID, i, s.InternalPort)
		}
		if len(s.Ports) > maxPorts {
			return invalid("machine %s: service %d: %d ports", m.ID, i, len(s.Ports))
		}
		for _, p := range s.Ports {
			single := p.Port >= 1 && p.Port <= maxPort && p.StartPort == 0 && p.EndPort == 0
			ranged := p.Port == 0 && p.StartPort >= 1 && p.StartPort <= p.EndPort && p.EndPort <= maxPort
			if !single && !ranged {
				return invalid("machine %s: service %d: port %d/%d-%d", m.ID, i, p.Port, p.StartPort, p.EndPort)
			}
			if len(p.Handlers) > maxHandlers {
				return invalid("machine %s: service %d: %d handlers", m.ID, i, len(p.Handlers))
			}
			for _, h := range p.Handlers {
				if !word(h, maxShortLen, "") {
					return invalid("machine %s: service %d: handler %q", m.ID, i, h)
				}
			}
			if p.ProxyProto != "" && p.ProxyProto != api.ProxyProtoV1 && p.ProxyProto != api.ProxyProtoV2 {
				return invalid("machine %s: service %d: PROXY protocol version %q", m.ID, i, p.ProxyProto)
			}
		}
		c := s.Concurrency
		if c.Type != "" && c.Type != api.ConcurrencyConnections && c.Type != api.ConcurrencyRequests {
			return invalid("machine %s: service %d: concurrency type %q", m.ID, i, c.Type)
		}
		if c.SoftLimit < 0 || c.HardLimit < 0 || c.SoftLimit > maxLimit || c.HardLimit > maxLimit ||
			(c.SoftLimit > 0 && c.HardLimit > 0 && c.SoftLimit > c.HardLimit) {
			return invalid("machine %s: service %d: concurrency limits %d/%d", m.ID, i, c.SoftLimit, c.HardLimit)
		}
		switch s.Autostop {
		case "", AutostopOff, AutostopStop, AutostopSuspend:
		default:
			return invalid("machine %s: service %d: autostop %q", m.ID, i, s.Autostop)
		}
		if s.MinMachinesRunning < 0 || s.MinMachinesRunning > maxMinRunning {
			return invalid("machine %s: service %d: min_machines_running %d", m.ID, i, s.MinMachinesRunning)
		}
	}
	for _, c := range m.Checks {
		if !api.ValidCheckName(c.Name) {
			return invalid("machine %s: check name %q", m.ID, c.Name)
		}
		if c.Status != CheckPassing && c.Status != CheckWarning && c.Status != CheckCritical {
			return invalid("machine %s: check %s: status %q", m.ID, c.Name, c.Status)
		}
		if len(c.Output) > maxOutputLen || !utf8.ValidString(c.Output) {
			return invalid("machine %s: check %s: output", m.ID, c.Name)
		}
	}
	return nil
}

// validateMachines checks a list of machines and that no id repeats.
func validateMachines(ms []Machine, limit int) error {
	if len(ms) > limit {
		return invalid("%d machines over limit %d", len(ms), limit)
	}
	seen := make(map[string]bool, len(ms))
	for i := range ms {
		if err := validateMachine(&ms[i]); err != nil {
			return err
		}
		if seen[ms[i].ID] {
			return invalid("machine %s listed twice", ms[i].ID)
		}
		seen[ms[i].ID] = true
	}
	return nil
}

func validateHostLevel(owner string, free Resources, load float64) error {
	if !validHostID(owner) {
		return invalid("owner %q", owner)
	}
	if err := validateResources(free, "free"); err != nil {
		return err
	}
	if !validLoad(load) {
		return invalid("load %v", load)
	}
	return nil
}

// validateFull checks one owner's full facts.
func validateFull(f *fullFacts, now time.Time, limit int) error {
	if err := validateHostLevel(f.Owner, f.Free, f.Load); err != nil {
		return err
	}
	if !validVersion(f.Version, now) {
		return invalid("owner %s: version %d", f.Owner, f.Version)
	}
	return validateMachines(f.Machines, limit)
}

// validateDelta checks a delta.
func validateDelta(d *delta, now time.Time, limit int) error {
	if err := validateHostLevel(d.Owner, d.Free, d.Load); err != nil {
		return err
	}
	if !validVersion(d.Version, now) || d.Base >= d.Version {
		return invalid("owner %s: versions %d→%d", d.Owner, d.Base, d.Version)
	}
	if err := validateMachines(d.Upserts, limit); err != nil {
		return err
	}
	if len(d.Removes) > limit {
		return invalid("owner %s: %d removals", d.Owner, len(d.Removes))
	}
	for _, id := range d.Removes {
		if !validMachineID(id) {
			return invalid("owner %s: removed id %q", d.Owner, id)
		}
	}
	return nil
}

func validateDigest(d *digest) error {
	if !validHostID(d.From) {
		return invalid("digest from %q", d.From)
	}
	for _, e := range d.Entries {
		if !validHostID(e.Owner) {
			return invalid("digest owner %q", e.Owner)
		}
	}
	return nil
}

// maxVerdictAge is how old a verdict may be when it arrives. Verdicts
// spread in well under a second; an old one is a replay or a broken clock.
// validateVerdict takes it stretched by Config.Dilation.
const maxVerdictAge = time.Minute

func validateVerdict(v *verdict, now time.Time, maxAge time.Duration) error {
	switch {
	case !validHostID(v.From):
		return invalid("verdict from %q", v.From)
	case !validHostID(v.Host):
		return invalid("verdict about %q", v.Host)
	case v.From == v.Host:
		return invalid("verdict by %s about itself", v.From)
	case !validVersion(v.At, now) || v.At < uint64(now.Add(-maxAge).UnixNano()):
		return invalid("verdict about %s: time %d out of range", v.Host, v.At)
	}
	return nil
}

func validateMeta(m *hostMeta) error {
	if !validRegion(m.Region) {
		return invalid("region %q", m.Region)
	}
	if err := validateResources(m.Capacity, "capacity"); err != nil {
		return err
	}
	if len(m.Addrs) > maxAddrs {
		return invalid("%d addresses", len(m.Addrs))
	}
	for k, v := range m.Addrs {
		if !word(k, maxShortLen, "") || len(v) > maxAddrLen || !utf8.ValidString(v) {
			return invalid("address %q=%q", k, v)
		}
	}
	return nil
}
