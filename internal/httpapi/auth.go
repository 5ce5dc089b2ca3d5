package httpapi

import (
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/flamehq/flame/api"
)

// TokenAuth returns an Authenticate function that accepts requests carrying
// token as "Authorization: Bearer <token>" or "Authorization: FlyV1 <token>"
// (the two schemes Fly's clients send). The comparison takes the same time
// whatever the presented token. An empty token accepts nothing.
func TokenAuth(token string) func(*http.Request) error {
	want := []byte(token)
	return func(r *http.Request) error {
		h := r.Header.Get("Authorization")
		if h == "" {
			return api.Errorf(http.StatusUnauthorized, "missing Authorization header")
		}
		scheme, got, ok := strings.Cut(strings.TrimSpace(h), " ")
		if !ok || !(strings.EqualFold(scheme, "Bearer") || strings.EqualFold(scheme, "FlyV1")) {
			return api.Errorf(http.StatusUnauthorized, "unsupported Authorization scheme: want Bearer or FlyV1")
		}
		got = strings.TrimSpace(got)
		if len(want) == 0 || subtle.ConstantTimeCompare([]byte(got), want) != 1 {
			return api.Errorf(http.StatusUnauthorized, "invalid token")
		}
		return nil
	}
}
