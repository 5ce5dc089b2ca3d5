package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// bombLayer is a gzipped layer of one file of n zero bytes: megabytes of
// download for gigabytes on disk, were it unpacked.
func bombLayer(t testing.TB, n int64) (v1.Layer, int) {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "zeros", Typeflag: tar.TypeReg, Mode: 0o644, Size: n}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(tw, zeroReader{}, n); err != nil {
		t.Fatal(err)
	}
	tw.Close()
	zw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l, len(b)
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// storeLeftovers lists what a store holds in its layers and tmp
// directories.
func storeLeftovers(t *testing.T, s *Store) []string {
	t.Helper()
	var out []string
	for _, d := range []string{"layers", "tmp"} {
		es, err := os.ReadDir(filepath.Join(s.dir, d))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			out = append(out, d+"/"+e.Name())
		}
	}
	return out
}

// TestDecompressionBomb: a layer that unpacks past the store's byte limit
// is refused with ErrTooLarge (and ErrInvalid: pulling it again cannot
// help) before the file that passes it is written, and nothing of it stays
// in the store; the same layer under a limit it fits is pulled.
func TestDecompressionBomb(t *testing.T) {
	reg := newTestRegistry(t)
	const unpacked = 256 << 20
	bomb, size := bombLayer(t, unpacked)
	t.Logf("a %d-byte download unpacking to %d bytes", size, unpacked)
	small := layerOf(t, tarEntry{name: "etc/conf", body: "x=1"})
	push(t, imageOf(t, v1.Config{Cmd: []string{"/bin/true"}}, small, bomb), reg.host+"/bomb:v1")

	s, err := NewStore(StoreConfig{Dir: t.TempDir(), Logger: testLogger(t), Limits: Limits{MaxLayerBytes: 64 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Pull(context.Background(), reg.host+"/bomb:v1")
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrInvalid) {
		t.Fatalf("pull of a bomb: %v, want ErrTooLarge and ErrInvalid", err)
	}
	if !strings.Contains(err.Error(), "more than 67108864 bytes") {
		t.Errorf("error %q does not say the limit", err)
	}
	// The small layer may have been kept (it is fine); nothing of the
	// bomb is.
	for _, f := range storeLeftovers(t, s) {
		if f != "layers/"+strings.TrimPrefix(mustDigest(t, small), "sha256:") {
			t.Errorf("left in the store: %s", f)
		}
	}

	roomy, err := NewStore(StoreConfig{Dir: t.TempDir(), Logger: testLogger(t), Limits: Limits{MaxLayerBytes: unpacked}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := roomy.Pull(context.Background(), reg.host+"/bomb:v1"); err != nil {
		t.Fatalf("pull under a limit it fits: %v", err)
	}
}

// TestLayerEntryLimit: a layer of more entries than the store allows (an
// inode bomb of empty files) is refused the same way.
func TestLayerEntryLimit(t *testing.T) {
	reg := newTestRegistry(t)
	var many []tarEntry
	for i := range 200 {
		many = append(many, tarEntry{name: fmt.Sprintf("d/f%d", i)})
	}
	push(t, imageOf(t, v1.Config{Cmd: []string{"/bin/true"}}, layerOf(t, many...)), reg.host+"/many:v1")
	s, err := NewStore(StoreConfig{Dir: t.TempDir(), Logger: testLogger(t), Limits: Limits{MaxLayerEntries: 100}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Pull(context.Background(), reg.host+"/many:v1")
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "more than 100 entries") {
		t.Fatalf("pull of 200 files under a limit of 100: %v", err)
	}
	if left := storeLeftovers(t, s); len(left) != 0 {
		t.Errorf("left in the store: %v", left)
	}
	if _, err := newTestStore(t).Pull(context.Background(), reg.host+"/many:v1"); err != nil {
		t.Fatalf("pull under the default limits: %v", err)
	}
}

func mustDigest(t testing.TB, l v1.Layer) string {
	t.Helper()
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}
