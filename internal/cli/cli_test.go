package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrorsExit2(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FLAME_AGENT_TOKEN", "")
	t.Setenv("FLAME_JOIN_TOKEN", "")
	cases := [][]string{
		{"nosuchcommand"},
		{"agent"},                            // --data-dir missing
		{"agent", "--data-dir", t.TempDir()}, // no token
		{"agent", "--data-dir", t.TempDir(), "--token", "t"},                 // a secret on the command line
		{"agent", "--data-dir", t.TempDir(), "--join-token-file", tokenFile}, // enrolling without --host-id
		{"dev", "--no-such-flag"},                                            // unknown flag
		{"dev", "extra"},                                                     // positional argument
		{"dev", "--log-level", "loud"},                                       // bad level
		{"version", "--api-addr", "127.0.0.1"},                               // flag of another command
		{"agent", "--data-dir", t.TempDir(), "--token-file", tokenFile, "--edge-tcp-ports", "2000-1000"}, // empty range
		{"server", "--data-dir", t.TempDir(), "--agent-token", "t"},                                      // a secret on the command line
		{"dev", "--edge-tcp-ports", "10000-70000"},                                                       // past 65535
		{"chaos", "heal", "--token", "t"},                                                                // a secret on the command line
		{"image", "ls", "--token", "t"},                                                                  // a secret on the command line
	}
	for _, args := range cases {
		code, _, stderr := run(args...)
		if code != 2 {
			t.Errorf("flame %s: exit %d, want 2 (stderr %q)", strings.Join(args, " "), code, stderr)
		}
		if !strings.HasPrefix(stderr, "flame: ") {
			t.Errorf("flame %s: stderr %q does not explain", strings.Join(args, " "), stderr)
		}
	}
}

func TestVersionAndHelp(t *testing.T) {
	if code, out, _ := run("version"); code != 0 || !strings.HasPrefix(out, "flame ") {
		t.Errorf("version: %d %q", code, out)
	}
	code, out, _ := run()
	if code != 0 || !strings.Contains(out, "dev") || !strings.Contains(out, "agent") {
		t.Errorf("help: %d %q", code, out)
	}
}

func TestAgentListenErrorIsNotUsage(t *testing.T) {
	t.Setenv("FLAME_AGENT_TOKEN", "t")
	code, _, stderr := run("agent", "--data-dir", t.TempDir(), "--api-addr", "256.0.0.1:1")
	if code != 1 || !strings.Contains(stderr, "listen") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

// secretFile writes a secret to an owner-only file for a --*-file flag.
func secretFile(t *testing.T, secret string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
