package archtest

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// unboundedServers lists where files build an http.Server that is not
// passed straight to httpserve.Apply, or serve through net/http's
// package-level helpers (whose servers have no timeouts at all).
func unboundedServers(fset *token.FileSet, f *ast.File) []string {
	httpName, hsName := "", ""
	for _, im := range f.Imports {
		path := strings.Trim(im.Path.Value, `"`)
		name := filepath.Base(path)
		if im.Name != nil {
			name = im.Name.Name
		}
		switch path {
		case "net/http":
			httpName = name
		case "github.com/flamehq/flame/internal/httpserve":
			hsName = name
		}
	}
	if httpName == "" {
		return nil
	}
	isHTTP := func(e ast.Expr, sel string) bool {
		s, ok := e.(*ast.SelectorExpr)
		if !ok || s.Sel.Name != sel {
			return false
		}
		id, ok := s.X.(*ast.Ident)
		return ok && id.Name == httpName
	}
	allowed := map[ast.Expr]bool{}
	var bad []string
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CallExpr:
			if s, ok := n.Fun.(*ast.SelectorExpr); ok && hsName != "" && s.Sel.Name == "Apply" {
				if id, ok := s.X.(*ast.Ident); ok && id.Name == hsName && len(n.Args) > 0 {
					arg := n.Args[0]
					if u, ok := arg.(*ast.UnaryExpr); ok {
						arg = u.X
					}
					allowed[arg] = true
				}
			}
			for _, fn := range []string{"ListenAndServe", "ListenAndServeTLS", "Serve", "ServeTLS"} {
				if isHTTP(n.Fun, fn) {
					bad = append(bad, fset.Position(n.Pos()).String()+": http."+fn)
				}
			}
			if id, ok := n.Fun.(*ast.Ident); ok && id.Name == "new" && len(n.Args) == 1 && isHTTP(n.Args[0], "Server") {
				bad = append(bad, fset.Position(n.Pos()).String()+": new(http.Server)")
			}
		case *ast.CompositeLit:
			if isHTTP(n.Type, "Server") && !allowed[n] {
				bad = append(bad, fset.Position(n.Pos()).String()+": http.Server{...}")
			}
		}
		return true
	})
	return bad
}

// TestEveryHTTPServerIsBounded: every HTTP server Flame runs gets
// httpserve's bounds (header, body, write and idle timeouts), so none can
// be held open by a slow client. A server is built by httpserve.New, or
// as an http.Server literal passed straight to httpserve.Apply.
func TestEveryHTTPServerIsBounded(t *testing.T) {
	fset := token.NewFileSet()
	checked := 0
	for _, p := range listPackages(t) {
		if p.ImportPath == "github.com/flamehq/flame/internal/httpserve" {
			continue
		}
		for _, name := range p.GoFiles {
			f, err := parser.ParseFile(fset, filepath.Join(p.Dir, name), nil, parser.SkipObjectResolution)
			if err != nil {
				t.Fatal(err)
			}
			checked++
			for _, b := range unboundedServers(fset, f) {
				t.Errorf("%s: build it with httpserve.New or pass the literal to httpserve.Apply", b)
			}
		}
	}
	if checked < 50 {
		t.Fatalf("only %d files checked", checked)
	}
}

// TestUnboundedServersFound: the check finds what it is for.
func TestUnboundedServersFound(t *testing.T) {
	src := `package x
import (
	"net/http"
	hs "github.com/flamehq/flame/internal/httpserve"
)
func a() { _ = &http.Server{} }
func b() { _ = hs.Apply(&http.Server{ReadHeaderTimeout: 1}, hs.Limits{}) }
func c() { http.ListenAndServe(":0", nil) }
func d() { s := http.Server{}; _ = hs.Apply(&s, hs.Limits{}) }
func e() { _ = new(http.Server) }
`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "x.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := unboundedServers(fset, f)
	want := []string{"x.go:6:17: http.Server{...}", "x.go:8:12: http.ListenAndServe", "x.go:9:17: http.Server{...}", "x.go:10:16: new(http.Server)"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
