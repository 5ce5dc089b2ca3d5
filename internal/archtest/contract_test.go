package archtest

import (
	"slices"
	"strings"
	"testing"
)

// TestContractOutsideTransport: the machines contract (api.Backend) lives in
// the domain package, so the agent implements it without knowing HTTP, and
// the HTTP layer serves it without knowing who implements it.
func TestContractOutsideTransport(t *testing.T) {
	const mod = "github.com/flamehq/flame/"
	byPath := map[string]pkg{}
	for _, p := range listPackages(t) {
		byPath[p.ImportPath] = p
	}
	rules := []struct {
		pkg, mayNotReach string
	}{
		{"internal/agent", "internal/httpapi"},
		{"internal/httpapi", "internal/agent"},
		{"internal/httpapi", "internal/server"},
	}
	for _, r := range rules {
		p, ok := byPath[mod+r.pkg]
		if !ok {
			t.Errorf("package %s not found", r.pkg)
			continue
		}
		if slices.Contains(p.Deps, mod+r.mayNotReach) {
			t.Errorf("%s depends on %s", r.pkg, r.mayNotReach)
		}
	}
	// The domain package is what every side shares: it reaches none of
	// the implementation.
	api, ok := byPath[mod+"api"]
	if !ok {
		t.Fatal("package api not found")
	}
	for _, d := range api.Deps {
		if strings.HasPrefix(d, mod) {
			t.Errorf("api depends on %s", d)
		}
	}
}
