package image

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func sampleImage(t *testing.T) v1.Image {
	return imageOf(t, v1.Config{Entrypoint: []string{"/hello"}},
		layerOf(t, tarEntry{name: "hello", body: "hello", mode: 0o755}),
		layerOf(t, tarEntry{name: "etc/", typ: tar.TypeDir}, tarEntry{name: "etc/greeting", body: "hi"}))
}

// importAndPull imports path, pushes it and pulls it into a fresh store.
func importAndPull(t *testing.T, path string) *Image {
	t.Helper()
	reg := newTestRegistry(t)
	img, err := Import(path, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	push(t, img, reg.host+"/imported:1")
	s := newTestStore(t)
	got, err := s.Pull(context.Background(), reg.host+"/imported:1")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Layers) != 2 || got.Config.Entrypoint[0] != "/hello" {
		t.Fatalf("imported image %+v", got)
	}
	if s := readFile(t, filepath.Join(got.Layers[1].Dir, "etc", "greeting")); s != "hi" {
		t.Errorf("etc/greeting = %q", s)
	}
	return got
}

func TestImportDockerSave(t *testing.T) {
	p := filepath.Join(t.TempDir(), "saved.tar")
	tag, _ := name.NewTag("example.com/sample:1")
	if err := tarball.WriteToFile(p, tag, sampleImage(t)); err != nil {
		t.Fatal(err)
	}
	importAndPull(t, p)
}

func writeLayout(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "layout")
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(sampleImage(t)); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestImportOCILayout(t *testing.T) {
	dir := writeLayout(t)
	want, _ := sampleImage(t).Digest()
	if got := importAndPull(t, dir); got.Digest != want.String() {
		t.Errorf("digest %s, want %s", got.Digest, want)
	}
}

func TestImportOCILayoutTarball(t *testing.T) {
	dir := writeLayout(t)
	p := filepath.Join(t.TempDir(), "layout.tar")
	if err := tarDir(dir, p); err != nil {
		t.Fatal(err)
	}
	importAndPull(t, p)
}

func tarDir(dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	defer tw.Close()
	return tw.AddFS(os.DirFS(dir))
}

func TestImportBadInput(t *testing.T) {
	tmp := t.TempDir()
	notTar := filepath.Join(tmp, "random.bin")
	b := make([]byte, 4096)
	rand.Read(b)
	os.WriteFile(notTar, b, 0o644)
	otherTar := filepath.Join(tmp, "other.tar")
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "README"), []byte("x"), 0o644)
	tarDir(src, otherTar)
	for path, want := range map[string]string{
		filepath.Join(tmp, "missing.tar"): "no such file",
		notTar:                            "not a tarball",
		otherTar:                          "neither a docker save tarball",
		src:                               "not an OCI image layout",
	} {
		img, err := Import(path, tmp)
		if err == nil {
			img.Close()
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("import %s: %v; want %q", filepath.Base(path), err, want)
		}
	}
	if left, _ := os.ReadDir(tmp); len(left) != 2 { // random.bin, other.tar
		t.Errorf("temporary files left: %v", left)
	}
}

func TestPushUnreachable(t *testing.T) {
	_, err := Push(context.Background(), sampleImage(t), "127.0.0.1:1/x:1", Remote{})
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("push to a closed port: %v", err)
	}
}

func TestList(t *testing.T) {
	reg := newTestRegistry(t)
	img := sampleImage(t)
	d1 := push(t, img, reg.host+"/b/app:v1")
	push(t, img, reg.host+"/b/app:v2")
	push(t, imageOf(t, v1.Config{}), reg.host+"/a:latest")
	list, err := List(context.Background(), reg.host, Remote{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range list {
		got = append(got, l.Repository+":"+l.Tag)
	}
	if strings.Join(got, " ") != "a:latest b/app:v1 b/app:v2" {
		t.Errorf("listed %v", got)
	}
	if list[1].Digest != d1 || list[1].Layers != 2 || list[1].Size == 0 {
		t.Errorf("b/app:v1 listed as %+v", list[1])
	}
	m, _ := img.Manifest()
	var want int64 = m.Config.Size
	for _, l := range m.Layers {
		want += l.Size
	}
	if list[1].Size != want {
		t.Errorf("size %d, want %d", list[1].Size, want)
	}
}

// BenchmarkPull: a cold pull of a ~50 MB image (one layer of random data)
// and a warm pull of the same image, which downloads nothing.
func BenchmarkPull(b *testing.B) {
	reg := newTestRegistry(b)
	src := b.TempDir()
	f, _ := os.Create(filepath.Join(src, "blob"))
	io.CopyN(f, rand.Reader, 50<<20)
	f.Close()
	built, err := Build(context.Background(), BuildSpec{Dir: src, Entrypoint: []string{"/blob"}, TempDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer built.Close()
	if _, err := Push(context.Background(), built, reg.host+"/bench:1", Remote{}); err != nil {
		b.Fatal(err)
	}
	ref := reg.host + "/bench:1"

	b.Run("cold", func(b *testing.B) {
		var bytes int64
		for b.Loop() {
			b.StopTimer()
			s, err := NewStore(StoreConfig{Dir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := s.Pull(context.Background(), ref); err != nil {
				b.Fatal(err)
			}
			bytes = s.Stats().BytesDownloaded
		}
		b.SetBytes(bytes)
		b.ReportMetric(float64(bytes), "bytes-downloaded/op")
	})
	b.Run("warm", func(b *testing.B) {
		s, err := NewStore(StoreConfig{Dir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Pull(context.Background(), ref); err != nil {
			b.Fatal(err)
		}
		before := s.Stats().BytesDownloaded
		for b.Loop() {
			if _, err := s.Pull(context.Background(), ref); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(s.Stats().BytesDownloaded-before)/float64(b.N), "bytes-downloaded/op")
	})
}
