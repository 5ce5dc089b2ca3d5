package registry

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"encoding/json"
)

// ErrUnknown is what Resolve returns for a repository, tag or manifest the
// registry does not hold.
var ErrUnknown = errors.New("not in the registry")

// maxCatalogPage bounds one page of /v2/_catalog.
const maxCatalogPage = 1000

// Resolve returns the digest of the manifest reference (a tag or a
// "sha256:…" digest) names in repository repo, or an error wrapping
// ErrUnknown. It is how the control plane pins a machine's image.
func (r *Registry) Resolve(repo, reference string) (string, error) {
	if !repoRE.MatchString(repo) || len(repo) > 255 {
		return "", fmt.Errorf("repository %q: %w", repo, ErrUnknown)
	}
	dir := r.repoDir(repo)
	if digestRE.MatchString(reference) {
		if !r.hasManifest(repo, reference) {
			return "", fmt.Errorf("%s@%s: %w", repo, reference, ErrUnknown)
		}
		return reference, nil
	}
	if !tagRE.MatchString(reference) {
		return "", fmt.Errorf("%s:%s: %w", repo, reference, ErrUnknown)
	}
	b, err := os.ReadFile(filepath.Join(dir, "_tags", reference))
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("%s:%s: %w", repo, reference, ErrUnknown)
	}
	if err != nil {
		return "", fmt.Errorf("%s:%s: %w", repo, reference, err)
	}
	d := strings.TrimSpace(string(b))
	if !digestRE.MatchString(d) {
		return "", fmt.Errorf("%s:%s: tag holds %q", repo, reference, clip(d))
	}
	return d, nil
}

// repositories lists every repository holding a manifest, sorted.
func (r *Registry) repositories() ([]string, error) {
	root := filepath.Join(r.dir, "repos")
	var out []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if strings.HasPrefix(d.Name(), "_") {
			if d.Name() == "_manifests" {
				rel, _ := filepath.Rel(root, filepath.Dir(p))
				out = append(out, filepath.ToSlash(rel))
			}
			return filepath.SkipDir
		}
		return nil
	})
	slices.Sort(out)
	return out, err
}

// catalog answers GET /v2/_catalog with the repositories scope may pull:
// its org's and the public ones. Pages follow the distribution spec (n,
// last, a Link header to the next).
func (r *Registry) catalog(w http.ResponseWriter, req *http.Request, scope Scope) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "the catalog is read with GET")
		return
	}
	q := req.URL.Query()
	n := maxCatalogPage
	if s := q.Get("n"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 0 {
			writeError(w, http.StatusBadRequest, "PAGINATION_NUMBER_INVALID", "n must be a number ≥ 0")
			return
		}
		n = min(v, maxCatalogPage)
	}
	all, err := r.repositories()
	if err != nil {
		r.log.Error("list repositories", "err", err)
		writeError(w, http.StatusInternalServerError, "INTERNAL_SERVER_ERROR", "listing repositories failed")
		return
	}
	last := q.Get("last")
	repos := []string{}
	more := false
	for _, repo := range all {
		if repo <= last || !scope.MayPull(repo) {
			continue
		}
		if len(repos) == n {
			more = true
			break
		}
		repos = append(repos, repo)
	}
	if more && len(repos) > 0 {
		next := url.Values{"n": {strconv.Itoa(n)}, "last": {repos[len(repos)-1]}}
		w.Header().Set("Link", fmt.Sprintf(`</v2/_catalog?%s>; rel="next"`, next.Encode()))
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string][]string{"repositories": repos})
}
