package cluster

import (
	"slices"
	"sync"
	"time"
)

// Snapshot is this host's view of the cluster at one moment. It is
// immutable: every change builds a new one, so readers never lock and never
// wait on the network. Its hosts, machines, slices and maps are shared
// between readers and must not be modified.
type Snapshot struct {
	// Self is this host's id.
	Self string
	// Seq increases with every snapshot this host builds.
	Seq   uint64
	Built time.Time

	hosts []*Host // sorted by id

	once      sync.Once
	byID      map[string]*Host
	byRegion  map[string][]*Host
	machines  []*Machine
	machineID map[string]*Machine
	byApp     map[string][]*Machine
}

// newSnapshot takes hosts sorted by id.
func newSnapshot(self string, seq uint64, now time.Time, hosts []*Host) *Snapshot {
	return &Snapshot{Self: self, Seq: seq, Built: now, hosts: hosts}
}

// index builds the lookup tables on first use, so a snapshot nobody reads
// costs only its host list.
func (s *Snapshot) index() {
	s.once.Do(func() {
		s.byID = make(map[string]*Host, len(s.hosts))
		s.byRegion = map[string][]*Host{}
		s.machineID = map[string]*Machine{}
		s.byApp = map[string][]*Machine{}
		for _, h := range s.hosts {
			s.byID[h.ID] = h
			s.byRegion[h.Region] = append(s.byRegion[h.Region], h)
			for _, m := range h.Machines {
				s.machines = append(s.machines, m)
				if prev, ok := s.machineID[m.ID]; ok && !preferred(h, s.byID[prev.Host]) {
					continue
				}
				s.machineID[m.ID] = m
			}
		}
		for _, m := range s.machines {
			if s.machineID[m.ID] == m {
				s.byApp[m.App] = append(s.byApp[m.App], m)
			}
		}
	})
}

// preferred decides which of two hosts claiming the same machine id is
// believed: one that is up over one that is not, then the newer facts. (A
// machine moved between hosts is briefly claimed by both.)
func preferred(h, other *Host) bool {
	if other == nil {
		return true
	}
	if h.Up() != other.Up() {
		return h.Up()
	}
	return h.Version > other.Version
}

// Hosts returns every known host, sorted by id.
func (s *Snapshot) Hosts() []*Host { return s.hosts }

// Host returns the host with the given id, or nil.
func (s *Snapshot) Host(id string) *Host {
	s.index()
	return s.byID[id]
}

// HostsInRegion returns the hosts of a region, sorted by id.
func (s *Snapshot) HostsInRegion(region string) []*Host {
	s.index()
	return s.byRegion[region]
}

// Regions returns the regions that have hosts, sorted.
func (s *Snapshot) Regions() []string {
	s.index()
	rs := make([]string, 0, len(s.byRegion))
	for r := range s.byRegion {
		rs = append(rs, r)
	}
	slices.Sort(rs)
	return rs
}

// Machines returns every machine of every host, by host then id. A machine
// id claimed by two hosts appears twice here; Machine and AppMachines
// return only the one believed.
func (s *Snapshot) Machines() []*Machine {
	s.index()
	return s.machines
}

// Machine returns the machine with the given id, or nil.
func (s *Snapshot) Machine(id string) *Machine {
	s.index()
	return s.machineID[id]
}

// HostOf returns the host a machine lives on.
func (s *Snapshot) HostOf(m *Machine) *Host { return s.Host(m.Host) }

// AppMachines returns the machines of an app, by host then id.
func (s *Snapshot) AppMachines(app string) []*Machine {
	s.index()
	return s.byApp[app]
}

// AppMachinesInRegion returns the machines of an app in one region.
func (s *Snapshot) AppMachinesInRegion(app, region string) []*Machine {
	var out []*Machine
	for _, m := range s.AppMachines(app) {
		if m.Region == region {
			out = append(out, m)
		}
	}
	return out
}

// RTT returns the smoothed round-trip time from this host to another, zero
// when unknown.
func (s *Snapshot) RTT(hostID string) time.Duration {
	if h := s.Host(hostID); h != nil {
		return h.RTT
	}
	return 0
}
