package registry

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/httpserve"
)

// endless is an upload body of n bytes that counts what was read of it.
type endless struct {
	n, read int64
}

func (e *endless) Read(p []byte) (int, error) {
	if e.read >= e.n {
		return 0, io.EOF
	}
	k := min(int64(len(p)), e.n-e.read)
	for i := range p[:k] {
		p[i] = byte(e.read + int64(i))
	}
	e.read += k
	return int(k), nil
}

func uploadFiles(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, "uploads"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// TestOversizedUpload: a body past the blob cap is cut off at the cap —
// read no further, never held in memory — answered 413, and what it sent
// is removed; chunked (PATCH) and whole (POST ?digest=) alike.
func TestOversizedUpload(t *testing.T) {
	const limit = 1 << 20
	const sent = 64 << 20 // what the attacker sends
	dir := t.TempDir()
	r, srv := startConfig(t, Config{Dir: dir, Auth: orgAuth, MaxBlobSize: limit})

	code, _ := call(t, srv, "acme", http.MethodPost, "/v2/acme/app/blobs/uploads/", nil)
	if code != http.StatusAccepted {
		t.Fatalf("start upload: %d", code)
	}
	req, _ := http.NewRequest(http.MethodPost, "/v2/acme/app/blobs/uploads/", nil)
	req.Header.Set("Authorization", "Bearer acme")
	rec := httptest.NewRecorder()
	r.ServeHTTP(rec, req)
	loc := rec.Header().Get("Location")

	for _, tc := range []struct{ method, path string }{
		{http.MethodPatch, loc},
		{http.MethodPost, "/v2/acme/app/blobs/uploads/?digest=sha256:" + strings.Repeat("0", 64)},
	} {
		body := &endless{n: sent}
		req, _ := http.NewRequest(tc.method, tc.path, body)
		req.Header.Set("Authorization", "Bearer acme")
		rec := httptest.NewRecorder()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		r.ServeHTTP(rec, req)
		runtime.ReadMemStats(&after)
		if rec.Code != http.StatusRequestEntityTooLarge {
			t.Errorf("%s of %d bytes with a cap of %d: status %d, want 413", tc.method, sent, limit, rec.Code)
		}
		// The handler stops at the cap: it reads one copy buffer past it
		// at most, and allocates far less than what was sent (the whole
		// body buffered would be ≥ 64 MiB).
		if body.read > limit+64<<10 {
			t.Errorf("%s: read %d bytes of the body, past the cap %d", tc.method, body.read, limit)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 8<<20 {
			t.Errorf("%s: allocated %d bytes for a %d-byte body", tc.method, alloc, sent)
		}
	}
	// The session is gone with its data; only the first session remains.
	if code, _ := call(t, srv, "acme", http.MethodPatch, loc, []byte("more")); code != http.StatusNotFound {
		t.Errorf("PATCH after the 413: status %d, want 404", code)
	}
	if n := r.OpenUploads(); n != 1 {
		t.Errorf("%d uploads open, want 1", n)
	}
	if files := uploadFiles(t, dir); len(files) != 1 {
		t.Errorf("upload files left: %v, want the open session's only", files)
	}

	// Over a real connection: the client is answered 413.
	resp, err := http.DefaultClient.Do(func() *http.Request {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/acme/app/blobs/uploads/?digest=sha256:"+strings.Repeat("0", 64), &endless{n: 4 * limit})
		req.Header.Set("Authorization", "Bearer acme")
		return req
	}())
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Errorf("over HTTP: status %d, want 413", resp.StatusCode)
		}
	} // else the server closed the connection while the client still sent: refused too.

	// At the cap exactly, the blob is taken.
	blob := bytes.Repeat([]byte{7}, limit)
	sum := sha256.Sum256(blob)
	if code, body := call(t, srv, "acme", http.MethodPost, "/v2/acme/app/blobs/uploads/?digest=sha256:"+hex.EncodeToString(sum[:]), blob); code != http.StatusCreated {
		t.Errorf("a blob of exactly the cap: status %d %s", code, body)
	}
}

// TestChunkedUpload: a blob sent in chunks with Content-Range is stored
// once the digest of the whole matches; a chunk that does not continue
// what was received is refused with the range so far.
func TestChunkedUpload(t *testing.T) {
	dir := t.TempDir()
	r, srv := startConfig(t, Config{Dir: dir, Auth: orgAuth})
	blob := []byte("hello, chunked layer")
	sum := sha256.Sum256(blob)
	d := "sha256:" + hex.EncodeToString(sum[:])
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/acme/app/blobs/uploads/", nil)
	req.Header.Set("Authorization", "Bearer acme")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	loc := resp.Header.Get("Location")
	if code, _ := call(t, srv, "acme", http.MethodPatch, loc, blob[:5], "Content-Range", "0-4"); code != http.StatusAccepted {
		t.Fatalf("first chunk: %d", code)
	}
	if code, _ := call(t, srv, "acme", http.MethodPatch, loc, blob[5:], "Content-Range", "3-9"); code != http.StatusRequestedRangeNotSatisfiable {
		t.Errorf("overlapping chunk: %d, want 416", code)
	}
	if code, _ := call(t, srv, "globex", http.MethodPatch, strings.Replace(loc, "/acme/app/", "/globex/app/", 1), blob[5:]); code != http.StatusNotFound {
		t.Errorf("another org's session through its own repository: %d, want 404", code)
	}
	if code, _ := call(t, srv, "acme", http.MethodPatch, loc, blob[5:10], "Content-Range", "5-9"); code != http.StatusAccepted {
		t.Fatalf("second chunk: %d", code)
	}
	if code, body := call(t, srv, "acme", http.MethodPut, loc+"?digest="+d, blob[10:]); code != http.StatusCreated {
		t.Fatalf("last chunk: %d %s", code, body)
	}
	if code, _ := call(t, srv, "acme", http.MethodHead, "/v2/acme/app/blobs/"+d, nil); code != http.StatusOK {
		t.Errorf("blob after the upload: %d", code)
	}
	if n, files := r.OpenUploads(), uploadFiles(t, dir); n != 0 || len(files) != 0 {
		t.Errorf("after the upload: %d sessions, files %v", n, files)
	}
}

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// TestAbandonedUploadsExpire: an org holds a bounded number of upload
// sessions (the next is 429, other orgs are not held up), and sessions
// idle past the timeout are removed with their data, freeing their places.
func TestAbandonedUploadsExpire(t *testing.T) {
	const timeout = 10 * time.Minute
	dir := t.TempDir()
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	r, srv := startConfig(t, Config{Dir: dir, Auth: orgAuth, MaxUploadsPerOrg: 2, UploadTimeout: timeout, Now: clock.Now})
	open := func(tok, repo string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/"+repo+"/blobs/uploads/", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Location")
	}
	var locs []string
	for range 2 {
		code, loc := open("acme", "acme/app")
		if code != http.StatusAccepted {
			t.Fatalf("open: %d", code)
		}
		if code, _ := call(t, srv, "acme", http.MethodPatch, loc, bytes.Repeat([]byte{1}, 4096)); code != http.StatusAccepted {
			t.Fatalf("patch: %d", code)
		}
		locs = append(locs, loc)
	}
	if code, _ := open("acme", "acme/other"); code != http.StatusTooManyRequests {
		t.Errorf("a third session of acme: %d, want 429", code)
	}
	if code, _ := open("globex", "globex/app"); code != http.StatusAccepted {
		t.Errorf("globex's first session: %d, want 202", code)
	}
	// One session stays active; the other is abandoned.
	clock.Add(timeout / 2)
	if code, _ := call(t, srv, "acme", http.MethodGet, locs[1], nil); code != http.StatusNoContent {
		t.Errorf("status of an upload: %d, want 204", code)
	}
	clock.Add(timeout/2 + time.Second)
	// Any request sweeps.
	if code, _ := call(t, srv, "acme", http.MethodGet, "/v2/", nil); code != http.StatusOK {
		t.Errorf("GET /v2/: %d", code)
	}
	if code, _ := call(t, srv, "acme", http.MethodPatch, locs[0], []byte("late")); code != http.StatusNotFound {
		t.Errorf("PATCH of the abandoned session: %d, want 404", code)
	}
	if n, files := r.OpenUploads(), uploadFiles(t, dir); n != 1 || len(files) != 1 {
		t.Errorf("after the sweep: %d sessions, files %v; want the active one only", n, files)
	}
	if code, _ := open("acme", "acme/other"); code != http.StatusAccepted {
		t.Errorf("a session in the freed place: %d, want 202", code)
	}
	if code, _ := call(t, srv, "acme", http.MethodPatch, locs[1], []byte("on time")); code != http.StatusAccepted {
		t.Errorf("the active session: %d, want 202", code)
	}
	// A restart forgets every session and its data.
	srv.Close()
	startConfig(t, Config{Dir: dir, Auth: orgAuth})
	if files := uploadFiles(t, dir); len(files) != 0 {
		t.Errorf("after a restart: %v", files)
	}
}

// TestAbandonedUploadsSweptWithoutRequests: sessions are swept on a timer
// too, so an abandoned upload's data goes even if no request ever comes.
func TestAbandonedUploadsSweptWithoutRequests(t *testing.T) {
	const timeout = 100 * time.Millisecond
	dir := t.TempDir()
	r, srv := startConfig(t, Config{Dir: dir, Auth: orgAuth, UploadTimeout: timeout})
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/acme/app/blobs/uploads/", nil)
	req.Header.Set("Authorization", "Bearer acme")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if code, _ := call(t, srv, "acme", http.MethodPatch, resp.Header.Get("Location"), []byte("abandoned")); code != http.StatusAccepted {
		t.Fatalf("patch: %d", code)
	}
	// The sweep runs about a timeout after the session opened and again
	// each timeout while sessions are left: on a busy machine it may run
	// late, never not at all.
	for end := time.Now().Add(60 * time.Second); r.OpenUploads() != 0; time.Sleep(timeout / 4) {
		if time.Now().After(end) {
			t.Fatalf("the abandoned session is still open after %v with a timeout of %v", 60*time.Second, timeout)
		}
	}
	if files := uploadFiles(t, dir); len(files) != 0 {
		t.Errorf("files left: %v", files)
	}
}

// TestStalledUploadBodyEndsItsSession: served as Flame serves it (bounded
// between body reads), a PATCH whose body stops arriving fails and its
// session goes: a stalled upload does not hold its place.
func TestStalledUploadBodyEndsItsSession(t *testing.T) {
	const bound = 200 * time.Millisecond
	dir := t.TempDir()
	r, err := New(Config{Dir: dir, Auth: orgAuth})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httpserve.New(r, httpserve.Limits{Body: bound})
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	base := "http://" + ln.Addr().String()
	req, _ := http.NewRequest(http.MethodPost, base+"/v2/acme/app/blobs/uploads/", nil)
	req.Header.Set("Authorization", "Bearer acme")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	go pw.Write([]byte("a first chunk, then nothing"))
	req, _ = http.NewRequest(http.MethodPatch, base+resp.Header.Get("Location"), pr)
	req.Header.Set("Authorization", "Bearer acme")
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	// The bound runs from the last read: on a busy machine it may pass
	// late, never not at all.
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("a stalled upload body held its request for 60s with a bound of %v", bound)
	}
	for end := time.Now().Add(60 * time.Second); r.OpenUploads() != 0; time.Sleep(bound / 4) {
		if time.Now().After(end) {
			t.Fatal("the stalled upload's session is still open")
		}
	}
	if files := uploadFiles(t, dir); len(files) != 0 {
		t.Errorf("files left: %v", files)
	}
}
