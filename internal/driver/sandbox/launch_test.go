package sandbox

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/image"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

func TestMergeArgv(t *testing.T) {
	img := image.Config{Entrypoint: []string{"/entry"}, Cmd: []string{"serve"}}
	for _, tc := range []struct {
		name       string
		img        image.Config
		entry, cmd []string
		want       []string
	}{
		{"image as is", img, nil, nil, []string{"/entry", "serve"}},
		{"cmd replaced", img, nil, []string{"migrate"}, []string{"/entry", "migrate"}},
		{"entrypoint replaced drops the image cmd", img, []string{"sleep", "inf"}, nil, []string{"sleep", "inf"}},
		{"both replaced", img, []string{"sh", "-c"}, []string{"echo hi"}, []string{"sh", "-c", "echo hi"}},
		{"cmd only image", image.Config{Cmd: []string{"app"}}, nil, nil, []string{"app"}},
		{"nothing", image.Config{}, nil, nil, nil},
	} {
		got := mergeArgv(tc.img, driver.Spec{Entrypoint: tc.entry, Cmd: tc.cmd})
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestMergeEnv(t *testing.T) {
	img := image.Config{Env: []string{"A=image", "B=image", "EMPTY=", "NOEQ"}}
	spec := driver.Spec{Env: map[string]string{"B": "spec", "FLY_PRIVATE_IP": "127.0.0.1"}}
	got := envList(mergeEnv(img, spec, "fdaa::5"))
	want := []string{"A=image", "B=spec", "EMPTY=", "FLY_PRIVATE_IP=fdaa::5", "NOEQ=", "PATH=" + defaultPath}
	if !slices.Equal(got, want) {
		t.Fatalf("env = %q, want %q", got, want)
	}
}

func TestResolveUser(t *testing.T) {
	files := map[string]string{
		"/etc/passwd": "# comment\nroot:x:0:0:root:/root:/bin/sh\nbroken:x:zz:1::/:\nweb:x:33:33:www:/var/www:/bin/false\n",
		"/etc/group":  "root:x:0:\nwww:x:33:\nadm:x:4:web,other\nstaff:x:50:web\n",
	}
	read := func(name string) ([]byte, error) {
		if s, ok := files[name]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	for _, tc := range []struct {
		user string
		want account
		err  bool
	}{
		{"", account{0, 0, nil, "/root"}, false},
		{"web", account{33, 33, []uint32{4, 50}, "/var/www"}, false},
		{"web:adm", account{33, 4, []uint32{4, 50}, "/var/www"}, false},
		{"33", account{33, 33, nil, "/var/www"}, false},
		{"1000:1000", account{1000, 1000, nil, "/"}, false},
		{"nobody", account{}, true},
		{"web:nogroup", account{}, true},
	} {
		got, err := resolveUser(tc.user, read)
		if (err != nil) != tc.err {
			t.Errorf("%q: err %v", tc.user, err)
			continue
		}
		if err == nil && (got.uid != tc.want.uid || got.gid != tc.want.gid || got.home != tc.want.home || !slices.Equal(got.groups, tc.want.groups)) {
			t.Errorf("%q: %+v, want %+v", tc.user, got, tc.want)
		}
	}
}

func TestLookProgram(t *testing.T) {
	have := map[string]bool{"/bin/sh": true, "/app/run": true}
	isExec := func(p string) error {
		if have[p] {
			return nil
		}
		return errNotFound
	}
	for _, tc := range []struct{ name, dir, want string }{
		{"sh", "/", "/bin/sh"},
		{"/app/run", "/", "/app/run"},
		{"./run", "/app", "/app/run"},
		{"nosuch", "/", ""},
	} {
		got, err := lookProgram(tc.name, tc.dir, "relative:/usr/bin:/bin", isExec)
		if got != tc.want || (tc.want == "") != (err != nil) {
			t.Errorf("%q: %q %v, want %q", tc.name, got, err, tc.want)
		}
	}
}

func TestAddrCandidate(t *testing.T) {
	p := netip.MustParsePrefix("fdaa:0:1::/64")
	a, ok := addrCandidate(p, "3d8d9e0c2a1b7f", 0)
	if !ok || a != netip.MustParseAddr("fdaa:0:1:0:3d:8d9e:c2a:1b7f") {
		t.Fatalf("machine id address = %v", a)
	}
	seen := map[netip.Addr]bool{}
	for _, id := range []string{"m1", "m2", "3d8d9e0c2a1b7f"} {
		for attempt := range 4 {
			a, ok := addrCandidate(p, id, attempt)
			if !ok || !p.Contains(a) || seen[a] || a == gatewayAddr(p) {
				t.Fatalf("%s/%d: %v %v (seen %v)", id, attempt, a, ok, seen[a])
			}
			seen[a] = true
		}
	}
	small := netip.MustParsePrefix("fdaa:0:1::ff00/120")
	for attempt := range 50 {
		if a, ok := addrCandidate(small, "3d8d9e0c2a1b7f", attempt); ok && (!small.Contains(a) || a == gatewayAddr(small)) {
			t.Fatalf("attempt %d: %v outside %v", attempt, a, small)
		}
	}
	if got := gatewayAddr(p); got != netip.MustParseAddr("fdaa:0:1::1") {
		t.Fatalf("gateway = %v", got)
	}
}

func TestLeases(t *testing.T) {
	l := leases{dir: t.TempDir()}
	if err := l.init(); err != nil {
		t.Fatal(err)
	}
	// A /126 has two machine addresses (::2, ::3): the third machine
	// finds none.
	p := netip.MustParsePrefix("fdaa::/126")
	a1, err1 := l.acquire(p, "one")
	a2, err2 := l.acquire(p, "two")
	if err1 != nil || err2 != nil || a1 == a2 {
		t.Fatalf("acquire: %v %v %v %v", a1, err1, a2, err2)
	}
	if again, err := l.acquire(p, "one"); err != nil || again != a1 {
		t.Fatalf("acquire again: %v %v", again, err)
	}
	if _, err := l.acquire(p, "three"); err == nil {
		t.Fatal("third machine got an address in a full prefix")
	}
	if got, ok := l.lookup(p, "two"); !ok || got != a2 {
		t.Fatalf("lookup: %v %v", got, ok)
	}
	if err := l.release(p, "one"); err != nil {
		t.Fatal(err)
	}
	if _, ok := l.lookup(p, "one"); ok {
		t.Fatal("released address still looked up")
	}
	if a3, err := l.acquire(p, "three"); err != nil || a3 != a1 {
		t.Fatalf("acquire after release: %v %v", a3, err)
	}
}

func TestLimitsFor(t *testing.T) {
	l := limitsFor(0, 0)
	if l.memoryBytes != 256<<20 || l.cpuQuotaUs != 100_000 || l.cpuShares != 64 || l.pids != 4096 {
		t.Fatalf("defaults: %+v", l)
	}
	l = limitsFor(1024, 4)
	if l.memoryBytes != 1<<30 || l.cpuQuotaUs != 400_000 || l.cpuShares != 256 {
		t.Fatalf("1024 MB, 4 cpus: %+v", l)
	}
	if w := cpuWeight(1024); w != 39 {
		t.Fatalf("cpuWeight(1024) = %d", w)
	}
}

func TestParseMountinfoLine(t *testing.T) {
	mnt, fs, opts, ok := parseMountinfoLine(`35 31 0:32 / /sys/fs/cgroup/mem\040ory rw,relatime shared:1 - cgroup cgroup rw,memory`)
	if !ok || mnt != "/sys/fs/cgroup/mem ory" || fs != "cgroup" || opts != "rw,memory" {
		t.Fatalf("%q %q %q %v", mnt, fs, opts, ok)
	}
	if _, _, _, ok := parseMountinfoLine("garbage"); ok {
		t.Fatal("parsed garbage")
	}
}

func TestHandle(t *testing.T) {
	h := handle{Pid: 42, Start: 12345, BootID: "b0:0t"}
	got, err := hostproc.ParseHandle(h.String())
	if err != nil || got != h {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for _, bad := range []string{"", "1:2", "x:2:b", "0:2:b", "1:y:b"} {
		if _, err := hostproc.ParseHandle(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
	st, err := hostproc.ParseStat([]byte("7 (a) b) c) S 1 7 7 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 999 1000 10"))
	if err != nil || st.State != 'S' || st.Start != 999 {
		t.Fatalf("%+v %v", st, err)
	}
	if !errors.Is(func() error { _, err := hostproc.ReadStat(-5); return err }(), hostproc.ErrNoProcess) {
		t.Fatal("missing pid not hostproc.ErrNoProcess")
	}
}
