package server

import (
	"net/http"

	"github.com/flamehq/flame/api"
)

// RequireAdmin checks that r carries an admin token, for handlers served
// beside the API (the dev cluster's chaos API): nil for an admin, a 401 *api.Error
// for no token or an unknown one, a 403 for any other token.
func (s *Server) RequireAdmin(r *http.Request) error {
	ctx, err := s.authenticate(r)
	if err != nil {
		return err
	}
	if !caller(ctx).Admin {
		return api.Errorf(http.StatusForbidden, "this needs the admin token")
	}
	return nil
}
