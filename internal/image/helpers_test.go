package image

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/flamehq/flame/internal/image/registry"
)

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testRegistry is the embedded registry behind httptest, with a hook to
// count or tamper with blob downloads.
type testRegistry struct {
	srv  *httptest.Server
	host string

	mu        sync.Mutex
	blobGets  map[string]int      // digest → GETs
	tamper    map[string]bool     // digest → serve flipped bytes
	beforeGet func(digest string) // called before serving a blob GET
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	reg, err := registry.New(registry.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	tr := &testRegistry{blobGets: map[string]int{}, tamper: map[string]bool{}}
	tr.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if i := strings.Index(r.URL.Path, "/blobs/sha256:"); i >= 0 && r.Method == http.MethodGet {
			d := r.URL.Path[i+len("/blobs/"):]
			tr.mu.Lock()
			tr.blobGets[d]++
			tamper, before := tr.tamper[d], tr.beforeGet
			tr.mu.Unlock()
			if before != nil {
				before(d)
			}
			if tamper {
				rec := httptest.NewRecorder()
				reg.ServeHTTP(rec, r)
				b := rec.Body.Bytes()
				b[len(b)/2] ^= 0xff
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(b)
				return
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(tr.srv.Close)
	tr.host = strings.TrimPrefix(tr.srv.URL, "http://")
	return tr
}

func (tr *testRegistry) gets(digest string) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.blobGets[digest]
}

// tarEntry is one file of a test layer.
type tarEntry struct {
	name, body, link string
	typ              byte
	mode             int64
}

func tarBytes(t testing.TB, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, Size: int64(len(e.body))}
		if hdr.Typeflag == 0 {
			hdr.Typeflag = tar.TypeReg
		}
		if hdr.Typeflag != tar.TypeReg {
			hdr.Size = 0
		}
		if hdr.Mode == 0 {
			hdr.Mode = 0o644
			if hdr.Typeflag == tar.TypeDir {
				hdr.Mode = 0o755
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if hdr.Typeflag == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// layerOf makes a gzipped layer of the given entries.
func layerOf(t testing.TB, entries ...tarEntry) v1.Layer {
	t.Helper()
	b := tarBytes(t, entries...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// imageOf stacks layers on scratch with a config.
func imageOf(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.AppendLayers(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", "amd64", cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func push(t testing.TB, img v1.Image, ref string) string {
	t.Helper()
	d, err := Push(context.Background(), img, ref, Remote{Progress: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func newTestStore(t testing.TB) *Store {
	t.Helper()
	s, err := NewStore(StoreConfig{Dir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// requireOverlay skips t unless root, and fails it when root but Mount
// does not use overlayfs: as root, production mounts overlays, so the
// tests of that path must run.
func requireOverlay(t *testing.T, s *Store) {
	t.Helper()
	if s.Overlay() {
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("overlayfs mounts need root; the copying fallback is tested separately")
	}
	t.Fatal("overlayfs mounts are not available as root (the overlay module: modprobe overlay)")
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func entries(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, p)
		if rel != "." {
			out = append(out, rel)
		}
		return nil
	})
	return out
}
