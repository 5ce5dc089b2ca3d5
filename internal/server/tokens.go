package server

import (
	"context"
	"errors"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
)

// Tokens are managed through the API by these rules:
//
//   - A token's id is its catalog key, the hex SHA-256 of its secret: it
//     names the token without revealing it.
//   - An admin token lists and revokes every token.
//   - An org's read-write token that is not narrowed to one app lists and
//     revokes its org's tokens — those it could have minted.
//   - Any other token (read-only, or narrowed to an app) sees and revokes
//     only itself: a leaked token can always be withdrawn by its holder.
//   - The last admin token cannot be revoked (409): nobody could mint
//     another without restarting the server.
//   - A revoked or expired token is refused (401) at once by this server;
//     another server sharing the catalog forgets it within the catalog
//     watch's delay.

// tokenID validates a token id as the API takes it.
var tokenID = regexp.MustCompile(`^[0-9a-f]{64}$`)

// expired reports whether t has expired at now.
func (t token) expired(now time.Time) bool {
	return !t.Expires.IsZero() && !now.Before(t.Expires)
}

// lookupToken finds the token whose secret is raw, from the cache or the
// catalog, and refuses an expired one: every path that checks tokens (the
// API, the registry, the dev cluster's chaos API) goes through it.
func (s *Server) lookupToken(ctx context.Context, raw string) (token, error) {
	key := tokenKey(raw)
	t, ok := s.tokenCache.get(key)
	if !ok {
		var err error
		t, _, err = catalog.GetJSON[token](ctx, s.tokens, key)
		switch {
		case errors.Is(err, catalog.ErrNotFound):
			return token{}, api.Errorf(http.StatusUnauthorized, "invalid token: unknown or revoked")
		case err != nil:
			return token{}, api.Errorf(http.StatusServiceUnavailable, "catalog unavailable, try again: %v", err)
		}
		if s.tokenCache.revoked(key) {
			return token{}, api.Errorf(http.StatusUnauthorized, "invalid token: unknown or revoked")
		}
	}
	if t.expired(s.cfg.Now()) {
		return token{}, api.Errorf(http.StatusUnauthorized, "token expired at %s", t.Expires.UTC().Format(time.RFC3339))
	}
	return t, nil
}

// tokenExpiry resolves a create request's expiry against the minting
// principal's: zero for none. A token never outlives the one minting it.
func tokenExpiry(in api.CreateTokenInput, p principal, now time.Time) (time.Time, error) {
	var exp time.Time
	switch {
	case in.ExpiresAt != "" && in.TTLSeconds != 0:
		return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "expires_at and ttl_seconds: give one, not both")
	case in.TTLSeconds < 0:
		return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "ttl_seconds: must be positive")
	case in.TTLSeconds > int64(api.MaxTokenTTL/time.Second):
		return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "ttl_seconds: at most %d", int64(api.MaxTokenTTL/time.Second))
	case in.TTLSeconds > 0:
		exp = now.Add(time.Duration(in.TTLSeconds) * time.Second)
	case in.ExpiresAt != "":
		t, err := time.Parse(time.RFC3339, in.ExpiresAt)
		switch {
		case err != nil:
			return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "expires_at: want an RFC 3339 time")
		case !t.After(now):
			return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "expires_at: in the past")
		case t.Sub(now) > api.MaxTokenTTL:
			return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "expires_at: at most %s from now", api.MaxTokenTTL)
		}
		exp = t
	}
	if !p.Expires.IsZero() {
		if exp.IsZero() {
			return p.Expires, nil
		}
		if exp.After(p.Expires) {
			return time.Time{}, api.Errorf(http.StatusUnprocessableEntity, "expires_at: later than the minting token's expiry (%s)", p.Expires.UTC().Format(time.RFC3339))
		}
	}
	return exp.UTC(), nil
}

// info is t as the API lists it.
func (t token) info(id string) api.TokenInfo {
	ti := api.TokenInfo{ID: id, Name: t.Name, OrgSlug: t.Org, App: t.App, Admin: t.Admin, ReadOnly: t.ReadOnly}
	if !t.Created.IsZero() {
		ti.CreatedAt = t.Created.UTC().Format(time.RFC3339)
	}
	if !t.Expires.IsZero() {
		ti.ExpiresAt = t.Expires.UTC().Format(time.RFC3339)
	}
	return ti
}

// mayManage reports whether p may list and revoke the token t whose id is
// id; self is the id of p's own token.
func (p principal) mayManage(t token, id, self string) bool {
	switch {
	case p.Admin:
		return true
	case id == self:
		return true
	case p.ReadOnly || p.App != "" || p.Org == "":
		return false
	}
	return !t.Admin && t.Org == p.Org
}

// selfID is the id of the token the request carries ("" for none).
func selfID(r *http.Request) string {
	raw, err := httpapi.BearerToken(r)
	if err != nil {
		return ""
	}
	return tokenKey(raw)
}

// listTokens is GET /v1/tokens: the tokens the caller may manage, by
// creation time, never their secrets.
func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) error {
	p, self := caller(r.Context()), selfID(r)
	es, err := s.tokens.List(r.Context(), "")
	if err != nil {
		return err
	}
	out := []api.TokenInfo{}
	created := map[string]time.Time{}
	for _, e := range es {
		var t token
		if decodeJSON(e.Value, &t) != nil || !p.mayManage(t, e.Key, self) {
			continue
		}
		out = append(out, t.info(e.Key))
		created[e.Key] = t.Created
	}
	sort.SliceStable(out, func(i, j int) bool { return created[out[i].ID].Before(created[out[j].ID]) })
	httpapi.WriteJSON(w, http.StatusOK, api.ListTokensResponse{Tokens: out})
	return nil
}

// revokeToken is DELETE /v1/tokens/{id}: the token is deleted from the
// catalog and from this server's cache, so it is refused from the next
// request on. A token the caller may not manage is reported missing.
func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	p, self := caller(ctx), selfID(r)
	id := strings.ToLower(r.PathValue("id"))
	notFound := api.Errorf(http.StatusNotFound, "token %s not found", api.Clip(id, 64))
	if !tokenID.MatchString(id) {
		return notFound
	}
	e, err := s.tokens.Get(ctx, id)
	if errors.Is(err, catalog.ErrNotFound) {
		return notFound
	}
	if err != nil {
		return err
	}
	var t token
	if err := decodeJSON(e.Value, &t); err != nil {
		return err
	}
	if !p.mayManage(t, id, self) {
		return notFound
	}
	if t.Admin {
		if err := s.otherAdmin(ctx, id); err != nil {
			return err
		}
	}
	// The revision guards against a concurrent change; deleting marks the
	// key in the cache first, so a watch event racing the delete cannot
	// bring the token back.
	s.tokenCache.revoke(id)
	if err := s.tokens.Delete(ctx, id, e.Revision); err != nil && !errors.Is(err, catalog.ErrNotFound) {
		s.tokenCache.unrevoke(id)
		if errors.Is(err, catalog.ErrConflict) {
			return api.Errorf(http.StatusConflict, "token %s changed meanwhile, try again", id)
		}
		return err
	}
	if s.cfg.OnRevoke != nil {
		s.cfg.OnRevoke(id)
	}
	s.log.Info("token revoked", "id", id[:12], "org", t.Org, "app", t.App, "by", p.Name)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// otherAdmin answers nil when an admin token other than id exists and has
// not expired, a 409 otherwise.
func (s *Server) otherAdmin(ctx context.Context, id string) error {
	es, err := s.tokens.List(ctx, "")
	if err != nil {
		return err
	}
	now := s.cfg.Now()
	for _, e := range es {
		var t token
		if e.Key != id && decodeJSON(e.Value, &t) == nil && t.Admin && !t.expired(now) {
			return nil
		}
	}
	return api.Errorf(http.StatusConflict, "token %s is the last admin token: mint another admin token before revoking it", id)
}
