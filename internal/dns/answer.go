package dns

import (
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Zone is the synthetic top-level domain this package answers for.
const Zone = "internal."

// DefaultTTL is the TTL of every answer when the server is given none. It is
// short so a deploy is visible within seconds.
const DefaultTTL = 5 * time.Second

// ednsSize is the UDP payload size the server advertises and the largest UDP
// answer it sends, whatever a client offers: 1232 bytes avoids IP
// fragmentation on any path (the DNS flag day 2020 value).
const ednsSize = 1232

// maxTXT is the longest character-string a TXT record can carry.
const maxTXT = 255

// Instance is one machine as the answering host knows it.
type Instance struct {
	ID           string
	App          string
	Region       string
	ProcessGroup string
	// IP is the machine's 6PN address. An IPv4 address is answered to A
	// queries instead, for networks without IPv6.
	IP netip.Addr
	// Started machines are the only ones names resolve to.
	Started bool
}

// View is the cluster as one query sees it. A query reads a single View
// from its first lookup to its last, so its answer is of one moment and
// never mixes two; a View must therefore not change while in use (an
// immutable snapshot of the host's state is one).
type View interface {
	// Instances returns every machine of the app the host knows of, in any
	// state; none for an unknown app.
	Instances(app string) []Instance
	// Apps returns the names of every app of the network.
	Apps() []string
	// RTT returns the round trip time from this host to the region, and
	// false when it is not known. It is what "nearest" is measured by.
	RTT(region string) (time.Duration, bool)
}

// Source hands out the host's current view of the cluster. It is asked once
// per query, so it must be cheap and safe for concurrent use.
type Source interface {
	View() View
}

// Answer builds the reply to query q from view v with the default TTL. It
// is pure: the same query and view give the same answer. It never fails: a
// query it cannot serve gets an error rcode. It does not truncate; the
// server does that for UDP.
func Answer(q *dns.Msg, v View) *dns.Msg {
	return answer(q, v, DefaultTTL)
}

// answer builds the reply with the given TTL.
func answer(q *dns.Msg, v View, ttl time.Duration) *dns.Msg {
	r := new(dns.Msg)
	if q == nil {
		r.Response = true
		r.Rcode = dns.RcodeFormatError
		return r
	}
	r.SetReply(q)
	r.Question = slices.Clone(q.Question) // SetReply keeps only the first
	r.RecursionAvailable = false

	var opt *dns.OPT
	if o := q.IsEdns0(); o != nil {
		opt = &dns.OPT{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeOPT}}
		opt.SetUDPSize(ednsSize)
		defer func() { r.Extra = append(r.Extra, opt) }()
		if o.Version() != 0 {
			r.Rcode = dns.RcodeBadVers
			return r
		}
	}
	switch {
	case q.Opcode != dns.OpcodeQuery:
		r.Rcode = dns.RcodeNotImplemented
		return r
	case len(q.Question) != 1:
		r.Rcode = dns.RcodeFormatError
		return r
	}
	question := q.Question[0]
	name := strings.ToLower(dns.Fqdn(question.Name))
	if !dns.IsSubDomain(Zone, name) {
		r.Rcode = dns.RcodeRefused
		return r
	}
	if question.Qclass != dns.ClassINET && question.Qclass != dns.ClassANY {
		r.Rcode = dns.RcodeRefused
		return r
	}
	r.Authoritative = true

	secs := uint32(max(ttl/time.Second, 0))
	res := resolve(name, v)
	if !res.exists {
		r.Rcode = dns.RcodeNameError
		r.Ns = []dns.RR{soa(secs)}
		return r
	}
	hdr := func(t uint16) dns.RR_Header {
		return dns.RR_Header{Name: question.Name, Rrtype: t, Class: dns.ClassINET, Ttl: secs}
	}
	qt := question.Qtype
	for _, ip := range res.addrs {
		switch {
		case ip.Is4() && (qt == dns.TypeA || qt == dns.TypeANY):
			a := ip.As4()
			r.Answer = append(r.Answer, &dns.A{Hdr: hdr(dns.TypeA), A: a[:]})
		case ip.Is6() && (qt == dns.TypeAAAA || qt == dns.TypeANY):
			a := ip.As16()
			r.Answer = append(r.Answer, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: a[:]})
		}
	}
	if res.txt != nil && (qt == dns.TypeTXT || qt == dns.TypeANY) {
		r.Answer = append(r.Answer, &dns.TXT{Hdr: hdr(dns.TypeTXT), Txt: splitTXT(*res.txt)})
	}
	if len(r.Answer) == 0 {
		r.Ns = []dns.RR{soa(secs)} // NODATA: the name exists, the type does not
	}
	return r
}

// soa is the zone's SOA record, sent with negative answers so resolvers
// cache them for no longer than the TTL (RFC 2308).
func soa(ttl uint32) dns.RR {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: Zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "ns." + Zone,
		Mbox:    "hostmaster." + Zone,
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  ttl,
	}
}

// splitTXT cuts s into the character-strings of one TXT record; resolvers
// join them back (Go's net.LookupTXT does).
func splitTXT(s string) []string {
	if s == "" {
		return []string{""}
	}
	var parts []string
	for len(s) > maxTXT {
		parts = append(parts, s[:maxTXT])
		s = s[maxTXT:]
	}
	return append(parts, s)
}

// resolved is what a name stands for.
type resolved struct {
	exists bool
	addrs  []netip.Addr // in answer order
	txt    *string
}

// resolve maps a lowercase fully qualified name under Zone to its records.
func resolve(name string, v View) resolved {
	rest := strings.TrimSuffix(strings.TrimSuffix(name, Zone), ".")
	if rest == "" {
		return resolved{exists: true} // the zone apex: no records of ours
	}
	if strings.Contains(rest, `\`) {
		return resolved{} // escaped dots or bytes never appear in our names
	}
	labels := strings.Split(rest, ".")
	n := len(labels)
	if n == 1 && labels[0] == "_apps" {
		return text(strings.Join(apps(v), ","))
	}
	app := labels[n-1]
	all := v.Instances(app)
	if len(all) == 0 && !slices.Contains(v.Apps(), app) {
		return resolved{}
	}
	var started []Instance
	for _, in := range all {
		if in.Started && in.IP.IsValid() {
			started = append(started, in)
		}
	}
	sortNearest(started, v)

	switch {
	case n == 1:
		return addrs(started, nil)
	case n == 2:
		switch labels[0] {
		case "global":
			return addrs(started, nil)
		case "vms":
			return text(vms(started))
		case "regions":
			return text(strings.Join(regions(started), ","))
		}
		region := labels[0]
		if !slices.ContainsFunc(all, func(in Instance) bool { return strings.EqualFold(in.Region, region) }) {
			return resolved{}
		}
		return addrs(started, func(in Instance) bool { return strings.EqualFold(in.Region, region) })
	case n == 3 && labels[1] == "vm":
		id := labels[0]
		if !slices.ContainsFunc(all, func(in Instance) bool { return strings.EqualFold(in.ID, id) }) {
			return resolved{}
		}
		return addrs(started, func(in Instance) bool { return strings.EqualFold(in.ID, id) })
	case n == 3 && labels[1] == "process":
		group := labels[0]
		if !slices.ContainsFunc(all, func(in Instance) bool { return strings.EqualFold(in.ProcessGroup, group) }) {
			return resolved{}
		}
		return addrs(started, func(in Instance) bool { return strings.EqualFold(in.ProcessGroup, group) })
	case n == 4 && labels[1] == "nearest" && labels[2] == "of":
		top, ok := parseTop(labels[0])
		if !ok {
			return resolved{}
		}
		res := addrs(started, nil)
		if len(res.addrs) > top {
			res.addrs = res.addrs[:top]
		}
		return res
	}
	return resolved{}
}

// maxTop bounds N in top<N>.nearest.of.<app>.internal; larger N would not
// fit one answer anyway.
const maxTop = 9999

// parseTop reads "top<N>" with 1 ≤ N ≤ maxTop, in plain decimal digits.
func parseTop(label string) (int, bool) {
	digits, ok := strings.CutPrefix(label, "top")
	if !ok || digits == "" || len(digits) > 4 || strings.TrimLeft(digits, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.Atoi(digits)
	if err != nil || n < 1 || n > maxTop {
		return 0, false
	}
	return n, true
}

// text is a name with one TXT record, or with none when s is empty (so a
// client splitting the text never sees an empty entry).
func text(s string) resolved {
	if s == "" {
		return resolved{exists: true}
	}
	return resolved{exists: true, txt: &s}
}

// addrs lists the addresses of the instances keep accepts (all when keep is
// nil), in the order given, without repeats.
func addrs(ins []Instance, keep func(Instance) bool) resolved {
	res := resolved{exists: true}
	seen := map[netip.Addr]bool{}
	for _, in := range ins {
		if keep != nil && !keep(in) {
			continue
		}
		ip := in.IP.Unmap()
		if seen[ip] {
			continue
		}
		seen[ip] = true
		res.addrs = append(res.addrs, ip)
	}
	return res
}

// sortNearest orders instances nearest first: by the RTT from this host to
// their region (unknown RTTs last), then by region, then by ID. It is the
// one definition of "nearest" (see the package doc).
func sortNearest(ins []Instance, v View) {
	type key struct {
		rtt   time.Duration
		known bool
	}
	rtts := map[string]key{}
	for _, in := range ins {
		if _, ok := rtts[in.Region]; !ok {
			d, ok := v.RTT(in.Region)
			rtts[in.Region] = key{d, ok}
		}
	}
	slices.SortStableFunc(ins, func(a, b Instance) int {
		ka, kb := rtts[a.Region], rtts[b.Region]
		if ka.known != kb.known {
			if ka.known {
				return -1
			}
			return 1
		}
		if c := cmp.Compare(ka.rtt, kb.rtt); ka.known && c != 0 {
			return c
		}
		if c := cmp.Compare(a.Region, b.Region); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
}

// vms is the vms.<app>.internal text: "<id> <region>" per started machine,
// comma-separated, ordered by ID.
func vms(started []Instance) string {
	ins := slices.Clone(started)
	slices.SortFunc(ins, func(a, b Instance) int { return cmp.Compare(a.ID, b.ID) })
	parts := make([]string, 0, len(ins))
	for i, in := range ins {
		if i > 0 && in.ID == ins[i-1].ID {
			continue
		}
		parts = append(parts, in.ID+" "+in.Region)
	}
	return strings.Join(parts, ",")
}

// regions lists the regions with a started machine, sorted.
func regions(started []Instance) []string {
	var rs []string
	for _, in := range started {
		rs = append(rs, in.Region)
	}
	slices.Sort(rs)
	return slices.Compact(rs)
}

// apps lists the network's apps, sorted.
func apps(v View) []string {
	as := slices.Clone(v.Apps())
	slices.Sort(as)
	return slices.Compact(as)
}
