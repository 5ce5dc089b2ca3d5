package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"regexp"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
)

// principal is who is calling: the token's rights.
type principal struct{ token }

type principalKey struct{}

// caller returns the principal authenticate (or asControlPlane) put in ctx;
// without one it is nobody, who may see nothing.
func caller(ctx context.Context) principal {
	p, _ := ctx.Value(principalKey{}).(principal)
	return p
}

// asControlPlane marks ctx as the control plane's own work.
func asControlPlane(ctx context.Context) context.Context {
	return context.WithValue(ctx, principalKey{}, principal{token{Admin: true, Name: "control-plane"}})
}

// authenticate looks the presented token up by its hash.
func (s *Server) authenticate(r *http.Request) (context.Context, error) {
	raw, err := httpapi.BearerToken(r)
	if err != nil {
		return nil, err
	}
	t, err := s.lookupToken(r.Context(), raw)
	if err != nil {
		return nil, err
	}
	return context.WithValue(r.Context(), principalKey{}, principal{t}), nil
}

// tokenKey is the catalog key of a token: the hex SHA-256 of it. Tokens are
// 256 random bits, so a plain hash is enough.
func tokenKey(raw string) string {
	h := sha256.Sum256([]byte(raw))
	return hex.EncodeToString(h[:])
}

// newTokenSecret returns a fresh token: a prefix, then 256 random bits.
func newTokenSecret() string {
	var b [32]byte
	rand.Read(b[:])
	return "flame_" + base64.RawURLEncoding.EncodeToString(b[:])
}

// newServerID is a random id for a server in the reconciler lock.
func newServerID() string { return newTokenSecret()[6:22] }

// CreateToken stores a token with t's rights and returns its secret, which
// is not kept anywhere.
func (s *Server) CreateToken(ctx context.Context, t token) (string, error) {
	raw := newTokenSecret()
	t.Created = s.cfg.Now().UTC()
	if _, _, err := catalog.UpdateJSON(ctx, s.tokens, tokenKey(raw), func(v *token, exists bool) error {
		if exists {
			return errors.New("token collision")
		}
		*v = t
		return nil
	}); err != nil {
		return "", err
	}
	return raw, nil
}

// Bootstrap makes sure an admin token exists that has not expired. When it
// had to create one it returns it (its only appearance); otherwise "".
func (s *Server) Bootstrap(ctx context.Context) (string, error) {
	es, err := s.tokens.List(ctx, "")
	if err != nil {
		return "", err
	}
	for _, e := range es {
		var t token
		if decodeJSON(e.Value, &t) == nil && t.Admin && !t.expired(s.cfg.Now()) {
			return "", nil
		}
	}
	return s.CreateToken(ctx, token{Name: "admin", Admin: true})
}

// AddOrg creates an org if it does not exist and returns a read-write token
// scoped to it (what `flame dev` prints for the org "personal").
func (s *Server) AddOrg(ctx context.Context, slug, name string) (string, error) {
	if _, err := s.putOrg(ctx, slug, name); err != nil && !errors.Is(err, api.ErrConflict) {
		return "", err
	}
	return s.CreateToken(ctx, token{Name: slug, Org: slug})
}

// MayPush reports whether raw is a token that may push images: the dev
// cluster's token (Config.AgentToken), or any catalog token that is not read-only.
func (s *Server) MayPush(ctx context.Context, raw string) bool {
	if raw == "" {
		return false
	}
	if s.cfg.AgentToken != "" && subtle.ConstantTimeCompare([]byte(raw), []byte(s.cfg.AgentToken)) == 1 {
		return true
	}
	t, err := s.lookupToken(ctx, raw)
	return err == nil && !t.ReadOnly
}

// MayPull reports whether raw is a token that may pull images: the dev
// cluster's token (Config.AgentToken), or any catalog token, read-only ones too.
func (s *Server) MayPull(ctx context.Context, raw string) bool {
	if raw == "" {
		return false
	}
	if s.cfg.AgentToken != "" && subtle.ConstantTimeCompare([]byte(raw), []byte(s.cfg.AgentToken)) == 1 {
		return true
	}
	_, err := s.lookupToken(ctx, raw)
	return err == nil
}

// canSee reports whether p may see an app of org appOrg named name.
func (p principal) canSee(appOrg, name string) bool {
	switch {
	case p.Admin:
		return true
	case p.Org != appOrg:
		return false
	case p.App != "" && p.App != name:
		return false
	}
	return true
}

// appFor loads an app the caller may see; write asks for the right to change
// it. An app the caller may not see is reported missing, never forbidden,
// so names in other orgs are not revealed.
func (s *Server) appFor(ctx context.Context, name string, write bool) (app, error) {
	p := caller(ctx)
	if !validSlug.MatchString(name) {
		return app{}, api.Errorf(http.StatusNotFound, "app %s not found", clipName(name))
	}
	a, ok := s.appCache.get(name)
	var err error
	if !ok {
		a, _, err = catalog.GetJSON[app](ctx, s.apps, name)
	}
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && !p.canSee(a.Org, a.Name)) {
		return app{}, api.Errorf(http.StatusNotFound, "app %s not found", clipName(name))
	}
	if err != nil {
		return app{}, err
	}
	if write && p.ReadOnly {
		return app{}, api.Errorf(http.StatusForbidden, "this token is read-only")
	}
	return a, nil
}

var validSlug = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func clipName(s string) string { return api.Clip(s, 64) }
