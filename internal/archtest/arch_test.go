package archtest

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

type pkg struct {
	ImportPath string
	Doc        string
	Name       string
	Imports    []string
	Deps       []string
	Dir        string
	GoFiles    []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json=ImportPath,Doc,Name,Imports,Deps,Dir,GoFiles", "github.com/flamehq/flame/...")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 5 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

// TestPackagesDocumented: every package says in its doc what it provides.
func TestPackagesDocumented(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.Doc == "" {
			t.Errorf("package %s has no package doc", p.ImportPath)
		}
	}
}

// pure lists the packages that decide without doing: no network, no
// processes, no files, no stores, no clock, no goroutines — time and
// randomness come in as arguments. A new pure package is one more line here;
// TestPurePackagesDoNoIO and TestPurePackagesKeepNoClock then hold it to
// the rules.
var pure = []string{
	"github.com/flamehq/flame/internal/machine",
	"github.com/flamehq/flame/internal/geo",
	"github.com/flamehq/flame/internal/place",
	"github.com/flamehq/flame/internal/reconcile",
	"github.com/flamehq/flame/internal/proxy/route",
	"github.com/flamehq/flame/internal/proxy/autostop",
	"github.com/flamehq/flame/internal/mesh/layout",
}

// forbidden may not be reached at all; forbiddenDirect may not be imported
// by the pure package itself (fmt reaches os, which is fine).
var (
	forbidden       = []string{"net", "os/exec", "go.etcd.io/bbolt", "math/rand", "math/rand/v2", "crypto/rand"}
	forbiddenDirect = []string{"os", "io/fs", "path/filepath"}
)

// purePackages returns the packages of the pure list, failing t for one
// that is not found (a renamed package must not slip out of the rules).
func purePackages(t *testing.T) []pkg {
	t.Helper()
	byPath := map[string]pkg{}
	for _, p := range listPackages(t) {
		byPath[p.ImportPath] = p
	}
	var out []pkg
	for _, path := range pure {
		p, ok := byPath[path]
		if !ok {
			t.Errorf("pure package %s not found", path)
			continue
		}
		out = append(out, p)
	}
	return out
}

func TestPurePackagesDoNoIO(t *testing.T) {
	for _, p := range purePackages(t) {
		path := p.ImportPath
		for _, f := range forbidden {
			if slices.Contains(p.Deps, f) {
				t.Errorf("pure package %s depends on %s", path, f)
			}
		}
		for _, f := range forbiddenDirect {
			if slices.Contains(p.Imports, f) {
				t.Errorf("pure package %s imports %s", path, f)
			}
		}
	}
}
