package httpapi

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/flamehq/flame/api"
)

// FuzzHandler sends arbitrary methods, paths, queries, bodies and nonces:
// whatever a client sends, the server answers without panicking and never
// with a 5xx (the backend double always succeeds), and every error is a JSON
// {"error": ...}.
func FuzzHandler(f *testing.F) {
	const m = machinePath
	seeds := [][3]string{
		{"POST", "/v1/apps/my-app/machines", `{"config":{"image":"nginx","guest":{"cpus":1,"memory_mb":256}},"region":"ams"}`},
		{"POST", "/v1/apps/my-app/machines", `{"config":{"services":[{"ports":[{"port":80,"handlers":["http"]}],"autostop":"suspend"}],"checks":{"c":{"interval":"10s"}}}}`},
		{"GET", "/v1/apps/my-app/machines?region=ams&include_deleted=true&metadata.role=x&state=started", ""},
		{"GET", m, ""},
		{"POST", m, `{"config":{"image":"x"},"current_version":"v"}`},
		{"DELETE", m + "?kill=true", ""},
		{"POST", m + "/start", ""},
		{"POST", m + "/stop", `{"id":"` + testID + `","signal":"SIGTERM","timeout":"5s"}`},
		{"POST", m + "/restart?force_stop=true&timeout=10s&signal=9", ""},
		{"POST", m + "/signal", `{"signal":9}`},
		{"POST", m + "/suspend", ""},
		{"GET", m + "/wait?state=stopped&state=suspended&timeout=5&version=v", ""},
		{"GET", m + "/lease", ""},
		{"POST", m + "/lease?ttl=30", `{"description":"d"}`},
		{"DELETE", m + "/lease", ""},
		{"POST", m + "/cordon", ""},
		{"POST", m + "/uncordon", ""},
		{"GET", m + "/events", ""},
		{"GET", m + "/versions", ""},
		{"GET", m + "/ps", ""},
		{"POST", m + "/exec", `{"cmd":"sh -c 'echo \"hi\"'","timeout":3}`},
		{"GET", m + "/logs?tail=3&follow=true", ""},
		{"GET", m + "/metadata", ""},
		{"GET", m + "/metadata/role", ""},
		{"POST", m + "/metadata/role", `{"value":"x"}`},
		{"DELETE", m + "/metadata/role", ""},
		{"POST", "/v1/apps/my-app/machines", `{"config":{"env":{"A":1}}} junk`},
		{"PATCH", "/v1/apps/%zz/machines/..//x", `[`},
		{"GET", "//v1/apps/my-app/machines/", ""},
	}
	for _, s := range seeds {
		f.Add(s[0], s[1], s[2], "nonce")
	}
	b := newFake()
	b.logs = []api.LogEntry{{Message: "line"}}
	s, err := New(Config{Backend: b, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, method, target, body, nonce string) {
		b.reset()
		if !strings.HasPrefix(target, "/") {
			target = "/" + target
		}
		r, err := http.NewRequest(method, "http://flame.test"+target, strings.NewReader(body))
		if err != nil {
			return // not a request a client could send
		}
		r.Header.Set(api.LeaseNonceHeader, nonce)
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)

		if w.Code >= 500 {
			t.Fatalf("%s %s %q: status %d: %s", method, target, body, w.Code, w.Body)
		}
		ct := w.Header().Get("Content-Type")
		if w.Code >= 400 {
			var e api.ErrorBody
			if ct != "application/json" || json.Unmarshal(w.Body.Bytes(), &e) != nil || e.Error == "" {
				t.Fatalf("%s %s: status %d without a JSON error: %q", method, target, w.Code, w.Body)
			}
		}
		if ct == "application/json" && !json.Valid(w.Body.Bytes()) {
			t.Fatalf("%s %s: invalid JSON %q", method, target, w.Body)
		}
	})
}
