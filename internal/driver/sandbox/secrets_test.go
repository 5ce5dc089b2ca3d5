package sandbox

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The launch environment carries a machine's secrets: it never reaches the
// disk, and what the driver writes there is for root's eyes only. Exec still
// runs commands with it.
func TestSecretsOffDisk(t *testing.T) {
	d := newDriver(t, testConfig(t))
	// An orphan with an environment of its own is the init's child too:
	// Exec must still take the workload's.
	spec := testSpec(t, "busybox", "-c", "(ORPHAN=yes sleep 1000 &); sleep 0.1; echo ready; exec sleep 1000")
	secret := "hush-" + randHex(16)
	spec.Env["DATABASE_PASSWORD"] = secret
	start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")

	res, err := d.Exec(context.Background(), spec, []string{"env"}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec env: %v %+v", err, res)
	}
	if !strings.Contains(string(res.Stdout), "DATABASE_PASSWORD="+secret+"\n") {
		t.Errorf("exec'd command lacks the machine's environment: %q", res.Stdout)
	}
	if strings.Contains(string(res.Stdout), "ORPHAN=") {
		t.Errorf("exec'd command has an orphan's environment: %q", res.Stdout)
	}
	for _, dir := range []string{spec.Dir, d.cfg.StateDir} {
		err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if p == mountDir(spec) {
				return fs.SkipDir // the machine's own root filesystem
			}
			if !e.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if strings.Contains(string(b), secret) {
				t.Errorf("%s holds the machine's secret", p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{stateFile, filepath.Base(spec.LogPath)} {
		fi, err := os.Stat(filepath.Join(spec.Dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v, want no access but the owner's", name, fi.Mode().Perm())
		}
	}
	for _, sub := range []string{"leases/addrs", "leases/machines"} {
		fi, err := os.Stat(filepath.Join(d.cfg.StateDir, sub))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("state dir %s has mode %v", sub, fi.Mode().Perm())
		}
	}
}
