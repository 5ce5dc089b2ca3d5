package proxy

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/flamehq/flame/internal/proxy/route"
)

// ofApp makes a machine one of app in org.
func ofApp(m route.Machine, app, org string) route.Machine {
	m.App, m.Org = app, org
	return m
}

// TestReplayToAppOfSameOrg: app= names another app of the same org; the
// request goes to that app's machines (in the region named, when one is),
// with its body and fly-replay-src.
func TestReplayToAppOfSameOrg(t *testing.T) {
	a1 := startReplayer(t, "a1", func(r *http.Request) (string, bool) { return r.URL.Query().Get("v"), false })
	o1, o2 := startBackend(t, "o1"), startBackend(t, "o2")
	edge := replayCluster(t, Config{},
		ofApp(machine("a1", "ams-1", a1.addr), "demo", "acme"),
		ofApp(machine("o1", "ams-2", o1.addr), "other", "acme"),
		ofApp(machine("o2", "fra-1", o2.addr), "other", "acme"))
	for v, want := range map[string]string{"app=other": "o1", "app=other;region=fra": "o2", "app=other;instance=o2": "o2"} {
		resp, body := do(t, http.DefaultClient, "POST", edge.EdgeAddr(), "demo.localhost", "/?v="+url.QueryEscape(v), nil, strings.NewReader("payload"))
		noReplayHeader(t, resp)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", v, resp.StatusCode, body)
		}
		s := decode(t, body)
		if s.Machine != want || s.Body != "payload" || !strings.HasPrefix(s.Header.Get("Fly-Replay-Src"), "instance=a1;region=ams;") {
			t.Errorf("%s: answered by %s (want %s) with %q, fly-replay-src %q", v, s.Machine, want, s.Body, s.Header.Get("Fly-Replay-Src"))
		}
	}
}

// TestReplayToOtherOrgRefused: app= naming an app of another org, an app
// that does not exist, or an app whose org is not known is refused with
// one and the same answer — which says nothing of whether the app exists —
// and nothing reaches the other app.
func TestReplayToOtherOrgRefused(t *testing.T) {
	a1 := startReplayer(t, "a1", func(r *http.Request) (string, bool) { return r.URL.Query().Get("v"), false })
	s1, u1 := startBackend(t, "s1"), startBackend(t, "u1")
	edge := replayCluster(t, Config{},
		ofApp(machine("a1", "ams-1", a1.addr), "demo", "acme"),
		ofApp(machine("s1", "ams-2", s1.addr), "secret", "globex"),
		ofApp(machine("u1", "ams-2", u1.addr), "unowned", ""))
	reqID := regexp.MustCompile(`[0-9A-Z]{26}-ams`)
	answer := func(app string) string {
		resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?v=app="+app, nil, nil)
		noReplayHeader(t, resp)
		if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Flame-Error") != codeBadReplay {
			t.Errorf("app=%s: %d %s", app, resp.StatusCode, body)
		}
		return strings.ReplaceAll(reqID.ReplaceAllString(body, "ID"), app, "APP")
	}
	missing := answer("nosuch")
	if !strings.Contains(missing, "not an app of its organization") {
		t.Errorf("answer %q", missing)
	}
	for _, app := range []string{"secret", "unowned"} {
		if got := answer(app); got != missing {
			t.Errorf("app=%s answered %q, an unknown app %q", app, got, missing)
		}
	}
	if s1.hits.Load() != 0 || u1.hits.Load() != 0 {
		t.Error("another org's app was reached")
	}
}

// TestReplayChainAcrossApps: two apps of one org replaying to each other
// are stopped at the same replay limit as machines of one app.
func TestReplayChainAcrossApps(t *testing.T) {
	a1 := startReplayer(t, "a1", always("app=other"))
	o1 := startReplayer(t, "o1", always("app=demo"))
	edge := replayCluster(t, Config{},
		ofApp(machine("a1", "ams-1", a1.addr), "demo", "acme"),
		ofApp(machine("o1", "ams-2", o1.addr), "other", "acme"))
	resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", nil)
	noReplayHeader(t, resp)
	if resp.StatusCode != http.StatusLoopDetected || resp.Header.Get("Flame-Error") != codeReplayLimit {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if a1.asked.Load() != 6 || o1.asked.Load() != 5 {
		t.Errorf("a1 asked %d times, o1 %d; want the first attempt and %d replays", a1.asked.Load(), o1.asked.Load(), MaxReplays)
	}
}
