package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/flamehq/flame/api"
)

// The wire format is a small hand-written binary encoding: a format byte, a
// kind byte, then fields in a fixed order — unsigned varints for numbers,
// varint-length-prefixed UTF-8 for strings, a count before every list. Every
// length and count is checked against its limit (and against the bytes left)
// before anything is allocated, so a hostile record costs at most its own
// size to reject. A machine with one service and one check is ~90 bytes,
// about half its JSON, which matters in 1,400-byte gossip packets.

// wireFormat 2 added each machine's load, 3 each service's autostop,
// autostart and min_machines_running and each machine's primary region and
// draining flag, 4 each port's PROXY protocol version, 5 signatures
// (deltas sign themselves and the state they lead to, full facts carry
// their owner's certificate and state signature, verdicts sign themselves:
// trust.go); a host of another format refuses the records rather than
// misreading them.
const wireFormat = 5

// Message kinds.
const (
	kindDelta   byte = 1 // one owner's change: base version → version
	kindFull    byte = 2 // owners' complete facts at their versions
	kindDigest  byte = 3 // owner → version held by the sender; asks for newer
	kindVerdict byte = 4 // a host's region declares it dead, or alive again
)

// Limits on what a record may hold. They bound memory and CPU per record
// and are checked on decode and again by validation. Those on what a
// machine's config puts in its record are the api package's, which the API
// enforces before it accepts a config, so every config it accepts fits.
const (
	maxIDLen          = 64
	maxNameLen        = api.MaxNameLen
	maxShortLen       = 32
	maxAddrLen        = 128
	maxOutputLen      = 512
	maxServices       = api.MaxServices
	maxPorts          = api.MaxPortsPerService
	maxHandlers       = api.MaxHandlersPerPort
	maxChecks         = api.MaxChecks
	maxAddrs          = 8
	maxMachines       = 10000 // per host
	maxOwners         = 20000 // per message
	maxPort           = 65535
	maxLimit          = api.MaxConcurrencyLimit
	maxMinRunning     = api.MaxMinMachinesRunning
	maxMachineLoad    = MaxLoad
	maxCPUs           = 1 << 16
	maxMemoryMB       = 1 << 32
	maxLoad           = 1 << 20
	metaLimit         = 512 // memberlist's node meta limit
	maxMessageBytes   = 16 << 20
	maxRemovesInDelta = maxMachines
)

var errShort = errors.New("truncated")

// fullFacts is one owner's complete facts at a version.
type fullFacts struct {
	Owner    string
	Version  uint64
	Free     Resources
	Load     float64
	Machines []Machine
	// Cert is the owner's certificate (DER) and StateSig its signature of
	// these facts (trust.go); both empty in a cluster without trust.
	Cert     []byte
	StateSig []byte
}

// delta turns an owner's facts at Base into its facts at Version: machines
// upserted whole, machines removed by id, host-level fields replaced.
type delta struct {
	Owner   string
	Base    uint64
	Version uint64
	Free    Resources
	Load    float64
	Upserts []Machine
	Removes []string
	// StateSig is the owner's signature of its facts at Version, kept to
	// pass them on whole; Sig signs the rest of the record (trust.go).
	StateSig []byte
	Sig      []byte
	signed   []byte // the part of the wire form Sig signs
	encoded  []byte // the wire form, kept for relaying
	received int64  // when it arrived (unix nanoseconds), for gap repair
}

// digest lists the versions its sender holds. The receiver answers with the
// full facts of every listed owner it holds newer, and, when All is set, of
// every owner the sender did not list.
type digest struct {
	From    string
	All     bool
	Entries []digestEntry
}

type digestEntry struct {
	Owner   string
	Version uint64
}

// verdict is what a host's regional failure detector concluded about
// another host of its region: dead, or alive again. At is when it did, by
// the issuer's clock.
type verdict struct {
	From    string // the issuer
	Host    string // the host it is about
	Dead    bool
	At      uint64 // unix nanoseconds
	Sig     []byte // the issuer's signature of the rest (trust.go)
	signed  []byte // the part of the wire form Sig signs
	encoded []byte // the wire form, kept for relaying
}

// hostMeta is what a host advertises in memberlist's node meta.
type hostMeta struct {
	Region   string
	Capacity Resources
	Addrs    map[string]string
	// Leaving is set just before a host leaves, so that others record it
	// as left rather than dead (memberlist's leave event does not say).
	Leaving bool
}

// writer appends the wire encoding to a buffer.
type writer struct{ b []byte }

func (w *writer) byte(c byte)     { w.b = append(w.b, c) }
func (w *writer) uint(v uint64)   { w.b = binary.AppendUvarint(w.b, v) }
func (w *writer) int(v int)       { w.uint(uint64(max(v, 0))) }
func (w *writer) float(v float64) { w.b = binary.LittleEndian.AppendUint64(w.b, math.Float64bits(v)) }
func (w *writer) string(s string) { w.uint(uint64(len(s))); w.b = append(w.b, s...) }
func (w *writer) bytes(b []byte)  { w.uint(uint64(len(b))); w.b = append(w.b, b...) }
func (w *writer) bool(v bool) {
	if v {
		w.byte(1)
	} else {
		w.byte(0)
	}
}
func (w *writer) header(kind byte)      { w.byte(wireFormat); w.byte(kind) }
func (w *writer) resources(r Resources) { w.int(r.CPUs); w.int(r.MemoryMB) }

func (w *writer) machine(m *Machine) {
	w.string(m.ID)
	w.string(m.App)
	w.string(m.Org)
	w.string(m.Region)
	w.string(m.State)
	w.string(m.InstanceID)
	w.string(m.PrivateIP)
	w.string(m.ProcessGroup)
	w.string(m.PrimaryRegion)
	w.bool(m.Cordoned)
	w.bool(m.Draining)
	w.int(len(m.Services))
	for _, s := range m.Services {
		w.string(s.Protocol)
		w.int(s.InternalPort)
		w.int(len(s.Ports))
		for _, p := range s.Ports {
			w.int(p.Port)
			w.int(p.StartPort)
			w.int(p.EndPort)
			w.int(len(p.Handlers))
			for _, h := range p.Handlers {
				w.string(h)
			}
			w.bool(p.ForceHTTPS)
			w.string(p.ProxyProto)
		}
		w.string(s.Concurrency.Type)
		w.int(s.Concurrency.SoftLimit)
		w.int(s.Concurrency.HardLimit)
		w.string(s.Autostop)
		w.bool(s.Autostart)
		w.int(s.MinMachinesRunning)
	}
	w.int(len(m.Checks))
	for _, c := range m.Checks {
		w.string(c.Name)
		w.string(c.Status)
		w.string(c.Output)
	}
	w.int(m.Load)
}

// reader decodes the wire encoding; the first error sticks and every later
// read returns zero values.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *reader) byte() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 1 {
		r.fail(errShort)
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *reader) uint(limit uint64, what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(fmt.Errorf("%s: bad varint", what))
		return 0
	}
	r.b = r.b[n:]
	if v > limit {
		r.fail(fmt.Errorf("%s: %d over limit %d", what, v, limit))
		return 0
	}
	return v
}

func (r *reader) int(limit int, what string) int { return int(r.uint(uint64(limit), what)) }

// count reads a list length; each element takes at least one byte, so a
// count larger than the bytes left is rejected before allocating.
func (r *reader) count(limit int, what string) int {
	n := r.int(limit, what)
	if r.err == nil && n > len(r.b) {
		r.fail(fmt.Errorf("%s: count %d exceeds message", what, n))
		return 0
	}
	return n
}

func (r *reader) float(what string) float64 {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 8 {
		r.fail(errShort)
		return 0
	}
	v := math.Float64frombits(binary.LittleEndian.Uint64(r.b))
	r.b = r.b[8:]
	return v
}

func (r *reader) string(limit int, what string) string {
	n := r.int(limit, what)
	if r.err != nil {
		return ""
	}
	if n > len(r.b) {
		r.fail(fmt.Errorf("%s: %w", what, errShort))
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

func (r *reader) bytes(limit int, what string) []byte {
	n := r.int(limit, what)
	if r.err != nil {
		return nil
	}
	if n > len(r.b) {
		r.fail(fmt.Errorf("%s: %w", what, errShort))
		return nil
	}
	if n == 0 {
		return nil
	}
	b := r.b[:n:n]
	r.b = r.b[n:]
	return b
}

func (r *reader) bool(what string) bool {
	switch r.byte() {
	case 0:
		return false
	case 1:
		return true
	default:
		r.fail(fmt.Errorf("%s: bad bool", what))
		return false
	}
}

func (r *reader) resources() Resources {
	return Resources{CPUs: r.int(maxCPUs, "cpus"), MemoryMB: r.int(maxMemoryMB, "memory_mb")}
}

func (r *reader) machine() Machine {
	var m Machine
	m.ID = r.string(maxIDLen, "machine id")
	m.App = r.string(maxNameLen, "app")
	m.Org = r.string(maxNameLen, "org")
	m.Region = r.string(maxShortLen, "region")
	m.State = r.string(maxShortLen, "state")
	m.InstanceID = r.string(maxIDLen, "instance id")
	m.PrivateIP = r.string(maxShortLen*2, "private ip")
	m.ProcessGroup = r.string(maxNameLen, "process group")
	m.PrimaryRegion = r.string(maxShortLen, "primary region")
	m.Cordoned = r.bool("cordoned")
	m.Draining = r.bool("draining")
	if n := r.count(maxServices, "services"); n > 0 {
		m.Services = make([]Service, n)
		for i := range m.Services {
			s := &m.Services[i]
			s.Protocol = r.string(maxShortLen, "protocol")
			s.InternalPort = r.int(maxPort, "internal port")
			if np := r.count(maxPorts, "ports"); np > 0 {
				s.Ports = make([]Port, np)
				for j := range s.Ports {
					p := &s.Ports[j]
					p.Port = r.int(maxPort, "port")
					p.StartPort = r.int(maxPort, "start port")
					p.EndPort = r.int(maxPort, "end port")
					if nh := r.count(maxHandlers, "handlers"); nh > 0 {
						p.Handlers = make([]string, nh)
						for k := range p.Handlers {
							p.Handlers[k] = r.string(maxShortLen, "handler")
						}
					}
					p.ForceHTTPS = r.bool("force https")
					p.ProxyProto = r.string(maxShortLen, "proxy protocol version")
				}
			}
			s.Concurrency.Type = r.string(maxShortLen, "concurrency type")
			s.Concurrency.SoftLimit = r.int(maxLimit, "soft limit")
			s.Concurrency.HardLimit = r.int(maxLimit, "hard limit")
			s.Autostop = r.string(maxShortLen, "autostop")
			s.Autostart = r.bool("autostart")
			s.MinMachinesRunning = r.int(maxMinRunning, "min machines running")
		}
	}
	if n := r.count(maxChecks, "checks"); n > 0 {
		m.Checks = make([]CheckStatus, n)
		for i := range m.Checks {
			c := &m.Checks[i]
			c.Name = r.string(maxNameLen, "check name")
			c.Status = r.string(maxShortLen, "check status")
			c.Output = r.string(maxOutputLen, "check output")
		}
	}
	m.Load = r.int(maxMachineLoad, "machine load")
	return m
}

func (r *reader) done() error {
	if r.err == nil && len(r.b) != 0 {
		r.fail(fmt.Errorf("%d trailing bytes", len(r.b)))
	}
	return r.err
}

// encodeMachine is one machine's wire form, used to diff published facts.
func encodeMachine(m *Machine) []byte {
	var w writer
	w.machine(m)
	return w.b
}

// encodeDeltaParts builds a delta message from machines already encoded,
// up to its signature (which signed appends).
func encodeDeltaParts(owner string, base, version uint64, free Resources, load float64, upserts [][]byte, removes []string, stateSig []byte) []byte {
	var w writer
	w.header(kindDelta)
	w.string(owner)
	w.uint(base)
	w.uint(version)
	w.resources(free)
	w.float(load)
	w.int(len(upserts))
	for _, u := range upserts {
		w.b = append(w.b, u...)
	}
	w.int(len(removes))
	for _, id := range removes {
		w.string(id)
	}
	w.bytes(stateSig)
	return w.b
}

// encodeDelta is d's wire form, carrying d.Sig as its signature.
func encodeDelta(d *delta) []byte {
	ups := make([][]byte, len(d.Upserts))
	for i := range d.Upserts {
		ups[i] = encodeMachine(&d.Upserts[i])
	}
	w := writer{b: encodeDeltaParts(d.Owner, d.Base, d.Version, d.Free, d.Load, ups, d.Removes, d.StateSig)}
	w.bytes(d.Sig)
	return w.b
}

func encodeFull(facts []*fullFacts) []byte {
	var w writer
	w.header(kindFull)
	w.int(len(facts))
	for _, f := range facts {
		w.string(f.Owner)
		w.uint(f.Version)
		w.resources(f.Free)
		w.float(f.Load)
		w.int(len(f.Machines))
		for i := range f.Machines {
			w.machine(&f.Machines[i])
		}
		w.bytes(f.Cert)
		w.bytes(f.StateSig)
	}
	return w.b
}

func encodeDigest(d *digest) []byte {
	var w writer
	w.header(kindDigest)
	w.string(d.From)
	w.bool(d.All)
	w.int(len(d.Entries))
	for _, e := range d.Entries {
		w.string(e.Owner)
		w.uint(e.Version)
	}
	return w.b
}

// encodeVerdict is v's wire form, carrying v.Sig as its signature.
func encodeVerdict(v *verdict) []byte {
	w := writer{b: verdictBody(v)}
	w.bytes(v.Sig)
	return w.b
}

// verdictBody is the part of a verdict its signature signs.
func verdictBody(v *verdict) []byte {
	var w writer
	w.header(kindVerdict)
	w.string(v.From)
	w.string(v.Host)
	w.bool(v.Dead)
	w.uint(v.At)
	return w.b
}

func encodeMeta(m *hostMeta) []byte {
	var w writer
	w.byte(wireFormat)
	w.string(m.Region)
	w.resources(m.Capacity)
	w.int(len(m.Addrs))
	for _, k := range sortedKeys(m.Addrs) {
		w.string(k)
		w.string(m.Addrs[k])
	}
	w.bool(m.Leaving)
	return w.b
}

func decodeMeta(b []byte) (*hostMeta, error) {
	if len(b) > metaLimit {
		return nil, fmt.Errorf("meta of %d bytes", len(b))
	}
	r := reader{b: b}
	if f := r.byte(); r.err == nil && f != wireFormat {
		return nil, fmt.Errorf("meta format %d", f)
	}
	m := &hostMeta{Region: r.string(maxShortLen, "region"), Capacity: r.resources()}
	if n := r.count(maxAddrs, "addrs"); n > 0 {
		m.Addrs = make(map[string]string, n)
		for range n {
			k := r.string(maxShortLen, "addr name")
			m.Addrs[k] = r.string(maxAddrLen, "addr")
		}
	}
	m.Leaving = r.bool("leaving")
	if err := r.done(); err != nil {
		return nil, err
	}
	return m, nil
}

// decodeMessage decodes one message of any kind: a *delta, a []*fullFacts,
// a *digest or a *verdict. It checks structure and limits only; validate checks
// meaning.
func decodeMessage(b []byte) (any, error) {
	if len(b) > maxMessageBytes {
		return nil, fmt.Errorf("message of %d bytes", len(b))
	}
	r := reader{b: b}
	format, kind := r.byte(), r.byte()
	if r.err != nil {
		return nil, r.err
	}
	if format != wireFormat {
		return nil, fmt.Errorf("unknown format %d", format)
	}
	switch kind {
	case kindDelta:
		d := &delta{
			Owner:   r.string(maxIDLen, "owner"),
			Base:    r.uint(math.MaxUint64, "base"),
			Version: r.uint(math.MaxUint64, "version"),
			Free:    r.resources(),
			Load:    r.float("load"),
		}
		if n := r.count(maxMachines, "upserts"); n > 0 {
			d.Upserts = make([]Machine, n)
			for i := range d.Upserts {
				d.Upserts[i] = r.machine()
			}
		}
		if n := r.count(maxRemovesInDelta, "removes"); n > 0 {
			d.Removes = make([]string, n)
			for i := range d.Removes {
				d.Removes[i] = r.string(maxIDLen, "removed id")
			}
		}
		d.StateSig = r.bytes(maxSigLen, "state signature")
		d.signed = b[:len(b)-len(r.b)]
		d.Sig = r.bytes(maxSigLen, "signature")
		if err := r.done(); err != nil {
			return nil, fmt.Errorf("delta: %w", err)
		}
		d.encoded = b
		return d, nil
	case kindFull:
		n := r.count(maxOwners, "owners")
		facts := make([]*fullFacts, 0, n)
		for range n {
			f := &fullFacts{
				Owner:   r.string(maxIDLen, "owner"),
				Version: r.uint(math.MaxUint64, "version"),
				Free:    r.resources(),
				Load:    r.float("load"),
			}
			if nm := r.count(maxMachines, "machines"); nm > 0 {
				f.Machines = make([]Machine, nm)
				for i := range f.Machines {
					f.Machines[i] = r.machine()
				}
			}
			f.Cert = r.bytes(maxCertLen, "certificate")
			f.StateSig = r.bytes(maxSigLen, "state signature")
			if r.err != nil {
				break
			}
			facts = append(facts, f)
		}
		if err := r.done(); err != nil {
			return nil, fmt.Errorf("full: %w", err)
		}
		return facts, nil
	case kindDigest:
		d := &digest{From: r.string(maxIDLen, "from"), All: r.bool("all")}
		if n := r.count(maxOwners, "entries"); n > 0 {
			d.Entries = make([]digestEntry, n)
			for i := range d.Entries {
				d.Entries[i] = digestEntry{Owner: r.string(maxIDLen, "owner"), Version: r.uint(math.MaxUint64, "version")}
			}
		}
		if err := r.done(); err != nil {
			return nil, fmt.Errorf("digest: %w", err)
		}
		return d, nil
	case kindVerdict:
		v := &verdict{From: r.string(maxIDLen, "from"), Host: r.string(maxIDLen, "host"), Dead: r.bool("dead"), At: r.uint(math.MaxUint64, "at")}
		v.signed = b[:len(b)-len(r.b)]
		v.Sig = r.bytes(maxSigLen, "signature")
		if err := r.done(); err != nil {
			return nil, fmt.Errorf("verdict: %w", err)
		}
		v.encoded = b
		return v, nil
	default:
		return nil, fmt.Errorf("unknown kind %d", kind)
	}
}
