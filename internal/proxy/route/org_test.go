package route

import "testing"

func TestSameOrg(t *testing.T) {
	org := func(o string) func(*Machine) { return func(m *Machine) { m.Org = o } }
	app := func(a string) func(*Machine) { return func(m *Machine) { m.App = a } }
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []Machine{
		mk("w1", "ams-1", org("acme")), mk("w2", "fra-1", org("acme"), stopped),
		mk("a1", "ams-1", app("api"), org("acme")),
		mk("e1", "ams-1", app("evil"), org("globex")),
		mk("n1", "ams-1", app("noorg")), mk("n2", "ams-1", app("noorg2")),
		mk("m1", "ams-1", app("mixed"), org("acme")), mk("m2", "ams-1", app("mixed"), org("globex")),
	}})
	for _, tt := range []struct {
		a, b string
		want bool
	}{
		{"web", "api", true}, {"api", "web", true}, {"web", "web", true},
		{"web", "evil", false}, {"web", "nosuch", false}, {"nosuch", "web", false},
		{"noorg", "noorg2", false}, {"noorg", "noorg", false},
		{"web", "mixed", false}, {"mixed", "web", false},
	} {
		if got := tab.SameOrg(tt.a, tt.b); got != tt.want {
			t.Errorf("SameOrg(%s, %s) = %v", tt.a, tt.b, got)
		}
	}
}
