package httpapi

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/flamehq/flame/api"
)

func TestBadInput(t *testing.T) {
	const machines = "/v1/apps/my-app/machines"
	tests := []struct {
		name           string
		method, target string
		body           string
		status         int
		msg            string
	}{
		// Bodies.
		{"empty create", "POST", machines, "", 400, "request body is required"},
		{"no config", "POST", machines, `{"region":"ams"}`, 422, "config is required"},
		{"null body", "POST", machinePath, `null`, 422, "config is required"},
		{"malformed", "POST", machines, `{"config": {"image" "x"}}`, 400, "malformed JSON at line 1, column 21"},
		{"malformed on line 2", "POST", machines, "{\n  \"config\": }", 400, "line 2, column 13"},
		{"truncated", "POST", machines, `{"config":`, 400, "unexpected end of input"},
		{"trailing garbage", "POST", machines, `{"config":{"image":"x"}} xyz`, 400, "unexpected data after the JSON value at line 1, column 26"},
		{"second value", "POST", machines, `{"config":{"image":"x"}}{}`, 400, "unexpected data after the JSON value"},
		{"unknown field", "POST", machines, `{"config":{"image":"x"},"bogus":1}`, 400, `unknown field "bogus" at line 1, column 25`},
		{"unknown nested field", "POST", machines, `{"config":{"image":"x","guest":{"cpuz":1}}}`, 400, `unknown field "config.guest.cpuz"`},
		{"unknown field in array", "POST", machines, `{"config":{"services":[{"ports":[{"port":80},{"prot":1}]}]}}`, 400,
			`unknown field "config.services[0].ports[1].prot"`},
		{"wrong type", "POST", machines, `{"config":{"guest":{"cpus":"two"}}}`, 400, `field "config.guest.cpus" at line 1, column 28: want integer, got string`},
		{"wrong type deep", "POST", machines, `{"config":{"env":{"A":1}}}`, 400, `field "config.env.A"`},
		{"bad duration", "POST", machines, `{"config":{"stop_config":{"timeout":"soon"}}}`, 400, `field "config.stop_config.timeout" at line 1, column 37: invalid duration "soon"`},
		{"bad autostop", "POST", machines, `{"config":{"services":[{"autostop":"maybe"}]}}`, 400, `field "config.services[0].autostop"`},
		{"array body", "POST", machines, `[]`, 400, "invalid request body: want object, got array"},
		{"string body", "POST", machinePath + "/signal", `"SIGTERM"`, 400, "want object, got string"},
		{"negative lease_ttl", "POST", machines, `{"config":{},"lease_ttl":-1}`, 400, "lease_ttl"},
		{"signal missing", "POST", machinePath + "/signal", `{}`, 400, "signal is required"},
		{"signal no body", "POST", machinePath + "/signal", ``, 400, "request body is required"},
		{"signal wrong type", "POST", machinePath + "/signal", `{"signal":true}`, 400, `field "signal"`},
		{"signal out of range", "POST", machinePath + "/signal", `{"signal":99}`, 400, `field "signal"`},
		{"stop for another machine", "POST", machinePath + "/stop", `{"id":"0123456789abcd"}`, 400, "does not match"},
		{"stop negative timeout", "POST", machinePath + "/stop", `{"timeout":"-1s"}`, 400, "timeout"},
		{"stop unknown field", "POST", machinePath + "/stop", `{"signal":"SIGTERM","grace":1}`, 400, `unknown field "grace"`},
		{"lease negative ttl", "POST", machinePath + "/lease", `{"ttl":-5}`, 400, "ttl"},
		{"exec nothing", "POST", machinePath + "/exec", `{}`, 400, "command is required"},
		{"exec blank cmd", "POST", machinePath + "/exec", `{"cmd":"  "}`, 400, "command is required"},
		{"exec bad quoting", "POST", machinePath + "/exec", `{"cmd":"echo 'oops"}`, 400, "unterminated single quote"},
		{"exec negative timeout", "POST", machinePath + "/exec", `{"command":["true"],"timeout":-1}`, 400, "timeout"},
		{"exec command not array", "POST", machinePath + "/exec", `{"command":"ls"}`, 400, `field "command"`},
		{"metadata no value", "POST", machinePath + "/metadata/k", `{}`, 400, "value is required"},
		{"metadata value not string", "POST", machinePath + "/metadata/k", `{"value":1}`, 400, `field "value"`},

		// Query parameters.
		{"restart bad timeout", "POST", machinePath + "/restart?timeout=abc", "", 400, "timeout"},
		{"restart negative timeout", "POST", machinePath + "/restart?timeout=-3", "", 400, "timeout"},
		{"restart bad force_stop", "POST", machinePath + "/restart?force_stop=yes", "", 400, "force_stop"},
		{"wait bad state", "GET", machinePath + "/wait?state=bogus", "", 400, "state"},
		{"wait bad timeout", "GET", machinePath + "/wait?timeout=abc", "", 400, "timeout"},
		{"wait disagreeing versions", "GET", machinePath + "/wait?instance_id=a&version=b", "", 400, "disagree"},
		{"logs negative tail", "GET", machinePath + "/logs?tail=-1", "", 400, "tail"},
		{"logs bad tail", "GET", machinePath + "/logs?tail=ten", "", 400, "tail"},
		{"logs bad follow", "GET", machinePath + "/logs?follow=sure", "", 400, "follow"},
		{"lease bad ttl", "POST", machinePath + "/lease?ttl=x", "", 400, "ttl"},
		{"destroy bad force", "DELETE", machinePath + "?force=maybe", "", 400, "force"},
		{"destroy bad kill", "DELETE", machinePath + "?kill=2", "", 400, "kill"},
		{"list bad include_deleted", "GET", machines + "?include_deleted=perhaps", "", 400, "include_deleted"},
		{"list bad state", "GET", machines + "?state=asleep", "", 400, "state"},
		{"list bad metadata key", "GET", machines + "?metadata.a%20b=1", "", 400, "metadata filter"},
		{"malformed query", "GET", machines + "?region=%zz", "", 400, "malformed query"},

		// Names in the path.
		{"bad app name", "GET", "/v1/apps/My_App/machines", "", 400, "invalid app name"},
		{"app name with dash first", "GET", "/v1/apps/-app/machines/" + testID, "", 400, "invalid app name"},
		{"app name too long", "GET", "/v1/apps/" + strings.Repeat("a", 64) + "/machines", "", 400, "invalid app name"},
		{"short id", "GET", machines + "/abc", "", 404, `machine "abc" not found`},
		{"uppercase id", "GET", machines + "/E784079B449483", "", 404, "not found"},
		{"non-hex id", "POST", machines + "/e784079b44948z/start", "", 404, "not found"},
		{"bad metadata key", "POST", machinePath + "/metadata/a%20b", `{"value":"v"}`, 400, "invalid metadata key"},

		// Routing.
		{"unknown route", "GET", "/v1/apps/my-app/volumes2", "", 404, "no route"},
		{"unknown machine action", "POST", machinePath + "/explode", "", 404, "no route"},
		{"wrong method", "PUT", machinePath, "", 405, "not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFake()
			w := do(t, newServer(t, b), tt.method, tt.target, tt.body)
			wantError(t, w, tt.status, tt.msg)
			if n := len(b.Calls()); n != 0 {
				t.Errorf("backend called %d times for bad input", n)
			}
			if tt.status == 405 && w.Header().Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}
}

func TestBodyTooLarge(t *testing.T) {
	b := newFake()
	s, err := New(Config{Backend: b, Logger: testLogger(t), MaxBodyBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"config":{"image":"` + strings.Repeat("x", 100) + `"}}`
	wantError(t, do(t, s, "POST", "/v1/apps/my-app/machines", body), 413, "larger than 64 bytes")

	// The default limit is 1 MiB.
	s = newServer(t, b)
	body = `{"config":{"image":"` + strings.Repeat("x", DefaultMaxBodyBytes) + `"}}`
	wantError(t, do(t, s, "POST", "/v1/apps/my-app/machines", body), 413, "larger than")
	if n := len(b.Calls()); n != 0 {
		t.Errorf("backend called %d times", n)
	}
}

func TestSplitWords(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		err  bool
	}{
		{"ls -l /", []string{"ls", "-l", "/"}, false},
		{"  spaced\tout \n ", []string{"spaced", "out"}, false},
		{`echo 'a b' "c d"`, []string{"echo", "a b", "c d"}, false},
		{`echo "it's" 'say "hi"'`, []string{"echo", "it's", `say "hi"`}, false},
		{`echo a\ b`, []string{"echo", "a b"}, false},
		{`echo "a\"b\\c\d"`, []string{"echo", `a"b\c\d`}, false},
		{`echo '\n'`, []string{"echo", `\n`}, false},
		{`x''y "" ''`, []string{"xy", "", ""}, false},
		{"a \\\n b", []string{"a", "b"}, false},
		{`echo $HOME`, []string{"echo", "$HOME"}, false},
		{`echo 'open`, nil, true},
		{`echo "open`, nil, true},
		{`echo \`, nil, true},
	}
	for _, tt := range tests {
		got, err := splitWords(tt.in)
		if (err != nil) != tt.err {
			t.Errorf("splitWords(%q) error = %v, want error %v", tt.in, err, tt.err)
			continue
		}
		if !tt.err && strings.Join(got, "|") != strings.Join(tt.want, "|") || len(got) != len(tt.want) {
			t.Errorf("splitWords(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// A body marshalled from the API types decodes under the strict rules.
func TestDecodeStrictAcceptsAPIShapes(t *testing.T) {
	in := api.LaunchMachineInput{
		Config: &api.MachineConfig{Image: "nginx", Guest: &api.MachineGuest{CPUs: 1, MemoryMB: 256},
			StopConfig: &api.StopConfig{Timeout: api.Dur(5e9)}},
		Region: "ams",
	}
	b := newFake()
	s := newServer(t, b)
	body, _ := jsonString(in)
	if w := do(t, s, "POST", "/v1/apps/my-app/machines", body); w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}
