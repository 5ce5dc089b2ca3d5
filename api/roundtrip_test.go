package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// roundTrip decodes data into a T, encodes it, decodes that again and encodes
// once more. The two encodings must be byte for byte the same and the two
// decoded values equal (sameValue). It returns the first value and encoding.
func roundTrip[T any](t testing.TB, data []byte) (T, []byte) {
	t.Helper()
	var v1, v2 T
	if err := json.Unmarshal(data, &v1); err != nil {
		t.Fatalf("decode: %v", err)
	}
	b1, err := json.Marshal(&v1)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	if err := json.Unmarshal(b1, &v2); err != nil {
		t.Fatalf("decode the encoding: %v\nencoding: %s", err, b1)
	}
	b2, err := json.Marshal(&v2)
	if err != nil {
		t.Fatalf("encode again: %v", err)
	}
	if !bytes.Equal(b1, b2) {
		t.Fatalf("encoding not stable:\nfirst:  %s\nsecond: %s", b1, b2)
	}
	if path, ok := sameValue(reflect.ValueOf(v1), reflect.ValueOf(v2), "$"); !ok {
		t.Fatalf("value changed by a round trip at %s:\nfirst:  %#v\nsecond: %#v", path, v1, v2)
	}
	return v1, b1
}

var timeType = reflect.TypeFor[time.Time]()

// sameValue is reflect.DeepEqual except that a nil and an empty map or slice
// are the same (omitempty drops both) and times are compared as instants with
// their UTC offset. It returns the path of the first difference.
func sameValue(a, b reflect.Value, path string) (string, bool) {
	if a.Type() != b.Type() {
		return path, false
	}
	if a.Type() == timeType {
		ta, tb := a.Interface().(time.Time), b.Interface().(time.Time)
		_, oa := ta.Zone()
		_, ob := tb.Zone()
		return path, ta.Equal(tb) && oa == ob
	}
	switch a.Kind() {
	case reflect.Pointer, reflect.Interface:
		if a.IsNil() || b.IsNil() {
			return path, a.IsNil() == b.IsNil()
		}
		if a.Kind() == reflect.Interface && a.Elem().Type() != b.Elem().Type() {
			return path, false
		}
		return sameValue(a.Elem(), b.Elem(), path)
	case reflect.Struct:
		for i := range a.NumField() {
			if p, ok := sameValue(a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name); !ok {
				return p, false
			}
		}
		return path, true
	case reflect.Slice, reflect.Array:
		if a.Len() != b.Len() {
			return path, false
		}
		for i := range a.Len() {
			if p, ok := sameValue(a.Index(i), b.Index(i), fmt.Sprintf("%s[%d]", path, i)); !ok {
				return p, false
			}
		}
		return path, true
	case reflect.Map:
		if a.Len() != b.Len() {
			return path, false
		}
		for _, k := range a.MapKeys() {
			bv := b.MapIndex(k)
			if !bv.IsValid() {
				return fmt.Sprintf("%s[%v]", path, k), false
			}
			if p, ok := sameValue(a.MapIndex(k), bv, fmt.Sprintf("%s[%v]", path, k)); !ok {
				return p, false
			}
		}
		return path, true
	default:
		return path, reflect.DeepEqual(a.Interface(), b.Interface())
	}
}

// decodeStrict decodes data into a T, failing on any field T does not know.
func decodeStrict[T any](t testing.TB, data []byte) T {
	t.Helper()
	var v T
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("strict decode: %v", err)
	}
	return v
}

// sameJSON reports whether two JSON documents hold the same data, whatever
// their layout and key order.
func sameJSON(t testing.TB, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("decode %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkDocument runs the checks every testdata document gets: it decodes
// strictly (so every field in it is one the types know), round-trips, and
// its encoding carries the same data as the file (the files are written in
// the canonical form, so nothing may be lost or added).
func checkDocument[T any](t *testing.T, data []byte) T {
	t.Helper()
	decodeStrict[T](t, data)
	v, enc := roundTrip[T](t, data)
	if !sameJSON(t, data, enc) {
		t.Errorf("encoding differs from the document:\n%s", enc)
	}
	return v
}

func TestTestdataRoundTrip(t *testing.T) {
	tests := []struct {
		file  string
		check func(t *testing.T, data []byte)
	}{
		{"machine.json", func(t *testing.T, data []byte) {
			m := checkDocument[Machine](t, data)
			c := m.Config
			if c == nil || m.IncompleteConfig == nil {
				t.Fatal("config or incomplete_config missing")
			}
			stops := []Autostop{AutostopSuspend, AutostopOff, AutostopStop}
			for i, want := range stops {
				if got := c.Services[i].Autostop; got == nil || *got != want {
					t.Errorf("services[%d].autostop = %v, want %s", i, got, want)
				}
			}
			if got := c.Services[0].Checks[0].GracePeriod.Duration; got != time.Minute {
				t.Errorf("grace_period = %v, want 1m", got)
			}
			if got := c.Checks["ready"].Interval.Duration; got != 10*time.Second {
				t.Errorf("checks.ready.interval = %v, want 10s", got)
			}
			if got := c.StopConfig.Timeout.Duration; got != 30*time.Second {
				t.Errorf("stop_config.timeout = %v, want 30s", got)
			}
			if p := c.Services[0].Ports[2]; *p.StartPort != 10000 || *p.EndPort != 10100 || p.Port != nil {
				t.Errorf("port range = %+v", p)
			}
			if c.Services[1].MinMachinesRunning == nil || *c.Services[1].MinMachinesRunning != 0 {
				t.Error("min_machines_running 0 lost")
			}
			if got := m.Events[0].Time(); !got.Equal(time.Date(2024, 3, 1, 10, 16, 2, 123e6, time.UTC)) {
				t.Errorf("events[0] time = %v", got)
			}
			if !m.Cordoned || m.HostStatus != HostStatusOK || m.LeaseNonce != "a1b2c3d4e5f6" {
				t.Errorf("cordoned/host_status/nonce = %v/%q/%q", m.Cordoned, m.HostStatus, m.LeaseNonce)
			}
		}},
		{"events.json", func(t *testing.T, data []byte) {
			evs := checkDocument[[]*MachineEvent](t, data)
			exit := evs[0].Request.ExitEvent
			if exit.ExitCode != 137 || exit.Signal != 9 || !exit.OOMKilled || !exit.Restarting || evs[0].Request.RestartCount != 2 {
				t.Errorf("exit event = %+v", exit)
			}
			if got, want := evs[0].Time(), time.UnixMilli(1709288400999); !got.Equal(want) || got.Nanosecond() != 999e6 {
				t.Errorf("timestamp = %v, want %v", got, want)
			}
			if _, off := evs[1].Request.ExitEvent.ExitedAt.Zone(); off != 3600 {
				t.Errorf("exited_at offset = %d, want 3600", off)
			}
			if evs[3].Request.Message != "image not found" {
				t.Errorf("launch failure message = %q", evs[3].Request.Message)
			}
		}},
		{"lease.json", func(t *testing.T, data []byte) {
			l := checkDocument[Lease](t, data)
			if l.Data == nil || l.Data.Nonce != "7d3f0c2a9b1e" || l.Data.ExpiresAt != 1709289000 {
				t.Errorf("lease = %+v", l.Data)
			}
		}},
		{"launch_input.json", func(t *testing.T, data []byte) {
			in := checkDocument[LaunchMachineInput](t, data)
			if in.Config.Image != "ghcr.io/example/api:2.3.1" || !in.SkipLaunch || in.LeaseTTL != 30 || *in.MinSecretsVersion != 7 {
				t.Errorf("input = %+v", in)
			}
			if got := *in.Config.Services[0].Autostop; got != AutostopSuspend {
				t.Errorf("autostop = %s", got)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			tt.check(t, readTestdata(t, tt.file))
		})
	}
}

func TestAutostopJSON(t *testing.T) {
	tests := []struct {
		in      string
		want    Autostop
		encoded string
		wantErr bool
	}{
		{in: `true`, want: AutostopStop, encoded: `true`},
		{in: `false`, want: AutostopOff, encoded: `false`},
		{in: `"off"`, want: AutostopOff, encoded: `false`},
		{in: `"stop"`, want: AutostopStop, encoded: `true`},
		{in: `"suspend"`, want: AutostopSuspend, encoded: `"suspend"`},
		{in: `"true"`, want: AutostopStop, encoded: `true`},
		{in: `"false"`, want: AutostopOff, encoded: `false`},
		{in: `"Suspend"`, wantErr: true},
		{in: `"sometimes"`, wantErr: true},
		{in: `""`, wantErr: true},
		{in: `1`, wantErr: true},
		{in: `{}`, wantErr: true},
		{in: `["stop"]`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			var s MachineService
			err := json.Unmarshal([]byte(`{"autostop":`+tt.in+`}`), &s)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("decoded %s as %v, want an error", tt.in, *s.Autostop)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.Autostop == nil || *s.Autostop != tt.want {
				t.Fatalf("got %v, want %s", s.Autostop, tt.want)
			}
			b, err := json.Marshal(s)
			if err != nil {
				t.Fatal(err)
			}
			if want := `{"autostop":` + tt.encoded + `}`; string(b) != want {
				t.Errorf("encoded %s, want %s", b, want)
			}
			roundTrip[MachineService](t, b)
		})
	}

	t.Run("null", func(t *testing.T) {
		var s MachineService
		if err := json.Unmarshal([]byte(`{"autostop":null}`), &s); err != nil {
			t.Fatal(err)
		}
		if s.Autostop != nil {
			t.Errorf("null decoded as %v, want no autostop", *s.Autostop)
		}
	})
}

func TestDurationJSON(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Duration
		encoded string
		wantErr bool
	}{
		{in: `"10s"`, want: 10 * time.Second, encoded: `"10s"`},
		{in: `"1m30s"`, want: 90 * time.Second, encoded: `"1m30s"`},
		{in: `"250ms"`, want: 250 * time.Millisecond, encoded: `"250ms"`},
		{in: `"0s"`, want: 0, encoded: `"0s"`},
		{in: `"-5s"`, want: -5 * time.Second, encoded: `"-5s"`},
		{in: `10000000000`, want: 10 * time.Second, encoded: `"10s"`},
		{in: `1.5e9`, want: 1500 * time.Millisecond, encoded: `"1.5s"`},
		{in: `0`, want: 0, encoded: `"0s"`},
		{in: `9007199254740993`, want: 9007199254740993, encoded: `"2501h59m59.254740993s"`}, // above 2^53: exact
		{in: `1.9`, want: 1, encoded: `"1ns"`},
		{in: `-9223372036854775808`, want: time.Duration(-1 << 63), encoded: `"-2562047h47m16.854775808s"`},
		{in: `9223372036854775808`, wantErr: true},
		{in: `1e300`, wantErr: true},
		{in: `"10"`, wantErr: true},
		{in: `"ten seconds"`, wantErr: true},
		{in: `""`, wantErr: true},
		{in: `true`, wantErr: true},
		{in: `{"seconds":10}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			var c StopConfig
			err := json.Unmarshal([]byte(`{"timeout":`+tt.in+`}`), &c)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("decoded %s as %v, want an error", tt.in, c.Timeout)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Timeout == nil || c.Timeout.Duration != tt.want {
				t.Fatalf("got %v, want %v", c.Timeout, tt.want)
			}
			b, err := json.Marshal(c)
			if err != nil {
				t.Fatal(err)
			}
			if want := `{"timeout":` + tt.encoded + `}`; string(b) != want {
				t.Errorf("encoded %s, want %s", b, want)
			}
			roundTrip[StopConfig](t, b)
		})
	}

	t.Run("null", func(t *testing.T) {
		var c StopConfig
		if err := json.Unmarshal([]byte(`{"timeout":null}`), &c); err != nil {
			t.Fatal(err)
		}
		if c.Timeout != nil {
			t.Errorf("null decoded as %v, want no timeout", c.Timeout)
		}
		d := Duration{time.Second}
		if err := d.UnmarshalJSON([]byte(`null`)); err != nil || d.Duration != 0 {
			t.Errorf("Duration.UnmarshalJSON(null) = %v, %v; want 0", d.Duration, err)
		}
	})
}

// TestNullValues checks that null stands for "absent" everywhere in a config.
func TestNullValues(t *testing.T) {
	withNulls := `{
		"image": "nginx",
		"env": null, "init": null, "guest": null, "metadata": null, "mounts": null,
		"checks": {"c": {"type": "tcp", "port": 80, "interval": null, "timeout": null, "headers": null, "kind": null}},
		"restart": null, "stop_config": {"timeout": null, "signal": null},
		"processes": null, "files": null, "dns": null, "standbys": null, "metrics": null,
		"statics": null, "disable_machine_autostart": null,
		"services": [{
			"protocol": "tcp", "internal_port": 80, "autostop": null, "autostart": null,
			"min_machines_running": null, "concurrency": null, "force_instance_key": null,
			"ports": [{"port": 80, "start_port": null, "end_port": null, "handlers": null,
				"tls_options": null, "http_options": {"compress": null, "response": null}}],
			"checks": [{"type": "http", "interval": null, "grace_period": null, "path": null}]
		}]
	}`
	without := `{
		"image": "nginx",
		"checks": {"c": {"type": "tcp", "port": 80}},
		"stop_config": {},
		"services": [{
			"protocol": "tcp", "internal_port": 80,
			"ports": [{"port": 80, "http_options": {}}],
			"checks": [{"type": "http"}]
		}]
	}`
	a, encA := roundTrip[MachineConfig](t, []byte(withNulls))
	b, encB := roundTrip[MachineConfig](t, []byte(without))
	if p, ok := sameValue(reflect.ValueOf(a), reflect.ValueOf(b), "$"); !ok {
		t.Errorf("nulls decode differently from absent fields at %s", p)
	}
	if !bytes.Equal(encA, encB) {
		t.Errorf("encodings differ:\n%s\n%s", encA, encB)
	}
	if strings.Contains(string(encA), "null") {
		t.Errorf("encoding has nulls: %s", encA)
	}

	var m Machine
	if err := json.Unmarshal([]byte(`{"id":"x","state":"started","config":null,"events":[null],"checks":null}`), &m); err != nil {
		t.Fatal(err)
	}
	if m.Config != nil || len(m.Events) != 1 || m.Events[0] != nil {
		t.Errorf("machine = %+v", m)
	}
}

func TestEventTimestampMillis(t *testing.T) {
	tests := []struct {
		in   string
		want time.Time
	}{
		{`{"type":"start","status":"started","timestamp":0}`, time.Unix(0, 0)},
		{`{"type":"start","status":"started","timestamp":1709288162123}`, time.Date(2024, 3, 1, 10, 16, 2, 123e6, time.UTC)},
		{`{"type":"exit","status":"stopped","timestamp":4102444800001}`, time.Date(2100, 1, 1, 0, 0, 0, 1e6, time.UTC)},
	}
	for _, tt := range tests {
		e, enc := roundTrip[MachineEvent](t, []byte(tt.in))
		if !e.Time().Equal(tt.want) {
			t.Errorf("%s: time %v, want %v", tt.in, e.Time(), tt.want)
		}
		if !sameJSON(t, []byte(tt.in), enc) {
			t.Errorf("%s: encoded as %s", tt.in, enc)
		}
	}
	var e MachineEvent
	if err := json.Unmarshal([]byte(`{"type":"start","timestamp":"2024-03-01T10:16:02Z"}`), &e); err == nil {
		t.Error("a timestamp string decoded; Fly sends milliseconds")
	}
}

func TestSignalMachineInputJSON(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: `{"signal":"SIGUSR1"}`, want: "SIGUSR1"},
		{in: `{"signal":9}`, want: "SIGKILL"},
		{in: `{"signal":15}`, want: "SIGTERM"},
		{in: `{"signal":2}`, want: "SIGINT"},
		{in: `{"signal":34}`, want: "34"},
		{in: `{"signal":null}`, want: ""},
		{in: `{}`, want: ""},
		{in: `{"signal":1.5}`, wantErr: true},
		{in: `{"signal":["SIGKILL"]}`, wantErr: true},
		{in: `[]`, wantErr: true},
	}
	for _, tt := range tests {
		var s SignalMachineInput
		err := json.Unmarshal([]byte(tt.in), &s)
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: err = %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if !tt.wantErr && s.Signal != tt.want {
			t.Errorf("%s: signal %q, want %q", tt.in, s.Signal, tt.want)
		}
	}
}

// TestLaunchMachineInputEncoding pins the shape a client sends for a create.
func TestLaunchMachineInputEncoding(t *testing.T) {
	stop := Autostop(AutostopStop)
	port := 443
	in := LaunchMachineInput{
		Region: "ams",
		Config: &MachineConfig{
			Image: "nginx",
			Guest: &MachineGuest{CPUKind: CPUKindShared, CPUs: 1, MemoryMB: 256},
			Services: []MachineService{{
				Protocol:     "tcp",
				InternalPort: 8080,
				Autostop:     &stop,
				Ports:        []MachinePort{{Port: &port, Handlers: []string{"tls", "http"}}},
			}},
			Checks:     map[string]MachineCheck{"h": {Interval: Dur(15 * time.Second)}},
			StopConfig: &StopConfig{Timeout: Dur(5 * time.Second)},
		},
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"config":{"image":"nginx","init":{},"guest":{"cpu_kind":"shared","cpus":1,"memory_mb":256},` +
		`"services":[{"protocol":"tcp","internal_port":8080,"autostop":true,"ports":[{"port":443,"handlers":["tls","http"]}]}],` +
		`"checks":{"h":{"interval":"15s"}},"stop_config":{"timeout":"5s"}},"region":"ams"}`
	if string(b) != want {
		t.Errorf("encoded\n%s\nwant\n%s", b, want)
	}
}

func TestErrorIs(t *testing.T) {
	err := error(Errorf(404, "machine %s not found", "abc"))
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) {
		t.Error("status matching broken")
	}
	if errors.Is(ErrNotFound, err) {
		t.Error("a sentinel matched an error with a message")
	}
	wrapped := fmt.Errorf("get: %w", err)
	if !errors.Is(wrapped, ErrNotFound) {
		t.Error("wrapped error did not match")
	}
}
