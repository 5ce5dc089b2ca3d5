package image

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// unpackForm is one way a store unpacks layers: the whiteout form and
// whether owners are kept.
type unpackForm struct {
	form  layerForm
	chown bool
}

// unpackForms are the forms stores use on this host: the OCI form always,
// and as root the overlay form with owners, which production uses there.
// As root, a host that cannot make overlay whiteouts fails the test.
func unpackForms(t testing.TB) []unpackForm {
	t.Helper()
	forms := []unpackForm{{formOCI, false}}
	if os.Geteuid() != 0 {
		return forms
	}
	if form, _ := probe(t.TempDir()); form != formOverlay {
		t.Fatal("cannot make overlay whiteouts as root")
	}
	return append(forms, unpackForm{formOverlay, true})
}

// TestHostileTar: nothing a layer says can make unpacking write outside
// its directory or create a device, in every form a store unpacks to.
func TestHostileTar(t *testing.T) {
	cases := []struct {
		name    string
		entries []tarEntry
		wantErr string   // "" when the tar unpacks (harmlessly)
		want    []string // what the layer dir holds afterwards
		// overlay is what it holds in overlay form, when that differs.
		overlay []string
	}{
		{name: "dotdot", entries: []tarEntry{{name: "../escape", body: "x"}}, wantErr: "leaves the layer"},
		{name: "dotdot inside", entries: []tarEntry{{name: "a/../../escape", body: "x"}}, wantErr: "leaves the layer"},
		{name: "absolute path stays inside", entries: []tarEntry{{name: "/etc/passwd", body: "x"}}, want: []string{"etc", "etc/passwd"}},
		{name: "write through symlink", entries: []tarEntry{
			{name: "link", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "link/file", body: "x"},
		}, wantErr: "not a directory", want: []string{"link"}},
		{name: "symlink then file of the same name", entries: []tarEntry{
			{name: "f", typ: tar.TypeSymlink, link: "OUTSIDE/target"},
			{name: "f", body: "x"},
		}, want: []string{"f"}},
		{name: "hard link out", entries: []tarEntry{{name: "h", typ: tar.TypeLink, link: "../../etc/passwd"}}, wantErr: "leaves the layer"},
		{name: "hard link through symlink", entries: []tarEntry{
			{name: "l", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "h", typ: tar.TypeLink, link: "l/target"},
		}, wantErr: "h:", want: []string{"l"}},
		{name: "devices skipped", entries: []tarEntry{
			{name: "dev/", typ: tar.TypeDir},
			{name: "dev/sda", typ: tar.TypeBlock},
			{name: "dev/mem", typ: tar.TypeChar},
			{name: "fifo", typ: tar.TypeFifo},
		}, want: []string{"dev"}},
		{name: "malformed whiteout", entries: []tarEntry{{name: ".wh..."}}, wantErr: "malformed whiteout"}, // ".wh..." names ".."
		{name: "whiteout through symlink", entries: []tarEntry{
			{name: "l", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "l/.wh.target"},
		}, wantErr: "not a directory", want: []string{"l"}},
		{name: "opaque through symlink", entries: []tarEntry{
			{name: "l", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "l/.wh..wh..opq"},
		}, wantErr: "not a directory", want: []string{"l"}},
		{name: "whiteout of a symlink out", entries: []tarEntry{
			{name: "l", typ: tar.TypeSymlink, link: "OUTSIDE/target"},
			{name: ".wh.l"},
		}, want: []string{".wh.l", "l"}, overlay: []string{"l"}},
	}
	for _, uf := range unpackForms(t) {
		for _, c := range cases {
			t.Run(string(uf.form)+"/"+c.name, func(t *testing.T) {
				base := t.TempDir()
				outside := filepath.Join(base, "outside")
				os.Mkdir(outside, 0o755)
				os.WriteFile(filepath.Join(outside, "target"), []byte("precious"), 0o644)
				dir := filepath.Join(base, "layer")
				os.Mkdir(dir, 0o755)
				layer := slices.Clone(c.entries)
				for i := range layer {
					layer[i].link = strings.ReplaceAll(layer[i].link, "OUTSIDE", outside)
				}
				_, err := unpack(bytes.NewReader(tarBytes(t, layer...)), dir, uf.form, uf.chown, Limits{})
				switch {
				case c.wantErr == "" && err != nil:
					t.Errorf("unpack: %v", err)
				case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
					t.Errorf("unpack: %v; want an error with %q", err, c.wantErr)
				}
				want := c.want
				if uf.form == formOverlay && c.overlay != nil {
					want = c.overlay
				}
				if got := entries(t, dir); !slices.Equal(got, want) {
					t.Errorf("layer holds %v, want %v", got, want)
				}
				if got := entries(t, outside); !slices.Equal(got, []string{"target"}) {
					t.Errorf("outside holds %v", got)
				}
				if got := readFile(t, filepath.Join(outside, "target")); got != "precious" {
					t.Errorf("outside/target = %q", got)
				}
				if _, err := os.Lstat(filepath.Join(base, "escape")); err == nil {
					t.Error("escape written next to the layer")
				}
			})
		}
	}
}

// canaryRef stands, in a fuzzed tar's names and link targets, for the
// absolute path of the canary directory outside the whole tree: a corpus
// entry cannot know the temporary directory a run puts it in.
const canaryRef = "/CANARY"

// withCanary rewrites a tar, replacing canaryRef in names and link targets
// by canary. A tar that does not parse to its end is returned as is (and
// unpacked as is, which must be as harmless).
func withCanary(data []byte, canary string) []byte {
	if !bytes.Contains(data, []byte(canaryRef)) {
		return data
	}
	var out bytes.Buffer
	tr := tar.NewReader(bytes.NewReader(data))
	tw := tar.NewWriter(&out)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return data
		}
		hdr.Name = strings.ReplaceAll(hdr.Name, canaryRef, canary)
		hdr.Linkname = strings.ReplaceAll(hdr.Linkname, canaryRef, canary)
		hdr.Format = tar.FormatPAX // long names fit
		if err := tw.WriteHeader(hdr); err != nil {
			return data
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return data
		}
	}
	if tw.Close() != nil {
		return data
	}
	return out.Bytes()
}

// FuzzUnpack: no tar makes unpacking write outside its directory. A canary
// directory lies outside the whole tree the layer is in, reachable by
// "../../canary" from the layer and by the absolute path canaryRef stands
// for: whatever the tar says, the canary stays as it was and nothing but the
// layer appears anywhere in the tree.
func FuzzUnpack(f *testing.F) {
	for _, seed := range [][]tarEntry{
		{{name: "a/b", body: "x"}, {name: "l", typ: tar.TypeSymlink, link: "/"}},
		{{name: "../x", body: "x"}},
		{{name: "l", typ: tar.TypeSymlink, link: canaryRef}, {name: "l/x", body: "x"}},
		{{name: "l", typ: tar.TypeSymlink, link: canaryRef + "/target"}, {name: "l", body: "x"}},
		{{name: "l", typ: tar.TypeSymlink, link: "../../canary"}, {name: "l/target", body: "x"}},
		{{name: "h", typ: tar.TypeLink, link: canaryRef + "/target"}},
		{{name: "h", typ: tar.TypeLink, link: "../../canary/target"}},
		{{name: "l", typ: tar.TypeSymlink, link: canaryRef}, {name: "l/.wh.target"}},
		{{name: "d/", typ: tar.TypeDir}, {name: "d/.wh..wh..opq"}, {name: ".wh.d"}},
	} {
		f.Add(tarBytes(f, seed...))
	}
	forms := unpackForms(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, uf := range forms {
			top := t.TempDir()
			canary := filepath.Join(top, "canary")
			if err := os.Mkdir(canary, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(canary, "target"), []byte("precious"), 0o644); err != nil {
				t.Fatal(err)
			}
			tree := filepath.Join(top, "tree")
			dir := filepath.Join(tree, "layer")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			unpack(bytes.NewReader(withCanary(data, canary)), dir, uf.form, uf.chown, Limits{})
			for _, e := range entries(t, top) {
				if e != "canary" && e != "canary/target" && e != "tree" && e != "tree/layer" && !strings.HasPrefix(e, "tree/layer/") {
					t.Fatalf("%s form: wrote %s outside the layer", uf.form, e)
				}
			}
			fi, err := os.Lstat(filepath.Join(canary, "target"))
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
				t.Fatalf("%s form: canary is %v, %v", uf.form, fi, err)
			}
			if got := readFile(t, filepath.Join(canary, "target")); got != "precious" {
				t.Fatalf("%s form: canary holds %q", uf.form, got)
			}
		}
	})
}
