package server

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
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

// aeadSealer seals secrets with AES-256-GCM. The app's id and the secret's
// name are the additional data, so a sealed value cannot be moved to another
// secret or another app. Digests are HMACs under a key derived from the same
// key, so a digest shown to a read-only token cannot be used to guess a
// weak secret offline.
type aeadSealer struct {
	gcm     cipher.AEAD
	hmacKey []byte
}

func newSealer(key []byte) (aeadSealer, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return aeadSealer{}, fmt.Errorf("server: secret key: %w", err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return aeadSealer{}, err
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte("flame secret digests"))
	return aeadSealer{gcm: g, hmacKey: m.Sum(nil)}, nil
}

func (a aeadSealer) seal(appID, name, plain string) []byte {
	nonce := make([]byte, a.gcm.NonceSize(), a.gcm.NonceSize()+len(plain)+a.gcm.Overhead())
	rand.Read(nonce)
	return a.gcm.Seal(nonce, nonce, []byte(plain), []byte(appID+"\x00"+name))
}

func (a aeadSealer) open(appID, name string, sealed []byte) (string, error) {
	n := a.gcm.NonceSize()
	if len(sealed) < n {
		return "", errors.New("sealed secret too short")
	}
	b, err := a.gcm.Open(nil, sealed[:n], sealed[n:], []byte(appID+"\x00"+name))
	if err != nil {
		return "", fmt.Errorf("open secret %s: %w (is every server using the same secret key?)", name, err)
	}
	return string(b), nil
}

// digest tells versions of a secret apart without revealing it.
func (a aeadSealer) digest(plain string) string {
	m := hmac.New(sha256.New, a.hmacKey)
	m.Write([]byte(plain))
	return hex.EncodeToString(m.Sum(nil)[:8])
}

// Secret names are environment variable names.
var validSecretName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)

// maxSecretBytes bounds one secret's value.
const maxSecretBytes = 64 << 10

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
func (s *Server) changeSecrets(ctx context.Context, a app, values map[string]*string) (appSecrets, error) {
	for name, v := range values {
		if !validSecretName.MatchString(name) {
			return appSecrets{}, api.Errorf(http.StatusBadRequest, "secret name %q: use letters, digits and _, not starting with a digit", clipName(name))
		}
		if v != nil && len(*v) > maxSecretBytes {
			return appSecrets{}, api.Errorf(http.StatusBadRequest, "secret %s is larger than %d bytes", name, maxSecretBytes)
		}
	}
	now := s.cfg.Now().UTC()
	as, _, err := catalog.UpdateJSON(ctx, s.secrets, a.Name, func(as *appSecrets, _ bool) error {
		if as.AppID != a.ID {
			// Left from an earlier app of the same name: not this one's.
			*as = appSecrets{AppID: a.ID, Version: as.Version}
		}
		if as.Values == nil {
			as.Values = map[string]sealedSecret{}
		}
		for name, v := range values {
			if v == nil {
				delete(as.Values, name)
				continue
			}
			prev, had := as.Values[name]
			sec := sealedSecret{Sealed: s.aead.seal(a.ID, name, *v), Digest: s.aead.digest(*v), CreatedAt: now, UpdatedAt: now}
			if had {
				sec.CreatedAt = prev.CreatedAt
			}
			as.Values[name] = sec
		}
		if err := s.secretsFit(as, values); err != nil {
			return err
		}
		as.Version++
		return nil
	})
	return as, err
}

// secretsFit refuses (422) a change that sets secrets when the app's
// secrets would then be past api.MaxSecrets or api.MaxSecretsBytes; a
// change that only deletes is always allowed.
func (s *Server) secretsFit(as *appSecrets, values map[string]*string) error {
	sets := false
	for _, v := range values {
		sets = sets || v != nil
	}
	if !sets {
		return nil
	}
	if len(as.Values) > api.MaxSecrets {
		return api.Errorf(http.StatusUnprocessableEntity, "secrets: an app may have at most %d, not %d", api.MaxSecrets, len(as.Values))
	}
	overhead := s.aead.gcm.NonceSize() + s.aead.gcm.Overhead()
	total := 0
	for name, v := range as.Values {
		total += len(name) + 1 + max(len(v.Sealed)-overhead, 0) + 1
	}
	if total > api.MaxSecretsBytes {
		return api.Errorf(http.StatusUnprocessableEntity, "secrets: together they would take %d bytes of the environment; at most %d are allowed", total, api.MaxSecretsBytes)
	}
	return nil
}

// plainSecrets opens an app's secrets for a machine's environment.
func (s *Server) plainSecrets(ctx context.Context, a app) (map[string]string, error) {
	as, err := s.loadSecrets(ctx, a)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(as.Values))
	for name, v := range as.Values {
		if out[name], err = s.aead.open(a.ID, name, v.Sealed); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// loadSecrets returns the app's sealed secrets (none when what is stored
// belongs to an earlier app of the same name).
func (s *Server) loadSecrets(ctx context.Context, a app) (appSecrets, error) {
	as, _, err := catalog.GetJSON[appSecrets](ctx, s.secrets, a.Name)
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && as.AppID != a.ID) {
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
	as, err := s.loadSecrets(r.Context(), a)
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
	as, err := s.loadSecrets(r.Context(), a)
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
	as, err := s.changeSecrets(r.Context(), a, in.Values)
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
	as, err := s.changeSecrets(r.Context(), a, map[string]*string{name: &in.Value})
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
	cur, err := s.loadSecrets(r.Context(), a)
	if err != nil {
		return err
	}
	if _, ok := cur.Values[name]; !ok {
		return api.Errorf(http.StatusNotFound, "secret %s not found", clipName(name))
	}
	as, err := s.changeSecrets(r.Context(), a, map[string]*string{name: nil})
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.DeleteSecretResponse{Version: as.Version})
	return nil
}

// checkSecretKey opens one secret already in the catalog, if there is one:
// a control plane started with another key than the others would fail
// every create of an app with secrets.
func (s *Server) checkSecretKey(ctx context.Context) error {
	es, err := s.secrets.List(ctx, "")
	if err != nil {
		return err
	}
	for _, e := range es {
		var as appSecrets
		if decodeJSON(e.Value, &as) != nil {
			continue
		}
		for name, v := range as.Values {
			if _, err := s.aead.open(as.AppID, name, v.Sealed); err != nil {
				return fmt.Errorf("the secret key does not open the secrets in the catalog (%s of %s): give every control plane the same key", name, e.Key)
			}
			return nil
		}
	}
	return nil
}
