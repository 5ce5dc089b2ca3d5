package image

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// TestBuildPushPull: a directory built into an image, pushed to the
// embedded registry and pulled into a store comes back whole.
func TestBuildPushPull(t *testing.T) {
	reg := newTestRegistry(t)
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "app"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	os.WriteFile(filepath.Join(src, "etc", "conf"), []byte("x=1"), 0o644)
	os.Symlink("app", filepath.Join(src, "run"))

	built, err := Build(context.Background(), BuildSpec{
		Dir: src, Entrypoint: []string{"/app"}, Cmd: []string{"serve"},
		Env: []string{"A=1", "B=2"}, WorkingDir: "/etc", User: "1000",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer built.Close()
	digest := push(t, built, reg.host+"/demo:v1")

	s := newTestStore(t)
	img, err := s.Pull(context.Background(), reg.host+"/demo:v1")
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digest || img.Ref != reg.host+"/demo:v1" {
		t.Errorf("pulled %s as %s, want %s", img.Digest, img.Ref, digest)
	}
	want := Config{Entrypoint: []string{"/app"}, Cmd: []string{"serve"}, Env: []string{"A=1", "B=2"}, WorkingDir: "/etc", User: "1000"}
	if !slices.Equal(img.Config.Entrypoint, want.Entrypoint) || !slices.Equal(img.Config.Cmd, want.Cmd) ||
		!slices.Equal(img.Config.Env, want.Env) || img.Config.WorkingDir != want.WorkingDir || img.Config.User != want.User {
		t.Errorf("config %+v, want %+v", img.Config, want)
	}
	if len(img.Layers) != 1 {
		t.Fatalf("%d layers", len(img.Layers))
	}
	l := img.Layers[0]
	if got := readFile(t, filepath.Join(l.Dir, "etc", "conf")); got != "x=1" {
		t.Errorf("etc/conf = %q", got)
	}
	if fi, _ := os.Stat(filepath.Join(l.Dir, "app")); fi.Mode().Perm() != 0o755 {
		t.Errorf("app mode %v", fi.Mode())
	}
	if target, _ := os.Readlink(filepath.Join(l.Dir, "run")); target != "app" {
		t.Errorf("run -> %q", target)
	}
	if st := s.Stats(); st.LayersDownloaded != 1 || st.BytesDownloaded != l.Size {
		t.Errorf("stats %+v, layer size %d", st, l.Size)
	}

	// Same directory, same digest: the build is reproducible.
	again, err := Build(context.Background(), BuildSpec{
		Dir: src, Entrypoint: []string{"/app"}, Cmd: []string{"serve"},
		Env: []string{"A=1", "B=2"}, WorkingDir: "/etc", User: "1000",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if d, _ := again.Digest(); d.String() != digest {
		t.Errorf("rebuild digest %s, want %s", d, digest)
	}

	// By digest it is pulled without the registry.
	reg.srv.Close()
	if _, err := s.Pull(context.Background(), reg.host+"/demo@"+digest); err != nil {
		t.Errorf("pull by digest with the registry down: %v", err)
	}
}

// TestBuildOnBase: a build on a base keeps the base's layers and config.
func TestBuildOnBase(t *testing.T) {
	reg := newTestRegistry(t)
	base := imageOf(t, v1.Config{Env: []string{"PATH=/bin", "A=base"}, Cmd: []string{"sh"}},
		layerOf(t, tarEntry{name: "bin/", typ: '5'}, tarEntry{name: "bin/sh", body: "shell"}))
	push(t, base, reg.host+"/base:1")
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "app"), []byte("app"), 0o755)
	built, err := Build(context.Background(), BuildSpec{Dir: src, Base: reg.host + "/base:1", Env: []string{"A=mine"}})
	if err != nil {
		t.Fatal(err)
	}
	defer built.Close()
	push(t, built, reg.host+"/app:1")
	s := newTestStore(t)
	img, err := s.Pull(context.Background(), reg.host+"/app:1")
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Layers) != 2 || !slices.Equal(img.Config.Cmd, []string{"sh"}) || !slices.Equal(img.Config.Env, []string{"PATH=/bin", "A=mine"}) {
		t.Errorf("image %+v", img)
	}
}

func TestBuildBadInput(t *testing.T) {
	ctx := context.Background()
	if _, err := Build(ctx, BuildSpec{Dir: filepath.Join(t.TempDir(), "missing")}); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing dir: %v", err)
	}
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o644)
	if _, err := Build(ctx, BuildSpec{Dir: f}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as dir: %v", err)
	}
	if _, err := Build(ctx, BuildSpec{Dir: t.TempDir(), Base: "127.0.0.1:1/base:1"}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("unreachable base registry: %v", err)
	}
}

// TestMountSharesLayers: two machines of one image share its unpacked
// layers; each writes only to its own upper dir; a second pull downloads
// nothing.
func TestMountSharesLayers(t *testing.T) {
	reg := newTestRegistry(t)
	img := imageOf(t, v1.Config{Cmd: []string{"/app"}},
		layerOf(t, tarEntry{name: "app", body: "v1", mode: 0o755}),
		layerOf(t, tarEntry{name: "data/", typ: '5'}, tarEntry{name: "data/f", body: "f"}))
	push(t, img, reg.host+"/demo:latest")
	s := newTestStore(t)
	requireOverlay(t, s)
	ctx := context.Background()
	a, err := s.Pull(ctx, reg.host+"/demo:latest")
	if err != nil {
		t.Fatal(err)
	}
	before := s.Stats()
	b, err := s.Pull(ctx, reg.host+"/demo:latest")
	if err != nil {
		t.Fatal(err)
	}
	after := s.Stats()
	if d := after.BytesDownloaded - before.BytesDownloaded; d != 0 {
		t.Errorf("second pull downloaded %d bytes", d)
	}
	if after.LayersReused-before.LayersReused != 2 {
		t.Errorf("second pull reused %d layers, want 2", after.LayersReused-before.LayersReused)
	}
	for i := range a.Layers {
		if a.Layers[i].Dir != b.Layers[i].Dir {
			t.Errorf("layer %d in two places: %s, %s", i, a.Layers[i].Dir, b.Layers[i].Dir)
		}
	}

	m1, m2 := t.TempDir(), t.TempDir()
	r1, err := s.Mount(ctx, a, m1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Unmount(ctx, m1) })
	r2, err := s.Mount(ctx, b, m2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Unmount(ctx, m2) })
	if again, err := s.Mount(ctx, a, m1); err != nil || again != r1 {
		t.Errorf("mount again: %s, %v", again, err)
	}
	if got := readFile(t, filepath.Join(r1, "data", "f")); got != "f" {
		t.Errorf("data/f = %q", got)
	}
	os.WriteFile(filepath.Join(r1, "app"), []byte("changed"), 0o755)
	os.Remove(filepath.Join(r1, "data", "f"))
	if got := readFile(t, filepath.Join(r2, "app")); got != "v1" {
		t.Errorf("the other machine sees app = %q", got)
	}
	if got := readFile(t, filepath.Join(a.Layers[0].Dir, "app")); got != "v1" {
		t.Errorf("the shared layer has app = %q", got)
	}
	if got := readFile(t, filepath.Join(m1, "upper", "app")); got != "changed" {
		t.Errorf("upper has app = %q", got)
	}

	if err := s.Unmount(ctx, m1); err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount(ctx, m1); err != nil {
		t.Errorf("second unmount: %v", err)
	}
	if mounted, _ := isMountpoint(r1); mounted {
		t.Error("still mounted")
	}
	if left := entries(t, m1); len(left) != 0 {
		t.Errorf("left in the machine dir: %v", left)
	}
}

// whiteoutImage: a lower layer with files, an upper one deleting some by
// whiteout and hiding a directory's contents by an opaque marker.
func whiteoutImage(t *testing.T) v1.Image {
	return imageOf(t, v1.Config{Cmd: []string{"/bin/x"}},
		layerOf(t,
			tarEntry{name: "a", body: "a"},
			tarEntry{name: "keep", body: "keep"},
			tarEntry{name: "gone/", typ: '5'}, tarEntry{name: "gone/inner", body: "i"},
			tarEntry{name: "opq/", typ: '5'}, tarEntry{name: "opq/old", body: "old"},
			tarEntry{name: "opq/sub/", typ: '5'}, tarEntry{name: "opq/sub/deep", body: "d"},
		),
		layerOf(t,
			tarEntry{name: ".wh.a"},
			tarEntry{name: ".wh.gone"},
			tarEntry{name: "opq/", typ: '5'},
			tarEntry{name: "opq/.wh..wh..opq"},
			tarEntry{name: "opq/new", body: "new"},
		))
}

func checkWhiteouts(t *testing.T, rootfs string) {
	t.Helper()
	got := entries(t, rootfs)
	want := []string{"keep", "opq", "opq/new"}
	if !slices.Equal(got, want) {
		t.Errorf("rootfs has %v, want %v", got, want)
	}
}

func TestWhiteoutsOverlay(t *testing.T) {
	reg := newTestRegistry(t)
	push(t, whiteoutImage(t), reg.host+"/wh:1")
	s := newTestStore(t)
	requireOverlay(t, s)
	ctx := context.Background()
	img, err := s.Pull(ctx, reg.host+"/wh:1")
	if err != nil {
		t.Fatal(err)
	}
	// The upper layer holds overlay whiteouts, not .wh. files.
	fi, err := os.Lstat(filepath.Join(img.Layers[1].Dir, "a"))
	if err != nil || !isWhiteoutDevice(fi) {
		t.Errorf("layer 2 'a' is %v, %v; want a 0/0 character device", fi, err)
	}
	if !isOpaque(filepath.Join(img.Layers[1].Dir, "opq")) {
		t.Error("layer 2 'opq' is not opaque")
	}
	dir := t.TempDir()
	rootfs, err := s.Mount(ctx, img, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Unmount(ctx, dir)
	checkWhiteouts(t, rootfs)
}

// TestWhiteoutsCopy: the fallback for hosts without overlayfs copies the
// layers and applies whiteouts in either form.
func TestWhiteoutsCopy(t *testing.T) {
	reg := newTestRegistry(t)
	push(t, whiteoutImage(t), reg.host+"/wh:1")
	for _, form := range []layerForm{formOverlay, formOCI} {
		t.Run(string(form), func(t *testing.T) {
			s := newTestStore(t)
			if form == formOverlay && s.form != formOverlay {
				if os.Geteuid() != 0 {
					t.Skip("overlay whiteouts need root")
				}
				t.Fatal("cannot make overlay whiteouts as root")
			}
			s.form, s.overlay = form, false
			ctx := context.Background()
			img, err := s.Pull(ctx, reg.host+"/wh:1")
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			rootfs, err := s.Mount(ctx, img, dir)
			if err != nil {
				t.Fatal(err)
			}
			checkWhiteouts(t, rootfs)
			if mounted, _ := isMountpoint(rootfs); mounted {
				t.Error("the copy is a mount")
			}
			if err := s.Unmount(ctx, dir); err != nil {
				t.Fatal(err)
			}
			if left := entries(t, dir); len(left) != 0 {
				t.Errorf("left: %v", left)
			}
		})
	}
}

// TestConcurrentPullsDownloadOnce: N machines starting at once on a new
// image cause one download of each layer.
func TestConcurrentPullsDownloadOnce(t *testing.T) {
	reg := newTestRegistry(t)
	layer := layerOf(t, tarEntry{name: "big", body: strings.Repeat("x", 1<<20)})
	img := imageOf(t, v1.Config{Cmd: []string{"/big"}}, layer)
	push(t, img, reg.host+"/dedupe:1")
	ld, _ := layer.Digest()
	cd, _ := img.ConfigName()
	// Hold the download until every pull has asked for the layer.
	const n = 8
	release := make(chan struct{})
	var once sync.Once
	releaseAll := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseAll) // a test that fails holds no pull forever
	reg.beforeGet = func(d string) {
		if d == ld.String() {
			<-release
		}
	}
	s := newTestStore(t)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			_, err := s.Pull(context.Background(), reg.host+"/dedupe:1")
			errs <- err
		})
	}
	// Hold the download until every pull has its config (fetched just
	// before the layers): all n are then at the layer, n-1 of them waiting
	// on the one download in flight.
	deadline := time.Now().Add(10 * time.Second)
	for reg.gets(ld.String()) < 1 || reg.gets(cd.String()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s, %d of %d pulls fetched the config, %d the layer", reg.gets(cd.String()), n, reg.gets(ld.String()))
		}
		time.Sleep(5 * time.Millisecond)
	}
	releaseAll()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := reg.gets(ld.String()); got != 1 {
		t.Errorf("layer fetched %d times by %d pulls, want 1", got, n)
	}
	st := s.Stats()
	if st.LayersDownloaded != 1 || st.LayersReused != n-1 {
		t.Errorf("stats %+v, want 1 downloaded and %d reused", st, n-1)
	}
}

// TestCorruptLayer: a layer whose bytes do not match its digest fails the
// pull with ErrDigest naming the layer, and leaves nothing behind.
func TestCorruptLayer(t *testing.T) {
	reg := newTestRegistry(t)
	layer := layerOf(t, tarEntry{name: "f", body: strings.Repeat("data", 4096)})
	push(t, imageOf(t, v1.Config{Cmd: []string{"/f"}}, layer), reg.host+"/bad:1")
	ld, _ := layer.Digest()
	reg.tamper[ld.String()] = true
	s := newTestStore(t)
	_, err := s.Pull(context.Background(), reg.host+"/bad:1")
	if !errors.Is(err, ErrDigest) || !strings.Contains(err.Error(), ld.String()) {
		t.Fatalf("pull of a corrupt layer: %v; want ErrDigest naming %s", err, ld)
	}
	t.Log(err)
	for _, d := range []string{"layers", "images", "tmp"} {
		if left := entries(t, filepath.Join(s.dir, d)); len(left) != 0 {
			t.Errorf("%s/ holds %v after a failed pull", d, left)
		}
	}
	// Fixed at the source, the next pull works.
	reg.tamper[ld.String()] = false
	if _, err := s.Pull(context.Background(), reg.host+"/bad:1"); err != nil {
		t.Fatal(err)
	}
}

func TestPullErrors(t *testing.T) {
	reg := newTestRegistry(t)
	push(t, imageOf(t, v1.Config{}, layerOf(t, tarEntry{name: "f"})), reg.host+"/there:1")
	s := newTestStore(t)
	ctx := context.Background()
	cases := []struct {
		ref  string
		want error
		msg  string
	}{
		{reg.host + "/there:nope", ErrNotFound, "MANIFEST_UNKNOWN"},
		{reg.host + "/nothere:1", ErrNotFound, "NAME_UNKNOWN"},
		{reg.host + "/there@sha256:" + strings.Repeat("0", 64), ErrNotFound, "manifest"},
		{"127.0.0.1:1/there:1", ErrUnavailable, "cannot reach 127.0.0.1:1"},
		{"not a ref", ErrInvalid, "reference"},
	}
	for _, c := range cases {
		_, err := s.Pull(ctx, c.ref)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("pull %s: %v; want %v mentioning %q", c.ref, err, c.want, c.msg)
		}
	}
	// A registry that goes down.
	reg.srv.Close()
	if _, err := s.Pull(ctx, reg.host+"/there:1"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("registry down: %v", err)
	}
}

func TestAuthToken(t *testing.T) {
	dir := t.TempDir()
	_ = dir
	reg := newTestRegistry(t)
	push(t, imageOf(t, v1.Config{}, layerOf(t, tarEntry{name: "f"})), reg.host+"/a:1")
	// The store sends the token its Auth returns for the registry.
	var asked []string
	s, err := NewStore(StoreConfig{Dir: t.TempDir(), Auth: func(r string) string { asked = append(asked, r); return "tok" }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(context.Background(), reg.host+"/a:1"); err != nil {
		t.Fatal(err)
	}
	if len(asked) == 0 || asked[0] != reg.host {
		t.Errorf("Auth asked for %v", asked)
	}
}

// TestGC: images not in use go, and with them the layers only they used.
func TestGC(t *testing.T) {
	reg := newTestRegistry(t)
	shared := layerOf(t, tarEntry{name: "shared", body: strings.Repeat("s", 10000)})
	own1 := layerOf(t, tarEntry{name: "one", body: "1"})
	own2 := layerOf(t, tarEntry{name: "two", body: strings.Repeat("2", 5000)})
	push(t, imageOf(t, v1.Config{}, shared, own1), reg.host+"/one:1")
	push(t, imageOf(t, v1.Config{}, shared, own2), reg.host+"/two:1")
	s := newTestStore(t)
	ctx := context.Background()
	one, err := s.Pull(ctx, reg.host+"/one:1")
	if err != nil {
		t.Fatal(err)
	}
	two, err := s.Pull(ctx, reg.host+"/two:1")
	if err != nil {
		t.Fatal(err)
	}
	freed, err := s.GC(ctx, func(d string) bool { return d == one.Digest })
	if err != nil {
		t.Fatal(err)
	}
	if freed < 5000 {
		t.Errorf("freed %d bytes, want at least 5000", freed)
	}
	for _, l := range one.Layers {
		if _, err := os.Stat(l.Dir); err != nil {
			t.Errorf("layer %s of the image in use: %v", l.Digest, err)
		}
	}
	if _, err := os.Stat(two.Layers[1].Dir); !os.IsNotExist(err) {
		t.Errorf("unused layer %s still there (%v)", two.Layers[1].Digest, err)
	}
	// Pulled again, only the removed layer is downloaded.
	before := s.Stats()
	if _, err := s.Pull(ctx, reg.host+"/two:1"); err != nil {
		t.Fatal(err)
	}
	if d := s.Stats().LayersDownloaded - before.LayersDownloaded; d != 1 {
		t.Errorf("re-pull downloaded %d layers, want 1", d)
	}
	if freed, err := s.GC(ctx, func(string) bool { return false }); err != nil || freed == 0 {
		t.Errorf("gc of everything: %d, %v", freed, err)
	}
	if left := entries(t, filepath.Join(s.dir, "layers")); len(left) != 0 {
		t.Errorf("layers left: %v", left)
	}
}
