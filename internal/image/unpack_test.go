package image

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestHostileTar: nothing a layer says can make unpacking write outside
// its directory or create a device.
func TestHostileTar(t *testing.T) {
	cases := []struct {
		name    string
		entries []tarEntry
		wantErr string   // "" when the tar unpacks (harmlessly)
		want    []string // what the layer dir holds afterwards
	}{
		{"dotdot", []tarEntry{{name: "../escape", body: "x"}}, "leaves the layer", nil},
		{"dotdot inside", []tarEntry{{name: "a/../../escape", body: "x"}}, "leaves the layer", nil},
		{"absolute path stays inside", []tarEntry{{name: "/etc/passwd", body: "x"}}, "", []string{"etc", "etc/passwd"}},
		{"write through symlink", []tarEntry{
			{name: "link", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "link/file", body: "x"},
		}, "not a directory", []string{"link"}},
		{"symlink then file of the same name", []tarEntry{
			{name: "f", typ: tar.TypeSymlink, link: "OUTSIDE/target"},
			{name: "f", body: "x"},
		}, "", []string{"f"}},
		{"hard link out", []tarEntry{{name: "h", typ: tar.TypeLink, link: "../../etc/passwd"}}, "leaves the layer", nil},
		{"hard link through symlink", []tarEntry{
			{name: "l", typ: tar.TypeSymlink, link: "OUTSIDE"},
			{name: "h", typ: tar.TypeLink, link: "l/target"},
		}, "h:", []string{"l"}},
		{"devices skipped", []tarEntry{
			{name: "dev/", typ: tar.TypeDir},
			{name: "dev/sda", typ: tar.TypeBlock},
			{name: "dev/mem", typ: tar.TypeChar},
			{name: "fifo", typ: tar.TypeFifo},
		}, "", []string{"dev"}},
		{"malformed whiteout", []tarEntry{{name: ".wh..."}}, "", nil}, // ".wh..." names "..": refused
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			base := t.TempDir()
			outside := filepath.Join(base, "outside")
			os.Mkdir(outside, 0o755)
			os.WriteFile(filepath.Join(outside, "target"), []byte("precious"), 0o644)
			dir := filepath.Join(base, "layer")
			os.Mkdir(dir, 0o755)
			for i := range c.entries {
				c.entries[i].link = strings.ReplaceAll(c.entries[i].link, "OUTSIDE", outside)
			}
			for _, form := range []layerForm{formOCI} {
				_, err := unpack(bytes.NewReader(tarBytes(t, c.entries...)), dir, form, false)
				switch {
				case c.name == "malformed whiteout":
					if err == nil {
						t.Error("malformed whiteout accepted")
					}
				case c.wantErr == "" && err != nil:
					t.Errorf("unpack: %v", err)
				case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
					t.Errorf("unpack: %v; want an error with %q", err, c.wantErr)
				}
			}
			if got := entries(t, dir); !slices.Equal(got, c.want) {
				t.Errorf("layer holds %v, want %v", got, c.want)
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

// FuzzUnpack: no tar makes unpacking write outside its directory.
func FuzzUnpack(f *testing.F) {
	f.Add(tarBytes(f, tarEntry{name: "a/b", body: "x"}, tarEntry{name: "l", typ: tar.TypeSymlink, link: "/"}))
	f.Add(tarBytes(f, tarEntry{name: "../x", body: "x"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		base := t.TempDir()
		dir := filepath.Join(base, "layer")
		os.Mkdir(dir, 0o755)
		unpack(bytes.NewReader(data), dir, formOCI, false)
		if got := entries(t, base); len(got) == 0 || got[0] != "layer" {
			t.Fatalf("base holds %v", got)
		}
		for _, e := range entries(t, base) {
			if !strings.HasPrefix(e, "layer") {
				t.Fatalf("wrote %s outside the layer", e)
			}
		}
	})
}
