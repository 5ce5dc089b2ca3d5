package registry

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Blob uploads (POST, PATCH, PUT under /v2/<repo>/blobs/uploads/) stream to
// a file in uploads/, hashed as they arrive: nothing of a blob is held in
// memory, and one larger than MaxBlobSize is cut off at that size, answered
// 413 and removed. A session lives in memory, belongs to one repository,
// and is abandoned after UploadTimeout without a request; each org may hold
// MaxUploadsPerOrg of them at once.

// upload is one upload session.
type upload struct {
	id, repo, owner string
	path            string

	mu   sync.Mutex // one request of the session at a time
	size int64
	sum  hash.Hash
	last time.Time // of the last request; guarded by uploads.mu
	done bool      // finished, cancelled or abandoned
}

// uploads are the open sessions.
type uploads struct {
	mu       sync.Mutex
	sessions map[string]*upload
	// timer sweeps while sessions are open, so abandoned ones go even
	// when no request comes (every request sweeps too).
	timer   *time.Timer
	closed  bool
	pending sync.WaitGroup // a sweep scheduled or running
}

// arm schedules a sweep a timeout from now unless one is pending; u.mu is
// held.
func (u *uploads) arm(r *Registry) {
	if u.timer != nil || u.closed || len(u.sessions) == 0 {
		return
	}
	u.pending.Add(1)
	u.timer = time.AfterFunc(r.cfg.UploadTimeout+r.cfg.UploadTimeout/8, func() {
		defer u.pending.Done()
		u.mu.Lock()
		u.timer = nil
		u.mu.Unlock()
		u.sweep(r, r.cfg.Now())
		u.mu.Lock()
		u.arm(r)
		u.mu.Unlock()
	})
}

// Close stops the sweeps of upload sessions, waiting for one under way.
// The registry answers on; abandoned sessions then go only when requests
// come.
func (r *Registry) Close() error {
	u := &r.uploads
	u.mu.Lock()
	u.closed = true
	if u.timer != nil && u.timer.Stop() {
		u.pending.Done()
	}
	u.timer = nil
	u.mu.Unlock()
	u.pending.Wait()
	return nil
}

// OpenUploads reports how many upload sessions are open (for tests and metrics).
func (r *Registry) OpenUploads() int {
	r.uploads.mu.Lock()
	defer r.uploads.mu.Unlock()
	return len(r.uploads.sessions)
}

// sweep removes the sessions idle past the timeout at now. A session in
// the middle of a request is not idle.
func (u *uploads) sweep(r *Registry, now time.Time) {
	u.mu.Lock()
	var expired []*upload
	for id, s := range u.sessions {
		if now.Sub(s.last) < r.cfg.UploadTimeout || !s.mu.TryLock() {
			continue
		}
		s.done = true
		s.mu.Unlock()
		delete(u.sessions, id)
		expired = append(expired, s)
	}
	u.mu.Unlock()
	for _, s := range expired {
		os.Remove(s.path)
		r.log.Info("upload abandoned", "repo", s.repo, "id", s.id, "bytes", s.size)
	}
}

// open starts a session of repo for owner, within the limits.
func (u *uploads) open(r *Registry, repo, owner string) (*upload, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, s := range u.sessions {
		if s.owner == owner {
			n++
		}
	}
	switch {
	case n >= r.cfg.MaxUploadsPerOrg:
		return nil, fmt.Errorf("%w: %d are open already; finish or cancel one, or wait %v for an abandoned one to expire", errTooManyUploads, n, r.cfg.UploadTimeout)
	case len(u.sessions) >= r.cfg.MaxUploads:
		return nil, fmt.Errorf("%w: the registry has %d open; try again later", errTooManyUploads, len(u.sessions))
	}
	var b [16]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	s := &upload{id: id, repo: repo, owner: owner, path: filepath.Join(r.dir, "uploads", id),
		sum: sha256.New(), last: r.cfg.Now()}
	f, err := os.OpenFile(s.path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	f.Close()
	u.sessions[id] = s
	u.arm(r)
	return s, nil
}

// get returns repo's session id, locked, marked as active now.
func (u *uploads) get(repo, id string, now time.Time) *upload {
	u.mu.Lock()
	s := u.sessions[id]
	if s != nil {
		s.last = now
	}
	u.mu.Unlock()
	if s == nil || s.repo != repo {
		return nil
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	return s
}

// drop ends a locked session and removes its data.
func (u *uploads) drop(s *upload) {
	s.done = true
	u.mu.Lock()
	delete(u.sessions, s.id)
	u.mu.Unlock()
	os.Remove(s.path)
}

var (
	errTooLarge       = errors.New("blob too large")
	errTooManyUploads = errors.New("too many uploads")
)

// appendBody streams body onto the session's file, at most the cap.
func (r *Registry) appendBody(s *upload, body io.Reader) error {
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	n, err := io.Copy(io.MultiWriter(f, s.sum), io.LimitReader(body, r.cfg.MaxBlobSize-s.size+1))
	s.size += n
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && s.size > r.cfg.MaxBlobSize {
		err = errTooLarge
	}
	return err
}

func owner(scope Scope) string {
	if scope.Admin {
		return ""
	}
	return scope.Org
}

func uploadLocation(repo, id string) string { return "/v2/" + repo + "/blobs/uploads/" + id }

// serveUpload answers the upload requests of repo; id is the session's
// ("" for a POST that starts one).
func (r *Registry) serveUpload(w http.ResponseWriter, req *http.Request, scope Scope, repo, id string) {
	now := r.cfg.Now()
	if id == "" {
		if req.Method != http.MethodPost {
			writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "start an upload with POST")
			return
		}
		if d := req.URL.Query().Get("digest"); d != "" {
			r.monolithic(w, req, repo, d)
			return
		}
		// A cross-repository mount (?mount=&from=) is answered as the
		// spec allows a registry to: with a fresh session, so the blob is
		// uploaded to this repository by someone who has it.
		s, err := r.uploads.open(r, repo, owner(scope))
		if err != nil {
			if errors.Is(err, errTooManyUploads) {
				writeError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", err.Error())
				return
			}
			r.log.Error("open upload", "repo", repo, "err", err)
			writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "starting the upload failed")
			return
		}
		w.Header().Set("Location", uploadLocation(repo, s.id))
		w.Header().Set("Docker-Upload-UUID", s.id)
		w.Header().Set("Range", "0-0")
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusAccepted)
		return
	}
	s := r.uploads.get(repo, id, now)
	if s == nil {
		writeError(w, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "no such upload (finished, cancelled or abandoned)")
		return
	}
	defer s.mu.Unlock()
	progress := func(status int) {
		w.Header().Set("Location", uploadLocation(repo, s.id))
		w.Header().Set("Docker-Upload-UUID", s.id)
		end := s.size - 1
		if end < 0 {
			end = 0
		}
		w.Header().Set("Range", fmt.Sprintf("0-%d", end))
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(status)
	}
	switch req.Method {
	case http.MethodGet:
		progress(http.StatusNoContent)
	case http.MethodDelete:
		r.uploads.drop(s)
		w.WriteHeader(http.StatusNoContent)
	case http.MethodPatch:
		if cr := req.Header.Get("Content-Range"); cr != "" {
			start, ok := rangeStart(cr)
			if !ok || start != s.size {
				w.Header().Set("Range", fmt.Sprintf("0-%d", max(s.size-1, 0)))
				writeError(w, http.StatusRequestedRangeNotSatisfiable, "BLOB_UPLOAD_INVALID",
					fmt.Sprintf("Content-Range %q does not continue the %d bytes received", clip(cr), s.size))
				return
			}
		}
		if !r.uploadChunk(w, s, req.Body) {
			return
		}
		progress(http.StatusAccepted)
	case http.MethodPut:
		h, err := v1.NewHash(req.URL.Query().Get("digest"))
		if err != nil || h.Algorithm != "sha256" {
			writeError(w, http.StatusBadRequest, "DIGEST_INVALID", "digest=sha256:<hex> is required")
			return
		}
		if !r.uploadChunk(w, s, req.Body) {
			return
		}
		got := hex.EncodeToString(s.sum.Sum(nil))
		if got != h.Hex {
			r.uploads.drop(s)
			writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("upload has digest sha256:%s, not %s", got, h))
			return
		}
		if err := r.commitUpload(s.path, repo, h); err != nil {
			r.uploads.drop(s)
			r.log.Error("store blob", "repo", repo, "digest", h, "err", err)
			writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "storing the blob failed")
			return
		}
		r.uploads.drop(s)
		w.Header().Set("Location", "/v2/"+repo+"/blobs/"+h.String())
		w.Header().Set("Docker-Content-Digest", h.String())
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusCreated)
	default:
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "uploads take GET, PATCH, PUT and DELETE")
	}
}

// uploadChunk appends body to s, answering and ending the session when it
// fails: past the cap 413, a broken body 400 — among them one that stopped
// arriving, cut by the server's bound between body reads (httpserve), so a
// stalled upload does not hold its session.
func (r *Registry) uploadChunk(w http.ResponseWriter, s *upload, body io.Reader) bool {
	err := r.appendBody(s, body)
	if err == nil {
		return true
	}
	r.uploads.drop(s)
	if errors.Is(err, errTooLarge) {
		writeError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", fmt.Sprintf("a blob may be at most %d bytes", r.cfg.MaxBlobSize))
		return false
	}
	writeError(w, http.StatusBadRequest, "BLOB_UPLOAD_INVALID", "reading the upload failed: "+err.Error())
	return false
}

// monolithic stores a blob sent whole with its digest in one POST.
func (r *Registry) monolithic(w http.ResponseWriter, req *http.Request, repo, digest string) {
	h, err := v1.NewHash(digest)
	if err != nil || h.Algorithm != "sha256" {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", "digest=sha256:<hex> is required")
		return
	}
	f, err := os.CreateTemp(filepath.Join(r.dir, "uploads"), "whole-*")
	if err != nil {
		writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "starting the upload failed")
		return
	}
	f.Close()
	s := &upload{path: f.Name(), sum: sha256.New()}
	defer os.Remove(s.path)
	if err := r.appendBody(s, req.Body); err != nil {
		if errors.Is(err, errTooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", fmt.Sprintf("a blob may be at most %d bytes", r.cfg.MaxBlobSize))
			return
		}
		writeError(w, http.StatusBadRequest, "BLOB_UPLOAD_INVALID", "reading the upload failed: "+err.Error())
		return
	}
	if got := hex.EncodeToString(s.sum.Sum(nil)); got != h.Hex {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("upload has digest sha256:%s, not %s", got, h))
		return
	}
	if err := r.commitUpload(s.path, repo, h); err != nil {
		r.log.Error("store blob", "repo", repo, "digest", h, "err", err)
		writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "storing the blob failed")
		return
	}
	w.Header().Set("Location", "/v2/"+repo+"/blobs/"+h.String())
	w.Header().Set("Docker-Content-Digest", h.String())
	w.WriteHeader(http.StatusCreated)
}

// commitUpload makes the verified file at path blob h, linked to repo.
func (r *Registry) commitUpload(path, repo string, h v1.Hash) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	serr := f.Sync()
	if err := f.Close(); serr == nil {
		serr = err
	}
	if serr != nil {
		return serr
	}
	if err := r.blobs.place(path, h); err != nil {
		return err
	}
	return r.blobs.link(repo, h)
}

// rangeStart reads the first offset of a Content-Range: "<start>-<end>",
// optionally prefixed "bytes=" or "bytes ".
func rangeStart(cr string) (int64, bool) {
	cr = strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(cr), "bytes="), "bytes ")
	a, _, ok := strings.Cut(cr, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(a, 10, 64)
	return n, err == nil && n >= 0
}

// clip shortens a client's header for a message.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
