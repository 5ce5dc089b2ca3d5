package httpapi

import (
	"context"
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/flamehq/flame/api"
)

// TokenAuth returns an Authenticate function that accepts requests carrying
// token as "Authorization: Bearer <token>" or "Authorization: FlyV1 <token>"
// (the two schemes Fly's clients send). The comparison takes the same time
// whatever the presented token. An empty token accepts nothing.
func TokenAuth(token string) func(*http.Request) (context.Context, error) {
	want := []byte(token)
	return func(r *http.Request) (context.Context, error) {
		got, err := BearerToken(r)
		if err != nil {
			return nil, err
		}
		if len(want) == 0 || subtle.ConstantTimeCompare([]byte(got), want) != 1 {
			return nil, api.Errorf(http.StatusUnauthorized, "invalid token")
		}
		return r.Context(), nil
	}
}

// BearerToken returns the token a request presents as "Authorization:
// Bearer <token>" or "Authorization: FlyV1 <token>", or a 401 saying what is
// wrong with the header.
func BearerToken(r *http.Request) (string, error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return "", api.Errorf(http.StatusUnauthorized, "missing Authorization header")
	}
	scheme, got, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !(strings.EqualFold(scheme, "Bearer") || strings.EqualFold(scheme, "FlyV1")) {
		return "", api.Errorf(http.StatusUnauthorized, "unsupported Authorization scheme: want Bearer or FlyV1")
	}
	got = strings.TrimSpace(got)
	if got == "" {
		return "", api.Errorf(http.StatusUnauthorized, "empty token")
	}
	return got, nil
}
