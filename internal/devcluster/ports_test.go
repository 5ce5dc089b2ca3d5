package devcluster

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
)

// TestHostPortsBelowEphemeral: a host's listeners asked for port 0 take a
// port below the kernel's ephemeral range, which no outgoing connection
// is ever given (a revived host listens there again); one named keeps its
// port, or fails.
func TestHostPortsBelowEphemeral(t *testing.T) {
	lo, hi := stablePorts()
	if hi <= lo {
		t.Fatalf("no room below the ephemeral range on this machine (%d, %d)", lo, hi)
	}
	below := func(a net.Addr) int {
		t.Helper()
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			t.Fatal(err)
		}
		port := ap.Port()
		if int(port) < lo || int(port) >= hi {
			t.Errorf("port %d, want one in [%d, %d)", port, lo, hi)
		}
		return int(port)
	}
	ln, err := listenStable("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	below(ln.Addr())
	pc, dl, err := listenDNS("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	defer dl.Close()
	if p := below(pc.LocalAddr()); p != below(dl.Addr()) {
		t.Errorf("DNS on UDP %v and TCP %v", pc.LocalAddr(), dl.Addr())
	}
	// A named port is that port, taken or not.
	if _, err := listenStable(ln.Addr().String()); err == nil {
		t.Errorf("listening again on %v succeeded", ln.Addr())
	}
	if _, _, err := listenDNS(pc.LocalAddr().String()); err == nil {
		t.Errorf("DNS again on %v succeeded", pc.LocalAddr())
	}
}

// TestPortHolderNamesTheListener: an address already in use says which
// socket holds it and whose it is.
func TestPortHolderNamesTheListener(t *testing.T) {
	ln, err := listenStable("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = listenStable(ln.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "listening socket") || !strings.Contains(err.Error(), fmt.Sprintf("pid %d ", os.Getpid())) {
		t.Fatalf("listening again: %v, want it to name this process's listening socket", err)
	}
}
