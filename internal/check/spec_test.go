package check

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

func decodeConfig(t *testing.T, s string) *api.MachineConfig {
	t.Helper()
	var cfg api.MachineConfig
	if err := json.Unmarshal([]byte(s), &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

func TestSpecs(t *testing.T) {
	cfg := decodeConfig(t, `{
		"image": "x",
		"services": [
			{"internal_port": 8080, "checks": [
				{"type": "http", "path": "/health", "interval": "10s", "timeout": "1s", "grace_period": "5s",
				 "method": "post", "protocol": "HTTPS", "tls_skip_verify": true, "tls_server_name": "a.example",
				 "headers": [{"name": "X-Forwarded-Proto", "values": ["https"]}]},
				{"type": "tcp"}
			]},
			{"internal_port": 9000, "checks": [{"port": 9001}, {"path": "/ok"}]}
		],
		"checks": {
			"zeta": {"type": "tcp", "port": 5432},
			"alpha": {"type": "http", "port": 8081, "interval": "100ms"}
		}
	}`)
	got, err := Specs(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := []Spec{
		{Name: "servicecheck-00-http-8080", Type: "http", Service: true, Port: 8080,
			Interval: 10 * time.Second, Timeout: time.Second, GracePeriod: 5 * time.Second,
			Method: "POST", Path: "/health", Protocol: "https", TLSSkipVerify: true, TLSServerName: "a.example",
			Headers: map[string][]string{"X-Forwarded-Proto": {"https"}}},
		{Name: "servicecheck-01-tcp-8080", Type: "tcp", Service: true, Port: 8080,
			Interval: DefaultInterval, Timeout: DefaultTimeout, Method: "GET", Path: "/", Protocol: "http"},
		{Name: "servicecheck-02-tcp-9001", Type: "tcp", Service: true, Port: 9001,
			Interval: DefaultInterval, Timeout: DefaultTimeout, Method: "GET", Path: "/", Protocol: "http"},
		{Name: "servicecheck-03-http-9000", Type: "http", Service: true, Port: 9000,
			Interval: DefaultInterval, Timeout: DefaultTimeout, Method: "GET", Path: "/ok", Protocol: "http"},
		{Name: "alpha", Type: "http", Port: 8081,
			Interval: MinInterval, Timeout: DefaultTimeout, Method: "GET", Path: "/", Protocol: "http"},
		{Name: "zeta", Type: "tcp", Port: 5432,
			Interval: DefaultInterval, Timeout: DefaultTimeout, Method: "GET", Path: "/", Protocol: "http"},
	}
	if !reflect.DeepEqual(got, want) {
		for i := range max(len(got), len(want)) {
			var g, w Spec
			if i < len(got) {
				g = got[i]
			}
			if i < len(want) {
				w = want[i]
			}
			if !reflect.DeepEqual(g, w) {
				t.Errorf("spec %d:\n got  %+v\n want %+v", i, g, w)
			}
		}
	}
	for _, s := range got {
		if err := s.Validate(); err != nil {
			t.Errorf("Specs produced an invalid spec: %v", err)
		}
	}
}

func TestSpecsNone(t *testing.T) {
	for _, cfg := range []*api.MachineConfig{nil, {Image: "x"}} {
		if specs, err := Specs(cfg); err != nil || len(specs) != 0 {
			t.Errorf("Specs(%v) = %v, %v", cfg, specs, err)
		}
	}
}

func TestSpecsErrors(t *testing.T) {
	for _, tt := range []struct {
		cfg, want string
	}{
		{`{"checks": {"db": {"type": "tcp"}}}`, "checks.db: no port"},
		{`{"services": [{"checks": [{"type": "tcp"}]}]}`, "services[0].checks[0]: no port"},
		{`{"checks": {"db": {"type": "grpc", "port": 1}}}`, `checks.db: unknown type "grpc"`},
		{`{"checks": {"db": {"type": "tcp", "port": 70000}}}`, "checks.db: port 70000 out of range"},
		{`{"checks": {"db": {"type": "http", "port": 80, "protocol": "ftp"}}}`, `unknown protocol "ftp"`},
		{`{"checks": {"db": {"type": "http", "port": 80, "path": "health"}}}`, `path "health" does not start with /`},
		{`{"checks": {"db": {"type": "http", "port": 80, "method": "GE T"}}}`, `invalid method "GE T"`},
		{`{"checks": {"db": {"type": "tcp", "port": 80, "interval": "-1s"}}}`, "negative interval"},
		{`{"checks": {"db": {"type": "tcp", "port": 80, "timeout": "-1s"}}}`, "negative timeout"},
		{`{"checks": {"db": {"type": "tcp", "port": 80, "grace_period": "-1s"}}}`, "negative grace period"},
		{`{"checks": {"db": {"type": "http", "port": 80, "headers": [{"name": "", "values": ["x"]}]}}}`, "header without a name"},
		{`{"services": [{"internal_port": 80, "checks": [{}]}], "checks": {"servicecheck-00-tcp-80": {"type": "tcp", "port": 80}}}`, "name taken"},
	} {
		_, err := Specs(decodeConfig(t, tt.cfg))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Specs(%s) error = %v, want one containing %q", tt.cfg, err, tt.want)
		}
	}
}

func TestSpecValidate(t *testing.T) {
	ok := Spec{Name: "a", Type: TypeTCP, Port: 1, Interval: time.Millisecond, Timeout: time.Millisecond}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []func(*Spec){
		func(s *Spec) { s.Name = "" },
		func(s *Spec) { s.Port = 0 },
		func(s *Spec) { s.Interval = 0 },
		func(s *Spec) { s.Timeout = 0 },
		func(s *Spec) { s.Type = "http" }, // without protocol, method, path
	} {
		s := ok
		bad(&s)
		if err := s.Validate(); err == nil {
			t.Errorf("%+v validated", s)
		}
	}
}
