package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
)

func decodeJSON(b []byte, v any) error { return json.Unmarshal(b, v) }

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

func (s *Server) putOrg(ctx context.Context, slug, name string) (org, error) {
	if !validSlug.MatchString(slug) {
		return org{}, api.Errorf(http.StatusUnprocessableEntity, "org slug %q: use lowercase letters, digits and -", clipName(slug))
	}
	if name == "" {
		name = slug
	}
	o, _, err := catalog.UpdateJSON(ctx, s.orgs, slug, func(v *org, exists bool) error {
		if exists {
			return api.Errorf(http.StatusConflict, "org %s exists", slug)
		}
		*v = org{Slug: slug, Name: name, CreatedAt: s.cfg.Now().UTC()}
		return nil
	})
	return o, err
}

// createOrg is POST /v1/orgs {slug, name}: admin only.
func (s *Server) createOrg(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can create orgs")
	}
	var in api.Org
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	o, err := s.putOrg(r.Context(), in.Slug, in.Name)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusCreated, api.Org{Slug: o.Slug, Name: o.Name, CreatedAt: o.CreatedAt.Format(time.RFC3339)})
	return nil
}

// listOrgs is GET /v1/orgs: the orgs the caller belongs to.
func (s *Server) listOrgs(w http.ResponseWriter, r *http.Request) error {
	p := caller(r.Context())
	es, err := s.orgs.List(r.Context(), "")
	if err != nil {
		return err
	}
	out := []api.Org{}
	for _, e := range es {
		var o org
		if decodeJSON(e.Value, &o) != nil || !(p.Admin || p.Org == o.Slug) {
			continue
		}
		out = append(out, api.Org{Slug: o.Slug, Name: o.Name, CreatedAt: o.CreatedAt.Format(time.RFC3339)})
	}
	httpapi.WriteJSON(w, http.StatusOK, map[string][]api.Org{"orgs": out})
	return nil
}

// createToken is POST /v1/tokens: an admin mints a token for any org, or
// another admin token; an org's read-write token mints tokens for its own
// org (narrower or equal, expiring no later than itself).
func (s *Server) createToken(w http.ResponseWriter, r *http.Request) error {
	p := caller(r.Context())
	var in api.CreateTokenInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	switch {
	case p.ReadOnly || (!p.Admin && p.App != ""):
		return api.Errorf(http.StatusForbidden, "this token cannot create tokens")
	case in.Admin && !p.Admin:
		return api.Errorf(http.StatusForbidden, "only an admin token can mint admin tokens")
	case in.Admin && (in.OrgSlug != "" || in.App != "" || in.ReadOnly):
		return api.Errorf(http.StatusUnprocessableEntity, "admin: an admin token has no org_slug, app or read_only")
	case in.OrgSlug == "" && !in.Admin:
		return api.Errorf(http.StatusUnprocessableEntity, "org_slug is required")
	case !p.Admin && in.OrgSlug != p.Org:
		return api.Errorf(http.StatusNotFound, "org %s not found", clipName(in.OrgSlug))
	case len(in.Name) > api.MaxNameLen:
		return api.Errorf(http.StatusUnprocessableEntity, "name: at most %d bytes", api.MaxNameLen)
	}
	now := s.cfg.Now()
	exp, err := tokenExpiry(in, p, now)
	if err != nil {
		return err
	}
	if !in.Admin {
		if _, _, err := catalog.GetJSON[org](r.Context(), s.orgs, in.OrgSlug); err != nil || !validSlug.MatchString(in.OrgSlug) {
			return api.Errorf(http.StatusNotFound, "org %s not found", clipName(in.OrgSlug))
		}
	}
	if in.App != "" {
		if a, err := s.appFor(r.Context(), in.App, false); err != nil || a.Org != in.OrgSlug {
			return api.Errorf(http.StatusNotFound, "app %s not found", clipName(in.App))
		}
	}
	t := token{Name: in.Name, Admin: in.Admin, Org: in.OrgSlug, App: in.App, ReadOnly: in.ReadOnly, Expires: exp}
	raw, err := s.CreateToken(r.Context(), t)
	if err != nil {
		return err
	}
	t.Created = now
	httpapi.WriteJSON(w, http.StatusCreated, api.Token{Token: raw, TokenInfo: t.info(tokenKey(raw))})
	return nil
}

// createApp is POST /v1/apps.
func (s *Server) createApp(w http.ResponseWriter, r *http.Request) error {
	p := caller(r.Context())
	var in api.CreateAppInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	name := cmpOr(in.AppName, in.Name)
	switch {
	case p.ReadOnly || (!p.Admin && p.App != ""):
		return api.Errorf(http.StatusForbidden, "this token cannot create apps")
	case in.OrgSlug == "":
		return api.Errorf(http.StatusUnprocessableEntity, "org_slug is required")
	case !p.Admin && in.OrgSlug != p.Org:
		return api.Errorf(http.StatusNotFound, "org %s not found", clipName(in.OrgSlug))
	case !validSlug.MatchString(name):
		return api.Errorf(http.StatusUnprocessableEntity, "app_name %q: use 1-63 lowercase letters, digits and -", clipName(name))
	}
	if _, _, err := catalog.GetJSON[org](r.Context(), s.orgs, in.OrgSlug); err != nil {
		if !validSlug.MatchString(in.OrgSlug) || errors.Is(err, catalog.ErrNotFound) {
			return api.Errorf(http.StatusNotFound, "org %s not found", clipName(in.OrgSlug))
		}
		return err
	}
	a, _, err := catalog.UpdateJSON(r.Context(), s.apps, name, func(v *app, exists bool) error {
		if exists {
			return api.Errorf(http.StatusConflict, "app name %s is taken", name)
		}
		*v = app{ID: strings.ToLower(ulid.Make().String()), Name: name, Org: in.OrgSlug, Network: in.Network, CreatedAt: s.cfg.Now().UTC()}
		return nil
	})
	if err != nil {
		return err
	}
	s.log.Info("app created", "app", name, "org", in.OrgSlug)
	httpapi.WriteJSON(w, http.StatusCreated, s.appView(r.Context(), a))
	return nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// appView is an app as the API shows it, with its machine count.
func (s *Server) appView(ctx context.Context, a app) api.App {
	out := api.App{
		ID: a.ID, Name: a.Name, Network: a.Network, Status: "pending",
		Organization: api.AppOrg{Name: a.Org, Slug: a.Org}, CreatedAt: a.CreatedAt.Format(time.RFC3339),
	}
	if es, err := s.entries(ctx, a); err == nil {
		out.MachineCount = int64(len(es))
		if len(es) > 0 {
			out.Status = "deployed"
		}
	}
	return out
}

// listApps is GET /v1/apps?org_slug=: the apps of an org the caller may see.
func (s *Server) listApps(w http.ResponseWriter, r *http.Request) error {
	p := caller(r.Context())
	orgSlug := r.URL.Query().Get("org_slug")
	if orgSlug == "" && !p.Admin {
		orgSlug = p.Org
	}
	es, err := s.apps.List(r.Context(), "")
	if err != nil {
		return err
	}
	out := api.ListAppsResponse{Apps: []api.App{}}
	for _, e := range es {
		var a app
		if decodeJSON(e.Value, &a) != nil || !p.canSee(a.Org, a.Name) || (orgSlug != "" && a.Org != orgSlug) {
			continue
		}
		out.Apps = append(out.Apps, s.appView(r.Context(), a))
	}
	slices.SortFunc(out.Apps, func(a, b api.App) int { return strings.Compare(a.Name, b.Name) })
	out.TotalApps = len(out.Apps)
	httpapi.WriteJSON(w, http.StatusOK, out)
	return nil
}

// getApp is GET /v1/apps/{app}.
func (s *Server) getApp(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, s.appView(r.Context(), a))
	return nil
}

// deleteApp is DELETE /v1/apps/{app}: it forgets the app first (so nothing
// new can reach it, and a new app of the same name is another app), then
// destroys its machines (forcibly) and forgets its groups and secrets.
// Machines it could not destroy now are left to the reconciler, which
// destroys machines whose app is gone.
func (s *Server) deleteApp(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	a, err := s.appFor(ctx, r.PathValue("app"), true)
	if err != nil {
		return err
	}
	if caller(ctx).App != "" {
		return api.Errorf(http.StatusForbidden, "an app-scoped token cannot delete its app")
	}
	if err := s.apps.Delete(ctx, a.Name, 0); err != nil {
		return err
	}
	es, err := s.entries(ctx, a)
	if err != nil {
		return err
	}
	for _, e := range es {
		if err := s.destroy(ctx, e, true); err != nil && !errors.Is(err, api.ErrNotFound) {
			s.log.Warn("delete app: destroy machine; the reconciler will retry", "app", a.Name, "machine", e.ID, "err", err)
		}
	}
	gs, err := s.groups.List(ctx, a.Name+".")
	if err != nil {
		return err
	}
	for _, g := range gs {
		if err := s.groups.Delete(ctx, g.Key, g.Revision); err != nil && !errors.Is(err, catalog.ErrConflict) {
			return err
		}
	}
	if err := s.releaseTCPPorts(ctx, a, nil); err != nil {
		return err
	}
	if _, err := s.releaseHostnames(ctx, a, ""); err != nil {
		return err
	}
	if e, err := s.secrets.Get(ctx, a.Name); err == nil {
		if err := s.secrets.Delete(ctx, a.Name, e.Revision); err != nil && !errors.Is(err, catalog.ErrConflict) {
			return err
		}
	}
	s.log.Info("app deleted", "app", a.Name, "machines", len(es))
	w.WriteHeader(http.StatusAccepted)
	return nil
}
