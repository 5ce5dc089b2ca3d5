package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// The server machines ask (at layout.DNS) answers each query as the asking
// machine's org sees the cluster: its source address says which org it is
// (layout.Locate), and OrgView leaves out every app and machine of another
// org, so another org's names are NXDOMAIN and _apps.internal lists the
// org's own apps only. A source that is no machine of the network is
// refused. Names outside .internal go to the host's resolver (Forwarder),
// a bounded number at a time, so the server is a resolver for its machines
// and for nobody else.

// Machines configures a server as the one machines ask.
type Machines struct {
	// Network is the private network whose machines may ask.
	Network layout.Network
	// Forward answers names outside .internal; nil refuses them.
	Forward *Forwarder
}

// OrgView is v as a machine at asker sees it: only the machines whose
// addresses are in asker's org's network, and only the apps that have one.
func OrgView(v View, asker netip.Addr) View { return orgView{v, asker} }

type orgView struct {
	v     View
	asker netip.Addr
}

func (o orgView) Instances(app string) []Instance {
	return slices.DeleteFunc(slices.Clone(o.v.Instances(app)), func(in Instance) bool {
		return !layout.SameOrg(o.asker, in.IP)
	})
}

func (o orgView) Apps() []string {
	var out []string
	for _, app := range o.v.Apps() {
		if len(o.Instances(app)) > 0 {
			out = append(out, app)
		}
	}
	return out
}

func (o orgView) RTT(region string) (time.Duration, bool) { return o.v.RTT(region) }

// asker decides how a query from src is answered: from which view, and
// whether it may be forwarded. ok is false for a source that may not ask.
func (s *Server) asker(src netip.Addr) (v View, forward *Forwarder, ok bool) {
	m := s.cfg.Machines
	if m == nil {
		return s.cfg.Source.View(), nil, true
	}
	p, _, ok := layout.Locate(src.Unmap())
	if !ok || p.Network != m.Network {
		return nil, nil, false
	}
	return OrgView(s.cfg.Source.View(), src.Unmap()), m.Forward, true
}

// Forwarder asks the host's resolvers the names the server does not
// answer itself, a bounded number at a time.
type Forwarder struct {
	servers []string // host:port
	timeout time.Duration
	slots   chan struct{}
}

// Forwarding bounds.
const (
	// maxForwards is how many forwarded queries may wait for an upstream
	// answer at once; past it a query gets SERVFAIL.
	maxForwards = 64
	// forwardTimeout bounds one upstream exchange.
	forwardTimeout = 2 * time.Second
)

// NewForwarder forwards to the nameservers of a resolv.conf file (the
// host's: /etc/resolv.conf).
func NewForwarder(resolvConf string) (*Forwarder, error) {
	cc, err := dns.ClientConfigFromFile(resolvConf)
	if err != nil {
		return nil, fmt.Errorf("dns: forwarder: %w", err)
	}
	var servers []string
	for _, s := range cc.Servers {
		servers = append(servers, net.JoinHostPort(s, cc.Port))
	}
	return ForwardTo(servers...)
}

// ForwardTo forwards to the given servers (host:port), tried in order.
func ForwardTo(servers ...string) (*Forwarder, error) {
	if len(servers) == 0 {
		return nil, errors.New("dns: forwarder: no nameserver")
	}
	for _, s := range servers {
		if ap, err := netip.ParseAddrPort(s); err == nil && ap.Addr().Unmap() == layout.DNS {
			return nil, fmt.Errorf("dns: forwarder: nameserver %s is the machines' own", s)
		}
	}
	return &Forwarder{servers: servers, timeout: forwardTimeout, slots: make(chan struct{}, maxForwards)}, nil
}

// errBusy is every forwarding slot taken.
var errBusy = errors.New("dns: forwarder busy")

// exchange asks the upstream servers q, over UDP and then TCP when the
// answer was truncated.
func (f *Forwarder) exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	select {
	case f.slots <- struct{}{}:
		defer func() { <-f.slots }()
	default:
		return nil, errBusy
	}
	var last error
	for _, srv := range f.servers {
		ctx, cancel := context.WithTimeout(ctx, f.timeout)
		r, _, err := (&dns.Client{Net: "udp", UDPSize: ednsSize}).ExchangeContext(ctx, q, srv)
		if err == nil && r.Truncated {
			r, _, err = (&dns.Client{Net: "tcp"}).ExchangeContext(ctx, q, srv)
		}
		cancel()
		if err == nil {
			return r, nil
		}
		last = err
	}
	return nil, last
}

// internalName reports whether q asks a name the server answers itself.
func internalName(q *dns.Msg) bool {
	if len(q.Question) != 1 {
		return true // answer() says what is wrong with it
	}
	return dns.IsSubDomain(Zone, strings.ToLower(dns.Fqdn(q.Question[0].Name)))
}
