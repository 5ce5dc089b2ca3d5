package proxy

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

func TestParseReplay(t *testing.T) {
	for _, c := range []struct {
		in   string
		want replay
	}{
		{"region=fra", replay{Regions: []string{"fra"}}},
		{" region = fra , SYD ; state=abc=1 ", replay{Regions: []string{"fra", "syd"}, State: "abc=1"}},
		{"instance=0e286039f42e86", replay{Instance: "0e286039f42e86"}},
		{"prefer_instance=m1;region=ams", replay{PreferInstance: "m1", Regions: []string{"ams"}}},
		{"app=other;state=x", replay{App: "other", State: "x"}},
		{"elsewhere=true", replay{Elsewhere: true}},
		{"Elsewhere=1;region=ams;", replay{Elsewhere: true, Regions: []string{"ams"}}},
	} {
		got, err := parseReplay(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if got.String() != c.want.String() {
			t.Errorf("%q: got %q, want %q", c.in, got, c.want)
		}
	}
	for _, c := range []struct{ in, err string }{
		{"", "names no target"},
		{"state=x", "names no target"},
		{"elsewhere=false", "names no target"},
		{"region", "not key=value"},
		{"region=fra;region=ams", "given twice"},
		{"region=", "not a region code"},
		{"region=fr a", "not a region code"},
		{"region=" + strings.Repeat("a,", 17) + "a", "more than 16 regions"},
		{"instance=a/b", "not a machine or instance id"},
		{"instance=m1;region=fra", "instance excludes"},
		{"app=Other", "not an app name"},
		{"state=a\x00b;region=fra", "printable ASCII"},
		{"state=" + strings.Repeat("s", 1025) + ";region=fra", "more than 1024"},
		{"elsewhere=maybe", "not true or false"},
		{"transform=x", "unknown field"},
		{strings.Repeat("x", 5000), "more than 4096"},
	} {
		_, err := parseReplay(c.in)
		if err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%q: error %v, want one saying %q", clip(c.in), err, c.err)
		}
	}
}

func TestParseReplayJSON(t *testing.T) {
	got, err := parseReplayJSON([]byte(`{"region":"fra,syd","state":"s","elsewhere":true,"timeout":"5s"}`))
	if err != nil || got.String() != "region=fra,syd;state=s;elsewhere=true" {
		t.Errorf("got %q, %v", got, err)
	}
	for _, in := range []string{``, `[]`, `{"region":1}`, `{}`, `{"instance":"a b"}`, `{"elsewhere":"yes"}`} {
		if _, err := parseReplayJSON([]byte(in)); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
}

// FuzzReplay: any header value is parsed without a panic; what parses
// says the same when printed and parsed again, and stays within the limits.
func FuzzReplay(f *testing.F) {
	for _, s := range []string{"region=fra", "region=fra,syd;state=abc", "instance=0e286039f42e86", "prefer_instance=m1",
		"app=other", "elsewhere=true", "elsewhere=true;region=ams", ";;", "region", "state=\xff", "region=a,,b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		rp, err := parseReplay(v)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("%q: empty error", v)
			}
			return
		}
		if len(rp.Regions) > maxReplayRegions || len(rp.State) > maxReplayState || strings.Contains(rp.State, ";") {
			t.Fatalf("%q: past the limits: %+v", v, rp)
		}
		again, err := parseReplay(rp.String())
		if err != nil || again.String() != rp.String() {
			t.Fatalf("%q → %q → %q, %v", v, rp, again, err)
		}
		if j, jerr := parseReplayJSON([]byte(fmt.Sprintf(`{"state":%q}`, rp.State))); rp.State != "" && jerr == nil {
			t.Fatalf("a state alone is no target, yet %+v", j)
		}
	})
}

// replayer is a machine that answers with a fly-replay when ask returns
// one, else like a backend. It counts what it answered.
type replayer struct {
	*backend
	asked atomic.Int64
}

func startReplayer(t *testing.T, name string, ask func(r *http.Request) (value string, json bool)) *replayer {
	t.Helper()
	rp := &replayer{backend: startBackend(t, name)}
	inner := rp.srv.Handler
	rp.srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, asJSON := ask(r)
		if v == "" {
			inner.ServeHTTP(w, r)
			return
		}
		rp.hits.Add(1)
		rp.asked.Add(1)
		if asJSON {
			w.Header().Set("Content-Type", replayJSONType)
			w.Write([]byte(v))
			return
		}
		w.Header().Set("Fly-Replay", v)
		w.WriteHeader(http.StatusConflict)
		w.Write([]byte("replay me"))
	})
	return rp
}

func always(v string) func(*http.Request) (string, bool) {
	return func(*http.Request) (string, bool) { return v, false }
}

// replayCluster runs proxies on ams-1 (the edge the client uses), ams-2
// and fra-1, over loopback backhauls, with the given machines.
func replayCluster(t *testing.T, edgeCfg Config, ms ...route.Machine) *Proxy {
	t.Helper()
	edgeCfg.HostID = "ams-1"
	edge := startProxy(t, edgeCfg)
	others := []*Proxy{startProxy(t, Config{HostID: "ams-2"}), startProxy(t, Config{HostID: "fra-1"})}
	backhaul := map[string]string{"ams-1": edge.BackhaulAddr(), "ams-2": others[0].BackhaulAddr(), "fra-1": others[1].BackhaulAddr()}
	for _, p := range append(others, edge) {
		region, _, _ := strings.Cut(p.cfg.HostID, "-")
		p.setState(route.Facts{Self: p.cfg.HostID, Region: region, Hosts: testHosts, Machines: ms}, backhaul)
	}
	return edge
}

// noReplayHeader fails when the client was shown a fly-replay.
func noReplayHeader(t *testing.T, resp *http.Response) {
	t.Helper()
	if v := resp.Header.Values("Fly-Replay"); len(v) > 0 {
		t.Errorf("the client saw fly-replay %q", v)
	}
}

var replaySrcRe = regexp.MustCompile(`^instance=([^;]+);region=([a-z]+);t=([0-9]+)(;state=(.*))?$`)

// TestReplayToRegion: the machine in ams sends the request to fra; the
// machine there gets the whole body and fly-replay-src with the state;
// the client sees fra's answer only. A client's own fly-replay-src never
// reaches a machine.
func TestReplayToRegion(t *testing.T) {
	a1 := startReplayer(t, "a1", always("region=fra;state=cart-42"))
	f1 := startBackend(t, "f1")
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("f1", "fra-1", f1.addr))

	before := time.Now()
	resp, body := do(t, http.DefaultClient, "POST", edge.EdgeAddr(), "demo.localhost", "/buy?x=1", map[string]string{"Fly-Replay-Src": "instance=forged;region=xxx;t=1;state=evil"}, strings.NewReader("the order"))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	noReplayHeader(t, resp)
	s := decode(t, body)
	if s.Machine != "f1" || s.Body != "the order" || s.URI != "/buy?x=1" || s.Method != "POST" {
		t.Fatalf("answered by %s, which saw %s %s %q", s.Machine, s.Method, s.URI, s.Body)
	}
	src := s.Header.Values("Fly-Replay-Src")
	if len(src) != 1 {
		t.Fatalf("fly-replay-src %q", src)
	}
	m := replaySrcRe.FindStringSubmatch(src[0])
	if m == nil || m[1] != "a1" || m[2] != "ams" || m[5] != "cart-42" {
		t.Fatalf("fly-replay-src %q", src[0])
	}
	var us int64
	fmt.Sscan(m[3], &us)
	if at := time.UnixMicro(us); at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
		t.Errorf("fly-replay-src t=%s is %v, not now", m[3], at)
	}
	if a1.asked.Load() != 1 || f1.hits.Load() != 1 {
		t.Errorf("a1 asked %d times, f1 answered %d", a1.asked.Load(), f1.hits.Load())
	}
}

// TestReplayJSONBody: the body form (application/vnd.fly.replay+json)
// replays as the header does.
func TestReplayJSONBody(t *testing.T) {
	a1 := startReplayer(t, "a1", func(*http.Request) (string, bool) { return `{"region":"fra","state":"j"}`, true })
	f1 := startBackend(t, "f1")
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("f1", "fra-1", f1.addr))
	resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	s := decode(t, body)
	if m := replaySrcRe.FindStringSubmatch(s.Header.Get("Fly-Replay-Src")); s.Machine != "f1" || m == nil || m[5] != "j" {
		t.Errorf("answered by %s with fly-replay-src %q", s.Machine, s.Header.Get("Fly-Replay-Src"))
	}
}

// TestReplayToInstance: instance= names a machine on another host; the
// client's own routing headers no longer count. A machine that cannot take
// it is an error, not another machine.
func TestReplayToInstance(t *testing.T) {
	a1 := startReplayer(t, "a1", func(r *http.Request) (string, bool) { return "instance=" + r.URL.Query().Get("to"), false })
	a2 := startBackend(t, "a2")
	stopped := machine("gone", "ams-2", a2.addr)
	stopped.Started = false
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("a2", "ams-2", a2.addr), stopped)
	force := map[string]string{"Fly-Force-Instance-Id": "a1"}

	resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?to=inst-a2", force, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	noReplayHeader(t, resp)
	if s := decode(t, body); s.Machine != "a2" || !strings.HasPrefix(s.Header.Get("Fly-Replay-Src"), "instance=a1;region=ams;") {
		t.Errorf("answered by %s, fly-replay-src %q", s.Machine, s.Header.Get("Fly-Replay-Src"))
	}
	resp, body = do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?to=gone", force, nil)
	noReplayHeader(t, resp)
	if resp.StatusCode != 503 || resp.Header.Get("Flame-Error") != codeNoCandidate || !strings.Contains(body, "instance=gone") {
		t.Errorf("replay to a stopped machine: %d %s", resp.StatusCode, body)
	}
	if a2.hits.Load() != 1 {
		t.Errorf("a2 answered %d times", a2.hits.Load())
	}
}

// TestReplayPreferInstance: prefer_instance goes to that machine when it
// can take the request (here across regions), and routes as usual when
// it cannot.
func TestReplayPreferInstance(t *testing.T) {
	a1 := startReplayer(t, "a1", func(r *http.Request) (string, bool) {
		if r.Header.Get("Fly-Replay-Src") != "" {
			return "", false
		}
		return "prefer_instance=" + r.URL.Query().Get("to"), false
	})
	a2 := startBackend(t, "a2")
	f1 := startBackend(t, "f1")
	stopped := machine("gone", "fra-1", f1.addr)
	stopped.Started = false
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("a2", "ams-2", a2.addr), machine("f1", "fra-1", f1.addr), stopped)
	force := map[string]string{"Fly-Force-Instance-Id": "a1"}

	resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?to=f1", force, nil)
	if s := decode(t, body); resp.StatusCode != 200 || s.Machine != "f1" {
		t.Fatalf("prefer_instance=f1: %d, answered by %s", resp.StatusCode, s.Machine)
	}
	for i := range 10 {
		resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?to=gone", force, nil)
		noReplayHeader(t, resp)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: status %d: %s", i, resp.StatusCode, body)
		}
		// The usual order: the region's machines (a1, answering a replay
		// itself now, or a2), not fra.
		s := decode(t, body)
		if s.Machine == "f1" || !strings.HasPrefix(s.Header.Get("Fly-Replay-Src"), "instance=a1;") {
			t.Fatalf("request %d: answered by %s, fly-replay-src %q", i, s.Machine, s.Header.Get("Fly-Replay-Src"))
		}
	}
}

// TestReplayElsewhere: elsewhere=true never goes back to the machine that
// asked (which asks every time: going back would loop to the limit).
func TestReplayElsewhere(t *testing.T) {
	a1 := startReplayer(t, "a1", always("elsewhere=true"))
	a2 := startBackend(t, "a2")
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("a2", "ams-2", a2.addr))
	for i := range 20 {
		resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/", map[string]string{"Fly-Force-Instance-Id": "a1"}, nil)
		noReplayHeader(t, resp)
		if s := decode(t, body); resp.StatusCode != 200 || s.Machine != "a2" || !strings.HasPrefix(s.Header.Get("Fly-Replay-Src"), "instance=a1;") {
			t.Fatalf("request %d: %d from %s: %s", i, resp.StatusCode, s.Machine, body)
		}
	}
	if a1.asked.Load() != 20 || a2.hits.Load() != 20 {
		t.Errorf("a1 asked %d times, a2 answered %d", a1.asked.Load(), a2.hits.Load())
	}
}

// TestReplayLimit: two machines that replay to each other (A→B→A…) are
// stopped after MaxReplays replays with 508 and the reason.
func TestReplayLimit(t *testing.T) {
	a1 := startReplayer(t, "a1", always("instance=a2"))
	a2 := startReplayer(t, "a2", always("instance=a1"))
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr), machine("a2", "ams-2", a2.addr))
	resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/", map[string]string{"Fly-Force-Instance-Id": "a1"}, nil)
	noReplayHeader(t, resp)
	if resp.StatusCode != http.StatusLoopDetected || resp.Header.Get("Flame-Error") != codeReplayLimit || !strings.Contains(body, "at most 10") {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	// The first attempt and ten replays.
	if a1.asked.Load() != 6 || a2.asked.Load() != 5 {
		t.Errorf("a1 asked %d times, a2 %d", a1.asked.Load(), a2.asked.Load())
	}
}

// TestReplayStreamedBody: a body larger than the buffer was streamed to
// the first machine and is gone: its replay is refused with the reason,
// and nothing reaches the target.
func TestReplayStreamedBody(t *testing.T) {
	a1 := startReplayer(t, "a1", always("region=fra"))
	f1 := startBackend(t, "f1")
	edge := replayCluster(t, Config{MaxBufferedBody: 1024}, machine("a1", "ams-1", a1.addr), machine("f1", "fra-1", f1.addr))
	resp, body := do(t, http.DefaultClient, "POST", edge.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(strings.Repeat("z", 64<<10)))
	noReplayHeader(t, resp)
	if resp.StatusCode != 502 || resp.Header.Get("Flame-Error") != codeBadReplay || !strings.Contains(body, "streamed") {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if f1.hits.Load() != 0 {
		t.Errorf("f1 got %d requests", f1.hits.Load())
	}
	// A small body is kept, and replays.
	resp, body = do(t, http.DefaultClient, "POST", edge.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader("small"))
	if s := decode(t, body); resp.StatusCode != 200 || s.Machine != "f1" || s.Body != "small" {
		t.Errorf("small body: %d from %s with %q", resp.StatusCode, s.Machine, s.Body)
	}
}

// TestReplayRefused: a fly-replay the edge cannot follow (malformed, or
// to another app) is answered 502 with the reason, never passed on.
func TestReplayRefused(t *testing.T) {
	a1 := startReplayer(t, "a1", func(r *http.Request) (string, bool) { return r.URL.Query().Get("v"), false })
	edge := replayCluster(t, Config{}, machine("a1", "ams-1", a1.addr))
	for v, want := range map[string]string{
		"region=fr%20a": "not a region code",
		"app=other":     "not an app of its organization",
		"frobnicate=1":  "unknown field",
	} {
		resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?v="+v, nil, nil)
		noReplayHeader(t, resp)
		if resp.StatusCode != 502 || resp.Header.Get("Flame-Error") != codeBadReplay || !strings.Contains(body, want) {
			t.Errorf("%s: %d %s", v, resp.StatusCode, body)
		}
	}
	// app= naming its own app is an ordinary replay.
	resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/?v=app=demo", nil, nil)
	if resp.StatusCode != http.StatusLoopDetected {
		t.Errorf("app=demo: %d %s", resp.StatusCode, body)
	}
}
