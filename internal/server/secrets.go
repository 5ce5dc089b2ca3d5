package server

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
)

// aeadSealer seals secrets with AES-256-GCM. The app and secret name are the
// additional data, so a sealed value cannot be moved to another secret.
type aeadSealer struct{ gcm cipher.AEAD }

func newSealer(key []byte) (aeadSealer, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return aeadSealer{}, fmt.Errorf("server: secret key: %w", err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return aeadSealer{}, err
	}
	return aeadSealer{g}, nil
}

func (a aeadSealer) seal(appName, name, plain string) []byte {
	nonce := make([]byte, a.gcm.NonceSize(), a.gcm.NonceSize()+len(plain)+a.gcm.Overhead())
	rand.Read(nonce)
	return a.gcm.Seal(nonce, nonce, []byte(plain), []byte(appName+"\x00"+name))
}

func (a aeadSealer) open(appName, name string, sealed []byte) (string, error) {
	n := a.gcm.NonceSize()
	if len(sealed) < n {
		return "", errors.New("sealed secret too short")
	}
	b, err := a.gcm.Open(nil, sealed[:n], sealed[n:], []byte(appName+"\x00"+name))
	if err != nil {
		return "", fmt.Errorf("open secret %s of %s: %w", name, appName, err)
	}
	return string(b), nil
}

// Secret names are environment variable names.
var validSecretName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)

// maxSecretBytes bounds one secret's value.
const maxSecretBytes = 64 << 10

func secretDigest(plain string) string {
	h := sha256.Sum256([]byte(plain))
	return hex.EncodeToString(h[:8])
}

func secretView(name string, s sealedSecret) api.AppSecret {
	return api.AppSecret{Name: name, Digest: s.Digest,
		CreatedAt: s.CreatedAt.Format(time.RFC3339), UpdatedAt: s.UpdatedAt.Format(time.RFC3339)}
}

func secretsView(as appSecrets) []api.AppSecret {
	out := make([]api.AppSecret, 0, len(as.Values))
	for name, v := range as.Values {
		out = append(out, secretView(name, v))
	}
	slices.SortFunc(out, func(a, b api.AppSecret) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// changeSecrets applies values (nil deletes) to an app's secrets in one
// compare-and-swap and returns the new set.
func (s *Server) changeSecrets(ctx context.Context, appName string, values map[string]*string) (appSecrets, error) {
	for name, v := range values {
		if !validSecretName.MatchString(name) {
			return appSecrets{}, api.Errorf(http.StatusBadRequest, "secret name %q: use letters, digits and _, not starting with a digit", clipName(name))
		}
		if v != nil && len(*v) > maxSecretBytes {
			return appSecrets{}, api.Errorf(http.StatusBadRequest, "secret %s is larger than %d bytes", name, maxSecretBytes)
		}
	}
	now := s.cfg.Now().UTC()
	as, _, err := catalog.UpdateJSON(ctx, s.secrets, appName, func(as *appSecrets, _ bool) error {
		if as.Values == nil {
			as.Values = map[string]sealedSecret{}
		}
		for name, v := range values {
			if v == nil {
				delete(as.Values, name)
				continue
			}
			prev, had := as.Values[name]
			sec := sealedSecret{Sealed: s.aead.seal(appName, name, *v), Digest: secretDigest(*v), CreatedAt: now, UpdatedAt: now}
			if had {
				sec.CreatedAt = prev.CreatedAt
			}
			as.Values[name] = sec
		}
		as.Version++
		return nil
	})
	return as, err
}

// plainSecrets opens an app's secrets for a machine's environment.
func (s *Server) plainSecrets(ctx context.Context, appName string) (map[string]string, error) {
	as, _, err := catalog.GetJSON[appSecrets](ctx, s.secrets, appName)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(as.Values))
	for name, v := range as.Values {
		if out[name], err = s.aead.open(appName, name, v.Sealed); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (s *Server) loadSecrets(ctx context.Context, appName string) (appSecrets, error) {
	as, _, err := catalog.GetJSON[appSecrets](ctx, s.secrets, appName)
	if errors.Is(err, catalog.ErrNotFound) {
		return appSecrets{}, nil
	}
	return as, err
}

// listSecrets is GET /v1/apps/{app}/secrets: names and digests, never values
// (show_secrets is ignored: secrets are write-only).
func (s *Server) listSecrets(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	as, err := s.loadSecrets(r.Context(), a.Name)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.ListSecretsResponse{Secrets: secretsView(as)})
	return nil
}

func (s *Server) getSecret(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	as, err := s.loadSecrets(r.Context(), a.Name)
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	v, ok := as.Values[name]
	if !ok {
		return api.Errorf(http.StatusNotFound, "secret %s not found", clipName(name))
	}
	httpapi.WriteJSON(w, http.StatusOK, secretView(name, v))
	return nil
}

// updateSecrets is POST /v1/apps/{app}/secrets {values: {NAME: value|null}}.
// Machines created from now on get the new values; running ones keep theirs
// until they are updated (as at Fly, where secrets reach machines by deploy).
func (s *Server) updateSecrets(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	var in api.UpdateSecretsInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	as, err := s.changeSecrets(r.Context(), a.Name, in.Values)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.UpdateSecretsResponse{Secrets: secretsView(as), Version: as.Version})
	return nil
}

func (s *Server) setSecret(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	var in api.SetSecretInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	name := r.PathValue("name")
	as, err := s.changeSecrets(r.Context(), a.Name, map[string]*string{name: &in.Value})
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.SetSecretResponse{AppSecret: secretView(name, as.Values[name]), Version: as.Version})
	return nil
}

func (s *Server) deleteSecret(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	cur, err := s.loadSecrets(r.Context(), a.Name)
	if err != nil {
		return err
	}
	if _, ok := cur.Values[name]; !ok {
		return api.Errorf(http.StatusNotFound, "secret %s not found", clipName(name))
	}
	as, err := s.changeSecrets(r.Context(), a.Name, map[string]*string{name: nil})
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.DeleteSecretResponse{Version: as.Version})
	return nil
}
