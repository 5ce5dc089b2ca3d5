package cli

import (
	"strings"
	"testing"
)

// TestAgentEdgeTLSFlags: HTTPS needs the plain edge, and ACME needs the
// HTTPS listener and the catalog (usage errors, exit 2).
func TestAgentEdgeTLSFlags(t *testing.T) {
	base := []string{"agent", "--data-dir", t.TempDir(), "--token", "t"}
	for _, extra := range [][]string{
		{"--edge-tls-addr", "127.0.0.1:0"},
		{"--host-id", "h", "--edge-addr", "127.0.0.1:0", "--acme-ca", "https://ca.test/dir"},
		{"--host-id", "h", "--edge-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0", "--acme-ca", "https://ca.test/dir"},
	} {
		args := append(append([]string{}, base...), extra...)
		code, _, stderr := run(args...)
		if code != 2 || !strings.Contains(stderr, "--") {
			t.Errorf("flame %s: exit %d, stderr %q", strings.Join(args, " "), code, stderr)
		}
	}
}
