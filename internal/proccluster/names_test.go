package proccluster

import (
	"strings"
	"testing"
)

// Names carry their run's pid, and fit an interface name with a role and
// an index, up to Linux's largest pid.
func TestNames(t *testing.T) {
	for _, pid := range []int{1, 4242, 1 << 22} {
		n := pidName(pid) + "abcd"
		if got, ok := namePid(n + "br"); !ok || got != pid {
			t.Errorf("namePid(%q) = %d %v, want %d", n+"br", got, ok, pid)
		}
		if l := len(n + "vz"); l > 15 {
			t.Errorf("%q is %d bytes, longer than an interface name", n+"vz", l)
		}
	}
	if n := runName(); !strings.HasPrefix(n, namePrefix) || len(n) != len(namePrefix)+pidDigits+idChars {
		t.Errorf("runName() = %q", n)
	}
	// Names of others are never taken for this package's.
	for _, n := range []string{"eth0", "flpc", "flpc-1234", "flpc0000", "flpc00000abcd", "fpc00abc1234", "flpc!!!!!abcd"} {
		if pid, ok := namePid(n); ok {
			t.Errorf("namePid(%q) = %d, want none", n, pid)
		}
	}
	// This run is alive: nothing of it is a leftover.
	if leftover(runName()) {
		t.Error("a name of this live run is a leftover")
	}
}
