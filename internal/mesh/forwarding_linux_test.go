package mesh

import (
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestLinkRestoresForwarding: a link turns the namespace's IPv6 forwarding
// on while it is open (a bridge's traffic into the TUN is forwarded), and
// off again when it closes, as it was before; the forwarding of the
// namespace the test runs in, which the link never saw, is untouched.
func TestLinkRestoresForwarding(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: a network namespace and a TUN of the test's own")
	}
	const sw = "/proc/sys/net/ipv6/conf/all/forwarding"
	read := func() string {
		b, err := os.ReadFile(sw)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	outside := read()
	network, _ := layout.ParseNetwork("7e57" + randTag(t)[:4])
	done := make(chan struct{})
	go func() {
		defer close(done)
		// A namespace of the test's own on a thread never given back: it
		// goes with the thread when the goroutine ends.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare: %v", err)
			return
		}
		if err := os.WriteFile(sw, []byte("0"), 0o644); err != nil {
			t.Error(err)
			return
		}
		l, err := OpenLink(LinkConfig{Name: LinkName(randTag(t)+"00", 1), Network: network, LockDir: lockDir(t)})
		if err != nil {
			t.Error(err)
			return
		}
		if v := read(); v != "1" {
			t.Errorf("forwarding with the link open: %s, want 1", v)
		}
		if err := l.Close(); err != nil {
			t.Error(err)
		}
		if v := read(); v != "0" {
			t.Errorf("forwarding after the link closed: %s, want 0 as before", v)
		}
	}()
	<-done
	if v := read(); v != outside {
		t.Errorf("forwarding outside the namespace: %s, was %s", v, outside)
	}
}
