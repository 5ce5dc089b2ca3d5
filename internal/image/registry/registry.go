// Package registry is Flame's embedded OCI distribution registry (/v2/…):
// go-containerregistry's protocol handler with blobs and manifests kept on
// disk, so images survive a restart; repositories owned by orgs
// (<org>/<name>), each token reaching only its org's and the public ones;
// uploads streamed to disk under a size cap, checked against their digest,
// and abandoned sessions expired.
package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/flamehq/flame/internal/atomicfile"
)

// maxManifest bounds the size of a manifest a client may push.
const maxManifest = 4 << 20

// Config configures a Registry.
type Config struct {
	// Dir holds the registry's data: blobs/ (content by digest), repos/
	// (each repository's manifests, tags and the blobs it may serve) and
	// uploads/ (uploads in progress). Created if missing.
	Dir string
	// Logger receives a line per request at debug level; nil discards.
	Logger *slog.Logger
	// Auth, when set, says what the token of a request may do (see Scope):
	// the token is sent as "Authorization: Bearer <token>" or as the
	// password of Basic auth (as `docker login` sends it). It returns
	// ErrUnauthorized for a token it does not know. Nil lets every request
	// do everything.
	Auth func(ctx context.Context, token string) (Scope, error)
	// MaxBlobSize bounds one blob (a layer): an upload past it is answered
	// 413 and what it sent is removed. Default 4 GiB.
	MaxBlobSize int64
	// UploadTimeout is how long an upload session may sit idle before it
	// is abandoned and its data removed. Default 15 minutes.
	UploadTimeout time.Duration
	// MaxUploadsPerOrg bounds the upload sessions open at once per org
	// (admins count as one org); MaxUploads bounds them in all. Past
	// either, a new session is answered 429. Defaults 16 and 256.
	MaxUploadsPerOrg, MaxUploads int
	// Now is the clock upload sessions expire by (default time.Now).
	Now func() time.Time
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MaxBlobSize == 0 {
		c.MaxBlobSize = 4 << 30
	}
	if c.UploadTimeout == 0 {
		c.UploadTimeout = 15 * time.Minute
	}
	if c.MaxUploadsPerOrg == 0 {
		c.MaxUploadsPerOrg = 16
	}
	if c.MaxUploads == 0 {
		c.MaxUploads = 256
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Validate reports what is wrong with c.
func (c Config) Validate() error {
	switch {
	case c.Dir == "":
		return errors.New("registry: Dir is required")
	case c.MaxBlobSize < 0, c.UploadTimeout < 0, c.MaxUploadsPerOrg < 0, c.MaxUploads < 0:
		return errors.New("registry: limits must not be negative")
	}
	return nil
}

// Registry serves the OCI distribution API. It is an http.Handler meant to
// be mounted at the site root (it answers /v2/…).
type Registry struct {
	cfg    Config
	dir    string
	log    *slog.Logger
	inner  http.Handler
	blobs  *diskBlobs
	mu     sync.Mutex // serializes manifest writes and deletes on disk
	loaded int        // manifests loaded from disk at start

	uploads uploads
}

// New opens (or creates) the registry stored in cfg.Dir and loads every
// manifest it holds.
func New(cfg Config) (*Registry, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	logger := cfg.Logger
	blobs := &diskBlobs{dir: filepath.Join(cfg.Dir, "blobs"), repos: filepath.Join(cfg.Dir, "repos")}
	// Uploads do not survive a restart: their sessions are in memory.
	os.RemoveAll(filepath.Join(cfg.Dir, "uploads"))
	for _, d := range []string{blobs.dir, filepath.Join(blobs.dir, "tmp"), blobs.repos, filepath.Join(cfg.Dir, "uploads")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
	}
	// Leftovers of uploads interrupted by a crash.
	if tmps, err := os.ReadDir(filepath.Join(blobs.dir, "tmp")); err == nil {
		for _, e := range tmps {
			os.Remove(filepath.Join(blobs.dir, "tmp", e.Name()))
		}
	}
	r := &Registry{
		cfg:     cfg,
		dir:     cfg.Dir,
		log:     logger,
		blobs:   blobs,
		uploads: uploads{sessions: map[string]*upload{}},
		inner: ggcr.New(
			ggcr.Logger(slog.NewLogLogger(logger.Handler(), slog.LevelDebug)),
			ggcr.WithBlobHandler(blobs),
		),
	}
	if err := r.load(); err != nil {
		return nil, fmt.Errorf("registry: load %s: %w", cfg.Dir, err)
	}
	return r, nil
}

// Loaded reports how many manifests New found on disk.
func (r *Registry) Loaded() int { return r.loaded }

var (
	// From the OCI distribution spec.
	repoRE   = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRE    = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
)

// ServeHTTP checks the token, the names and the token's reach into the
// repository, keeps manifests on disk, streams uploads to disk, and hands
// the rest of the protocol to the inner handler.
func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if !strings.HasPrefix(req.URL.Path, "/v2") {
		writeError(w, http.StatusNotFound, "NOT_FOUND", "not a registry path")
		return
	}
	r.uploads.sweep(r, r.cfg.Now())
	scope := Scope{Admin: true}
	if r.cfg.Auth != nil {
		var err error
		scope, err = r.cfg.Auth(req.Context(), token(req))
		switch {
		case errors.Is(err, ErrUnauthorized):
			w.Header().Set("WWW-Authenticate", `Basic realm="flame"`)
			writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "a valid token is required")
			return
		case err != nil:
			r.log.Warn("token check failed", "err", err)
			writeError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "the token could not be checked, try again")
			return
		}
	}
	push := req.Method != http.MethodGet && req.Method != http.MethodHead
	if push && scope.ReadOnly {
		writeError(w, http.StatusForbidden, "DENIED", "this token is read-only")
		return
	}
	r.log.Debug("request", "method", req.Method, "path", req.URL.Path)
	repo, kind, target, ok := splitPath(req.URL.Path)
	if !ok {
		if strings.TrimSuffix(req.URL.Path, "/") == "/v2/_catalog" {
			r.catalog(w, req, scope)
			return
		}
		r.inner.ServeHTTP(w, req)
		return
	}
	if !repoRE.MatchString(repo) || len(repo) > 255 {
		writeError(w, http.StatusBadRequest, "NAME_INVALID", fmt.Sprintf("invalid repository name %q", repo))
		return
	}
	// Who owns a repository follows from its name, so a write outside
	// the token's namespace is refused as such; a read of another org's
	// repository is told it does not exist, whether it does or not.
	if push && !scope.MayPush(repo) {
		msg := fmt.Sprintf("this token may not push to %s: repositories are named <org>/<name>", repo)
		if scope.Org != "" {
			msg = fmt.Sprintf("this token may push only to %s/<name>, not %s", scope.Org, repo)
		}
		writeError(w, http.StatusForbidden, "DENIED", msg)
		return
	}
	if !scope.MayPull(repo) {
		writeError(w, http.StatusNotFound, "NAME_UNKNOWN", fmt.Sprintf("repository %s not found", repo))
		return
	}
	if kind == "manifests" {
		if !tagRE.MatchString(target) && !digestRE.MatchString(target) {
			writeError(w, http.StatusBadRequest, "MANIFEST_INVALID", fmt.Sprintf("invalid tag or digest %q", target))
			return
		}
		switch req.Method {
		case http.MethodPut:
			r.putManifest(w, req, repo, target)
			return
		case http.MethodDelete:
			r.deleteManifest(w, req, repo, target)
			return
		}
	}
	if kind == "blobs" {
		if target == "uploads" || strings.HasPrefix(target, "uploads/") {
			r.serveUpload(w, req, scope, repo, strings.TrimPrefix(strings.TrimPrefix(target, "uploads"), "/"))
			return
		}
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			// Manifests live in the blob store too; blobs are removed only
			// by a future garbage collection, never one at a time.
			writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "blob deletion is not supported")
			return
		}
	}
	r.inner.ServeHTTP(w, req)
}

// splitPath splits /v2/<repo>/<kind>/<target> for kind manifests, blobs,
// tags; ok is false for other paths (/v2/, /v2/_catalog).
func splitPath(p string) (repo, kind, target string, ok bool) {
	elems := strings.Split(strings.TrimSuffix(strings.TrimPrefix(p, "/v2/"), "/"), "/")
	for i := len(elems) - 2; i >= 1; i-- {
		switch elems[i] {
		case "manifests", "tags", "referrers":
			if i == len(elems)-2 {
				return strings.Join(elems[:i], "/"), elems[i], elems[i+1], true
			}
		case "blobs":
			return strings.Join(elems[:i], "/"), elems[i], strings.Join(elems[i+1:], "/"), true
		}
	}
	return "", "", "", false
}

func token(req *http.Request) string {
	h := req.Header.Get("Authorization")
	if t, ok := strings.CutPrefix(h, "Bearer "); ok {
		return t
	}
	if b, ok := strings.CutPrefix(h, "Basic "); ok {
		raw, err := base64.StdEncoding.DecodeString(b)
		if err != nil {
			return ""
		}
		_, pass, _ := strings.Cut(string(raw), ":")
		return pass
	}
	return ""
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{
		"errors": []map[string]string{{"code": code, "message": msg}},
	})
}

// putManifest verifies a pushed manifest (its digest when pushed by
// digest, the blobs it references), writes it to disk, then registers it
// with the inner handler.
func (r *Registry) putManifest(w http.ResponseWriter, req *http.Request, repo, target string) {
	body, err := io.ReadAll(io.LimitReader(req.Body, maxManifest+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, "MANIFEST_INVALID", err.Error())
		return
	}
	if len(body) > maxManifest {
		writeError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", "manifest too large")
		return
	}
	sum := sha256.Sum256(body)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if strings.HasPrefix(target, "sha256:") && target != digest {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("manifest pushed as %s has digest %s", target, digest))
		return
	}
	ctype := req.Header.Get("Content-Type")
	if code, msg := r.checkManifest(repo, types.MediaType(ctype), body); code != "" {
		status := http.StatusBadRequest
		if code == "MANIFEST_BLOB_UNKNOWN" || code == "MANIFEST_UNKNOWN" {
			status = http.StatusNotFound
		}
		writeError(w, status, code, msg)
		return
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.storeManifest(repo, target, digest, ctype, body); err != nil {
		r.log.Error("store manifest", "repo", repo, "target", target, "err", err)
		writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "storing the manifest failed")
		return
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	r.inner.ServeHTTP(w, req)
}

// checkManifest returns an error code and message when body is not a
// manifest whose referenced content is present.
func (r *Registry) checkManifest(repo string, mt types.MediaType, body []byte) (code, msg string) {
	switch {
	case mt.IsIndex():
		im, err := v1.ParseIndexManifest(bytes.NewReader(body))
		if err != nil {
			return "MANIFEST_INVALID", err.Error()
		}
		for _, d := range im.Manifests {
			if (d.MediaType.IsImage() || d.MediaType.IsIndex()) && !r.hasManifest(repo, d.Digest.String()) {
				return "MANIFEST_UNKNOWN", fmt.Sprintf("index references manifest %s, not in %s", d.Digest, repo)
			}
		}
	case mt.IsImage() || mt == types.OCIManifestSchema1 || mt == "":
		m, err := v1.ParseManifest(bytes.NewReader(body))
		if err != nil {
			return "MANIFEST_INVALID", err.Error()
		}
		if m.SchemaVersion != 2 {
			return "MANIFEST_INVALID", fmt.Sprintf("schemaVersion %d is not supported", m.SchemaVersion)
		}
		for _, d := range append([]v1.Descriptor{m.Config}, m.Layers...) {
			if !d.MediaType.IsDistributable() {
				continue
			}
			if _, err := r.blobs.stat(repo, d.Digest); err != nil {
				return "MANIFEST_BLOB_UNKNOWN", fmt.Sprintf("manifest references blob %s, which was not uploaded to %s", d.Digest, repo)
			}
		}
	default:
		if !json.Valid(body) {
			return "MANIFEST_INVALID", "manifest is not JSON"
		}
	}
	return "", ""
}

// A repository on disk: repos/<repo>/_manifests/sha256/<hex> holds the
// manifest's media type (its bytes are the blob of that digest),
// repos/<repo>/_tags/<tag> the digest the tag points to, and
// repos/<repo>/_layers/sha256/<hex> (empty) lets it serve that blob.

func (r *Registry) repoDir(repo string) string {
	return filepath.Join(r.dir, "repos", filepath.FromSlash(repo))
}

func (r *Registry) hasManifest(repo, digest string) bool {
	_, err := os.Stat(filepath.Join(r.repoDir(repo), "_manifests", "sha256", strings.TrimPrefix(digest, "sha256:")))
	return err == nil
}

func (r *Registry) storeManifest(repo, target, digest, ctype string, body []byte) error {
	h, _ := v1.NewHash(digest)
	if err := r.blobs.write(h, bytes.NewReader(body)); err != nil {
		return err
	}
	if err := r.blobs.link(repo, h); err != nil {
		return err
	}
	dir := r.repoDir(repo)
	if err := atomicfile.Write(filepath.Join(dir, "_manifests", "sha256", h.Hex), []byte(ctype), ""); err != nil {
		return err
	}
	if !strings.HasPrefix(target, "sha256:") {
		return atomicfile.Write(filepath.Join(dir, "_tags", target), []byte(digest), "")
	}
	return nil
}

func (r *Registry) deleteManifest(w http.ResponseWriter, req *http.Request, repo, target string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec := &statusRecorder{ResponseWriter: w}
	r.inner.ServeHTTP(rec, req)
	if rec.status/100 != 2 {
		return
	}
	p := filepath.Join(r.repoDir(repo), "_tags", target)
	if strings.HasPrefix(target, "sha256:") {
		p = filepath.Join(r.repoDir(repo), "_manifests", "sha256", strings.TrimPrefix(target, "sha256:"))
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.log.Error("delete manifest", "repo", repo, "target", target, "err", err)
	}
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// load replays every manifest and tag on disk into the inner handler:
// manifests by digest first (images before the indexes that list them),
// then tags.
func (r *Registry) load() error {
	type stored struct{ repo, digest, ctype string }
	var manifests []stored
	tags := map[string]map[string]string{} // repo → tag → digest
	root := filepath.Join(r.dir, "repos")
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if strings.HasPrefix(d.Name(), ".tmp-") {
			os.Remove(p)
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		parts := strings.Split(filepath.ToSlash(rel), "/")
		n := len(parts)
		switch {
		case n >= 4 && parts[n-3] == "_manifests" && parts[n-2] == "sha256":
			ctype, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			manifests = append(manifests, stored{strings.Join(parts[:n-3], "/"), "sha256:" + parts[n-1], string(ctype)})
		case n >= 3 && parts[n-2] == "_tags":
			digest, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			repo := strings.Join(parts[:n-2], "/")
			if tags[repo] == nil {
				tags[repo] = map[string]string{}
			}
			tags[repo][parts[n-1]] = string(digest)
		}
		return nil
	})
	if err != nil {
		return err
	}
	ctypes := map[string]string{}
	put := func(repo, target, digest string) error {
		h, err := v1.NewHash(digest)
		if err != nil {
			return err
		}
		body, err := os.ReadFile(r.blobs.path(h))
		if err != nil {
			return fmt.Errorf("manifest %s of %s: %w", digest, repo, err)
		}
		// Registries written before blobs were linked to repositories:
		// a repository serves what its manifests reference.
		if err := r.linkReferenced(repo, h, ctypes[repo+"@"+digest], body); err != nil {
			return fmt.Errorf("manifest %s of %s: %w", digest, repo, err)
		}
		req, _ := http.NewRequest(http.MethodPut, "/v2/"+repo+"/manifests/"+target, bytes.NewReader(body))
		req.Header.Set("Content-Type", ctypes[repo+"@"+digest])
		rec := &bufferedResponse{header: http.Header{}}
		r.inner.ServeHTTP(rec, req)
		if rec.status != http.StatusCreated {
			return fmt.Errorf("manifest %s of %s: status %d: %s", digest, repo, rec.status, rec.body.String())
		}
		r.loaded++
		return nil
	}
	for _, m := range manifests {
		ctypes[m.repo+"@"+m.digest] = m.ctype
	}
	// Images first, then indexes in passes until none is left waiting for
	// a child.
	var pending []stored
	for _, m := range manifests {
		if types.MediaType(m.ctype).IsIndex() {
			pending = append(pending, m)
		} else if err := put(m.repo, m.digest, m.digest); err != nil {
			return err
		}
	}
	for len(pending) > 0 {
		var next []stored
		var lastErr error
		for _, m := range pending {
			if err := put(m.repo, m.digest, m.digest); err != nil {
				next, lastErr = append(next, m), err
			}
		}
		if len(next) == len(pending) {
			return lastErr
		}
		pending = next
	}
	for repo, ts := range tags {
		for tag, digest := range ts {
			if err := put(repo, tag, digest); err != nil {
				return err
			}
			r.loaded-- // a tag is not another manifest
		}
	}
	return nil
}

// linkReferenced links manifest h of repo, and the blobs it references
// that are present, to repo.
func (r *Registry) linkReferenced(repo string, h v1.Hash, ctype string, body []byte) error {
	if err := r.blobs.link(repo, h); err != nil {
		return err
	}
	mt := types.MediaType(ctype)
	if !(mt.IsImage() || mt == types.OCIManifestSchema1 || mt == "") {
		return nil
	}
	m, err := v1.ParseManifest(bytes.NewReader(body))
	if err != nil {
		return nil // served as it is; the protocol handler judges it
	}
	for _, d := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		if _, err := r.blobs.size(d.Digest); err == nil {
			if err := r.blobs.link(repo, d.Digest); err != nil {
				return err
			}
		}
	}
	return nil
}

type bufferedResponse struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (b *bufferedResponse) Header() http.Header { return b.header }
func (b *bufferedResponse) Write(p []byte) (int, error) {
	if b.status == 0 {
		b.status = http.StatusOK
	}
	return b.body.Write(p)
}
func (b *bufferedResponse) WriteHeader(code int) { b.status = code }
