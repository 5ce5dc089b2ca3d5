package registry

import (
	"errors"
	"strings"
)

// PublicNamespace holds the images every org may pull and run and only
// admins may push: the platform's own (flame/demo-app).
const PublicNamespace = "flame"

// ErrUnauthorized is what Config.Auth returns for a token it does not know;
// the request is answered 401. Any other error is answered 503 (the token
// store could not be asked).
var ErrUnauthorized = errors.New("registry: invalid token")

// Scope is what a token may do in the registry. Repositories belong to the
// org their first path component names (<org>/<name>): an org's tokens push
// and pull its own, pull the public namespace's, and see nothing else.
type Scope struct {
	// Admin tokens reach every repository (pull only with ReadOnly).
	Admin bool
	// Org is the org whose repositories the token reaches.
	Org string
	// ReadOnly tokens pull only.
	ReadOnly bool
	// Orgs, when set, says of further orgs whether the token pulls their
	// repositories (a host's credential: the orgs with a machine on it).
	// It may ask a store.
	Orgs func(org string) bool
}

// Namespace returns the org that owns repository repo: its first path
// component.
func Namespace(repo string) string {
	ns, _, _ := strings.Cut(repo, "/")
	return ns
}

// MayPull reports whether s may read repository repo (its manifests, tags
// and blobs).
func (s Scope) MayPull(repo string) bool {
	if s.Admin {
		return true
	}
	ns := Namespace(repo)
	return ns == PublicNamespace || s.Org != "" && ns == s.Org || s.Orgs != nil && ns != "" && s.Orgs(ns)
}

// MayPush reports whether s may write repository repo (upload, tag,
// delete). The public namespace is the admins' alone, whatever org is
// named like it.
func (s Scope) MayPush(repo string) bool {
	if s.ReadOnly {
		return false
	}
	if s.Admin {
		return true
	}
	ns := Namespace(repo)
	return ns != PublicNamespace && s.Org != "" && ns == s.Org && strings.Contains(repo, "/")
}
