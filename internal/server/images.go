package server

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/pki"
)

// ImageResolver is the platform registry as creates see it: the manifest
// digest a repository's tag or digest names, or an error wrapping
// registry.ErrUnknown. *registry.Registry is one.
type ImageResolver interface {
	Resolve(repo, reference string) (digest string, err error)
}

// RegistryScope is the registry's check of a token (registry.Config.Auth).
// A token of the catalog passes the same check as on the API (lookupToken:
// unknown, revoked and expired tokens are refused) and reaches its org's repositories —
// read-only ones to pull — or, for an admin, every repository. A host's
// assertion (made from its certificate) pulls the public namespace and the
// repositories of the orgs with a machine on it (hosts_creds.go).
func (s *Server) RegistryScope(ctx context.Context, raw string) (registry.Scope, error) {
	if raw == "" {
		return registry.Scope{}, registry.ErrUnauthorized
	}
	if s.cfg.AgentToken != "" && subtle.ConstantTimeCompare([]byte(raw), []byte(s.cfg.AgentToken)) == 1 {
		return registry.Scope{Admin: true}, nil
	}
	if pki.IsAssertion(raw) {
		return s.hostRegistryScope(ctx, raw)
	}
	p, err := s.lookupToken(ctx, raw)
	if err != nil {
		var ae *api.Error
		if errors.As(err, &ae) && ae.Status == http.StatusUnauthorized {
			return registry.Scope{}, fmt.Errorf("%w: %s", registry.ErrUnauthorized, ae.Message)
		}
		return registry.Scope{}, err
	}
	if p.Admin {
		return registry.Scope{Admin: true, ReadOnly: p.ReadOnly}, nil
	}
	if p.Org == "" {
		return registry.Scope{}, registry.ErrUnauthorized
	}
	return registry.Scope{Org: p.Org, ReadOnly: p.ReadOnly}, nil
}

// imageName is an image reference in parts.
type imageName struct {
	domain string // "" when the reference names no registry
	repo   string
	tag    string
	digest string
}

// splitImage splits a reference api.CheckImageRef accepted.
func splitImage(ref string) imageName {
	var n imageName
	ref, n.digest, _ = strings.Cut(ref, "@")
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		ref, n.tag = ref[:i], ref[i+1:]
	}
	if first, rest, ok := strings.Cut(ref, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		n.domain, ref = first, rest
	}
	n.repo = ref
	return n
}

// platformRepo returns the repository of the platform registry ref names,
// if it names one: a reference without a registry (hosts pull those from
// the platform's), or one naming the platform registry by one of its names.
func (s *Server) platformRepo(ref string) (imageName, bool) {
	if strings.HasPrefix(ref, api.ExecImagePrefix) {
		return imageName{}, false
	}
	n := splitImage(ref)
	if n.domain == "" {
		return n, true
	}
	for _, name := range s.cfg.RegistryNames {
		if strings.EqualFold(n.domain, name) {
			return n, true
		}
	}
	return n, false
}

// pinImage checks that the machines of org may run cfg's image and pins it
// to the digest its tag names now, so that a later push of the tag changes
// nothing they run — not a restart, not a replacement: an image of the
// platform registry must be in org's namespace or the public one, and is
// rewritten name[:tag]@sha256:…, without the registry's name (a host pulls
// such a name from the platform registry with its credentials, and names
// the registry itself without them). Another org's image and a missing one are
// refused alike (422 naming config.image), so names in other orgs are not
// revealed. A public image the registry does not hold is left by name (the
// exec driver runs flame/demo-app as a host program); only admins can push
// there. Without a platform registry, or for another registry's image,
// nothing changes.
func (s *Server) pinImage(org string, cfg *api.MachineConfig) error {
	if s.cfg.Images == nil || cfg == nil {
		return nil
	}
	n, ok := s.platformRepo(cfg.Image)
	if !ok {
		return nil
	}
	ns := registry.Namespace(n.repo)
	public := ns == registry.PublicNamespace
	missing := api.Errorf(http.StatusUnprocessableEntity,
		"config.image %q: no such image in org %s's repositories (%s/<name>) or the public ones (%s/<name>)",
		api.Clip(cfg.Image, 128), org, org, registry.PublicNamespace)
	if !public && (ns != org || !strings.Contains(n.repo, "/")) {
		return missing
	}
	target := n.digest
	if target == "" {
		target = n.tag
		if target == "" {
			target = "latest"
		}
	}
	digest, err := s.cfg.Images.Resolve(n.repo, target)
	switch {
	case errors.Is(err, registry.ErrUnknown) && public:
		return nil
	case errors.Is(err, registry.ErrUnknown):
		return missing
	case err != nil:
		return api.Errorf(http.StatusServiceUnavailable, "resolve config.image: %v", err)
	}
	// Without the registry's name: hosts send their credentials only
	// with names they qualify themselves.
	pinned := n.repo
	if n.tag != "" {
		pinned += ":" + n.tag
	}
	cfg.Image = pinned + "@" + digest
	return nil
}

// registryNames are the names hosts may use for the registry served on a
// plane listening at addr: addr itself and, when it is a loopback or
// wildcard address, localhost and the loopback addresses at its port.
func registryNames(addr string) []string {
	names := []string{addr}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return names
	}
	ip := net.ParseIP(host)
	if host == "localhost" || ip != nil && (ip.IsLoopback() || ip.IsUnspecified()) {
		for _, h := range []string{"localhost", "127.0.0.1", "::1"} {
			names = append(names, net.JoinHostPort(h, port))
		}
	}
	if ip != nil && ip.IsUnspecified() {
		addrs, _ := net.InterfaceAddrs()
		for _, a := range addrs {
			if in, ok := a.(*net.IPNet); ok && !in.IP.IsLoopback() {
				names = append(names, net.JoinHostPort(in.IP.String(), port))
			}
		}
	}
	return names
}
