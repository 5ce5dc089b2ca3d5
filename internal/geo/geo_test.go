package geo

import (
	"slices"
	"testing"
	"time"
)

func TestLookup(t *testing.T) {
	want := []string{"ams", "arn", "atl", "bog", "bom", "bos", "cdg", "den", "dfw", "ewr",
		"eze", "fra", "gdl", "gig", "gru", "hkg", "iad", "jnb", "lax", "lhr", "mad", "mia",
		"nrt", "ord", "otp", "phx", "qro", "scl", "sea", "sin", "sjc", "syd", "waw", "yul", "yyz"}
	for _, code := range want {
		r, ok := Lookup(code)
		if !ok {
			t.Errorf("Lookup(%q): not found", code)
			continue
		}
		if r.Code != code || r.City == "" {
			t.Errorf("Lookup(%q) = %+v", code, r)
		}
		if r.Lat < -90 || r.Lat > 90 || r.Lon < -180 || r.Lon > 180 {
			t.Errorf("%s: coordinates out of range: %v, %v", code, r.Lat, r.Lon)
		}
	}
	if _, ok := Lookup("xxx"); ok {
		t.Error("Lookup(xxx) found a region")
	}
	if _, ok := Lookup(""); ok {
		t.Error("Lookup(\"\") found a region")
	}
}

func TestAllSortedAndCopied(t *testing.T) {
	all := All()
	if !slices.IsSortedFunc(all, func(a, b Region) int {
		if a.Code < b.Code {
			return -1
		}
		if a.Code > b.Code {
			return 1
		}
		return 0
	}) {
		t.Fatal("All is not ordered by code")
	}
	for i := 1; i < len(all); i++ {
		if all[i].Code == all[i-1].Code {
			t.Fatalf("duplicate region %s", all[i].Code)
		}
	}
	all[0].Code = "zzz"
	if All()[0].Code == "zzz" {
		t.Fatal("All returned the package's own slice")
	}
}

func region(t *testing.T, code string) Region {
	t.Helper()
	r, ok := Lookup(code)
	if !ok {
		t.Fatalf("no region %s", code)
	}
	return r
}

func TestDistance(t *testing.T) {
	// Great-circle distances between the airports, in km.
	tests := []struct {
		a, b     string
		min, max float64
	}{
		{"ams", "ams", 0, 0},
		{"ams", "fra", 350, 380},
		{"lhr", "cdg", 330, 360},
		{"ewr", "lhr", 5500, 5600},
		{"sjc", "nrt", 8200, 8400},
		{"ams", "syd", 16500, 16800},
	}
	for _, tt := range tests {
		d := Distance(region(t, tt.a), region(t, tt.b))
		if d < tt.min || d > tt.max {
			t.Errorf("Distance(%s, %s) = %.0f km, want %.0f..%.0f", tt.a, tt.b, d, tt.min, tt.max)
		}
		if back := Distance(region(t, tt.b), region(t, tt.a)); back != d {
			t.Errorf("Distance not symmetric for %s, %s: %v vs %v", tt.a, tt.b, d, back)
		}
	}
}

func TestRTT(t *testing.T) {
	tests := []struct {
		a, b     string
		min, max time.Duration
	}{
		{"ams", "ams", LocalRTT, LocalRTT},
		{"ams", "fra", 5 * time.Millisecond, 9 * time.Millisecond},
		{"iad", "ewr", 3 * time.Millisecond, 8 * time.Millisecond},
		{"ewr", "lhr", 75 * time.Millisecond, 95 * time.Millisecond},
		{"ams", "syd", 240 * time.Millisecond, 260 * time.Millisecond},
		{"sin", "gru", 240 * time.Millisecond, 300 * time.Millisecond},
	}
	for _, tt := range tests {
		got := RTT(region(t, tt.a), region(t, tt.b))
		if got < tt.min || got > tt.max {
			t.Errorf("RTT(%s, %s) = %v, want %v..%v", tt.a, tt.b, got, tt.min, tt.max)
		}
	}
}

func TestNearest(t *testing.T) {
	tests := []struct {
		from       string
		candidates []string
		want       []string
	}{
		{"ams", []string{"syd", "fra", "iad", "ams"}, []string{"ams", "fra", "iad", "syd"}},
		{"syd", []string{"ams", "sin", "nrt", "lax"}, []string{"sin", "nrt", "lax", "ams"}},
		{"ord", []string{"xxx", "ord", "aaa", "dfw"}, []string{"ord", "dfw", "aaa", "xxx"}},
		// Equal RTTs (the same region twice) keep code order.
		{"lhr", []string{"lhr", "cdg", "lhr"}, []string{"lhr", "lhr", "cdg"}},
		{"ams", nil, []string{}},
	}
	for _, tt := range tests {
		in := slices.Clone(tt.candidates)
		got := Nearest(region(t, tt.from), in)
		if !slices.Equal(got, tt.want) {
			t.Errorf("Nearest(%s, %v) = %v, want %v", tt.from, tt.candidates, got, tt.want)
		}
		if !slices.Equal(in, tt.candidates) {
			t.Errorf("Nearest modified its candidates: %v", in)
		}
	}
}

func TestNearestTiesByCode(t *testing.T) {
	// Two regions at the same coordinates tie on RTT and order by code.
	saved := regions
	defer func() { regions = saved }()
	regions = []Region{{"aaa", "A", 10, 10}, {"bbb", "B", 10, 10}, {"ccc", "C", 0, 0}}
	got := Nearest(Region{Code: "x", Lat: 10, Lon: 10}, []string{"ccc", "bbb", "aaa"})
	if want := []string{"aaa", "bbb", "ccc"}; !slices.Equal(got, want) {
		t.Fatalf("Nearest = %v, want %v", got, want)
	}
}
