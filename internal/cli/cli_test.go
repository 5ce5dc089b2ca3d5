package cli

import (
	"bytes"
	"strings"
	"testing"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrorsExit2(t *testing.T) {
	cases := [][]string{
		{"nosuchcommand"},
		{"agent"},                              // --data-dir missing
		{"agent", "--data-dir", "/tmp/x"},      // --token missing
		{"dev", "--no-such-flag"},              // unknown flag
		{"dev", "extra"},                       // positional argument
		{"dev", "--log-level", "loud"},         // bad level
		{"version", "--api-addr", "127.0.0.1"}, // flag of another command
		{"agent", "--data-dir", "/tmp/x", "--token", "t", "--edge-tcp-ports", "2000-1000"}, // empty range
		{"dev", "--edge-tcp-ports", "10000-70000"},                                         // past 65535
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
	code, _, stderr := run("agent", "--data-dir", t.TempDir(), "--token", "t", "--api-addr", "256.0.0.1:1")
	if code != 1 || !strings.Contains(stderr, "listen") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}
