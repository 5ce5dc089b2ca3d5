// Package geo knows where Flame's regions are and how far apart they are in
// time: region codes with their cities and coordinates, great-circle
// distances, and a round-trip-time model derived from them.
//
// It is pure: no I/O, no clock. The latency model is what the dev cluster and
// the tests put between simulated hosts, so a request from Sydney to
// Amsterdam costs what it would on a real backhaul.
package geo

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// Region is a named place that holds hosts.
type Region struct {
	Code string  // three-letter code, as Fly names its regions ("ams")
	City string  // the city the region serves from
	Lat  float64 // degrees north
	Lon  float64 // degrees east
}

func (r Region) String() string { return r.Code }

// regions lists the regions, ordered by code. Coordinates are those of the
// airport each region takes its code from.
var regions = []Region{
	{"ams", "Amsterdam, Netherlands", 52.31, 4.76},
	{"arn", "Stockholm, Sweden", 59.65, 17.92},
	{"atl", "Atlanta, Georgia (US)", 33.64, -84.43},
	{"bog", "Bogotá, Colombia", 4.70, -74.15},
	{"bom", "Mumbai, India", 19.09, 72.87},
	{"bos", "Boston, Massachusetts (US)", 42.36, -71.01},
	{"cdg", "Paris, France", 49.01, 2.55},
	{"den", "Denver, Colorado (US)", 39.86, -104.67},
	{"dfw", "Dallas, Texas (US)", 32.90, -97.04},
	{"ewr", "Secaucus, NJ (US)", 40.69, -74.17},
	{"eze", "Ezeiza, Argentina", -34.82, -58.54},
	{"fra", "Frankfurt, Germany", 50.03, 8.57},
	{"gdl", "Guadalajara, Mexico", 20.52, -103.31},
	{"gig", "Rio de Janeiro, Brazil", -22.81, -43.25},
	{"gru", "São Paulo, Brazil", -23.43, -46.47},
	{"hkg", "Hong Kong, Hong Kong", 22.31, 113.92},
	{"iad", "Ashburn, Virginia (US)", 38.94, -77.46},
	{"jnb", "Johannesburg, South Africa", -26.14, 28.24},
	{"lax", "Los Angeles, California (US)", 33.94, -118.41},
	{"lhr", "London, United Kingdom", 51.47, -0.45},
	{"mad", "Madrid, Spain", 40.47, -3.56},
	{"mia", "Miami, Florida (US)", 25.79, -80.29},
	{"nrt", "Tokyo, Japan", 35.77, 140.39},
	{"ord", "Chicago, Illinois (US)", 41.98, -87.90},
	{"otp", "Bucharest, Romania", 44.57, 26.09},
	{"phx", "Phoenix, Arizona (US)", 33.43, -112.01},
	{"qro", "Querétaro, Mexico", 20.62, -100.19},
	{"scl", "Santiago, Chile", -33.39, -70.79},
	{"sea", "Seattle, Washington (US)", 47.45, -122.31},
	{"sin", "Singapore, Singapore", 1.36, 103.99},
	{"sjc", "San Jose, California (US)", 37.36, -121.93},
	{"syd", "Sydney, Australia", -33.95, 151.18},
	{"waw", "Warsaw, Poland", 52.17, 20.97},
	{"yul", "Montreal, Canada", 45.47, -73.74},
	{"yyz", "Toronto, Canada", 43.68, -79.63},
}

// Lookup returns the region with the given code.
func Lookup(code string) (Region, bool) {
	i, ok := slices.BinarySearchFunc(regions, code, func(r Region, c string) int {
		return cmp.Compare(r.Code, c)
	})
	if !ok {
		return Region{}, false
	}
	return regions[i], true
}

// All returns every known region, ordered by code. The slice is the
// caller's to keep.
func All() []Region { return slices.Clone(regions) }

// EarthRadius is the mean radius of the Earth in kilometres.
const EarthRadius = 6371.0

// Distance returns the great-circle distance between two regions in
// kilometres (haversine formula on a spherical Earth).
func Distance(a, b Region) float64 {
	rad := math.Pi / 180
	φ1, φ2 := a.Lat*rad, b.Lat*rad
	dφ := (b.Lat - a.Lat) * rad
	dλ := (b.Lon - a.Lon) * rad
	h := math.Sin(dφ/2)*math.Sin(dφ/2) + math.Cos(φ1)*math.Cos(φ2)*math.Sin(dλ/2)*math.Sin(dλ/2)
	return 2 * EarthRadius * math.Asin(math.Sqrt(math.Min(1, h)))
}

// The round-trip model's constants.
const (
	// FibreSpeed is the speed of light in optical fibre, about ⅔ c, in km/s.
	FibreSpeed = 299_792.458 * 2 / 3
	// RouteFactor is how much longer real routes are than the great circle.
	RouteFactor = 1.5
	// LocalRTT is the round trip between two hosts of one region (switches
	// and network stacks); it is added to every round trip.
	LocalRTT = 500 * time.Microsecond
)

// RTT returns the modelled round-trip time between hosts in two regions:
// LocalRTT plus twice the routed distance (great circle × RouteFactor) at
// FibreSpeed. Within one region it is LocalRTT. Amsterdam–Frankfurt comes
// to about 6 ms and Amsterdam–Sydney to about 250 ms, near what real
// networks measure.
func RTT(a, b Region) time.Duration {
	seconds := 2 * Distance(a, b) * RouteFactor / FibreSpeed
	return LocalRTT + time.Duration(seconds*float64(time.Second))
}

// Nearest orders the candidate region codes by RTT from the given region,
// nearest first; equal RTTs are ordered by code. Codes that name no known
// region come last, in code order. The candidates are not modified.
func Nearest(from Region, candidates []string) []string {
	type ranked struct {
		code  string
		rtt   time.Duration
		known bool
	}
	rs := make([]ranked, len(candidates))
	for i, c := range candidates {
		r, ok := Lookup(c)
		rs[i] = ranked{code: c, known: ok}
		if ok {
			rs[i].rtt = RTT(from, r)
		}
	}
	slices.SortStableFunc(rs, func(x, y ranked) int {
		if x.known != y.known {
			if x.known {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(x.rtt, y.rtt), cmp.Compare(x.code, y.code))
	})
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.code
	}
	return out
}
