package archtest

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// clockFuncs are the functions of package time a pure package may not
// reach: they read the clock or wait on it. Time comes in as an argument.
var clockFuncs = []string{"Now", "Since", "Until", "After", "AfterFunc", "Tick", "NewTicker", "NewTimer", "Sleep"}

// checkPureCode parses the Go files and reports, one line each with its
// position, every use of a clock function of package time and every go
// statement: a pure package neither reads the clock nor starts goroutines.
func checkPureCode(files []string) ([]string, error) {
	fset := token.NewFileSet()
	var found []string
	for _, path := range files {
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return nil, err
		}
		report := func(pos token.Pos, what string) {
			p := fset.Position(pos)
			found = append(found, fmt.Sprintf("%s:%d: %s", filepath.Base(p.Filename), p.Line, what))
		}
		timeNames := map[string]bool{}
		for _, imp := range f.Imports {
			if path, _ := strconv.Unquote(imp.Path.Value); path != "time" {
				continue
			}
			switch {
			case imp.Name == nil:
				timeNames["time"] = true
			case imp.Name.Name == ".":
				report(imp.Pos(), "dot import of time")
			case imp.Name.Name != "_":
				timeNames[imp.Name.Name] = true
			}
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.GoStmt:
				report(n.Pos(), "go statement")
			case *ast.SelectorExpr:
				// An identifier the parser resolved (Obj set) is a
				// declaration of the file's, shadowing the import.
				if id, ok := n.X.(*ast.Ident); ok && timeNames[id.Name] && slices.Contains(clockFuncs, n.Sel.Name) && id.Obj == nil {
					report(n.Pos(), "time."+n.Sel.Name)
				}
			}
			return true
		})
	}
	return found, nil
}

// TestPurePackagesKeepNoClock: the pure packages neither read the clock nor
// start goroutines (tests of theirs may).
func TestPurePackagesKeepNoClock(t *testing.T) {
	for _, p := range purePackages(t) {
		path := p.ImportPath
		if len(p.GoFiles) == 0 {
			t.Errorf("pure package %s has no Go files", path)
		}
		var files []string
		for _, f := range p.GoFiles {
			files = append(files, filepath.Join(p.Dir, f))
		}
		found, err := checkPureCode(files)
		if err != nil {
			t.Errorf("pure package %s: %v", path, err)
		}
		for _, f := range found {
			t.Errorf("pure package %s: %s", path, f)
		}
	}
}

// TestCheckPureCode: the checker reports each kind of breach in a fixture
// that has them, through a renamed import and as a value too, and nothing
// in one that only looks alike.
func TestCheckPureCode(t *testing.T) {
	found, err := checkPureCode([]string{filepath.Join("testdata", "impure", "impure.go")})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"impure.go:11: time.Now",
		"impure.go:15: time.Since",
		"impure.go:19: go statement",
		"impure.go:22: time.Sleep",
	}
	if !slices.Equal(found, want) {
		t.Errorf("impure fixture: found\n%q\nwant\n%q", found, want)
	}
	found, err = checkPureCode([]string{filepath.Join("testdata", "pure", "pure.go")})
	if err != nil || len(found) != 0 {
		t.Errorf("pure fixture: found %q, %v; want nothing", found, err)
	}
}
