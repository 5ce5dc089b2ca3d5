package sandbox

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDiskQuota: a machine writing past its rootfs_size_mb gets ENOSPC,
// from the workload as from an exec'd command; what it wrote is in its own
// tmpfs, never on the host's disk; and the space is the machine's alone
// (another machine still writes).
func TestDiskQuota(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", "dd if=/dev/zero of=/big bs=1M count=64 2>&1; echo dd-exit=$?; exec sleep 1000")
	spec.RootfsSizeMB = 16
	start(t, d, spec)
	out := waitLog(t, spec.LogPath, "dd-exit=")
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "dd-exit=0") {
		t.Fatalf("writing 64 MiB on a 16 MiB root filesystem:\n%s", out)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mountDir(spec), &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("writable layer on a file system of type %#x, want tmpfs", st.Type)
	}
	if total := int64(st.Blocks) * st.Bsize; total != 16<<20 {
		t.Errorf("writable layer of %d bytes, want %d", total, 16<<20)
	}
	// The file is there, cut at the limit, in the machine's tmpfs.
	fi, err := os.Stat(filepath.Join(mountDir(spec), "upper", "big"))
	if err != nil || fi.Size() > 16<<20 || fi.Size() < 8<<20 {
		t.Fatalf("upper/big: %v %v", fi, err)
	}
	res, err := d.Exec(t.Context(), spec, []string{"sh", "-c", "echo more > /more"}, nil)
	if err != nil || res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "No space left") {
		t.Errorf("exec writing to a full root filesystem: %v %+v", err, res)
	}

	other := testSpec(t, "busybox", "-c", "dd if=/dev/zero of=/f bs=1M count=4 2>&1; echo dd-exit=$?; exec sleep 1000")
	start(t, d, other)
	if out := waitLog(t, other.LogPath, "dd-exit="); !strings.Contains(out, "dd-exit=0") {
		t.Errorf("another machine's write:\n%s", out)
	}
}
