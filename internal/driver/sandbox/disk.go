package sandbox

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
)

// A machine's writes to its root filesystem (the overlay's upper layer,
// and overlayfs's work directory) go to a tmpfs of their own, mounted on
// the machine's root filesystem directory and sized by the guest's
// rootfs_size_mb: past it a write fails with ENOSPC, and nothing the
// machine writes reaches the host's disk. The tmpfs's pages are charged to
// the machine's memory cgroup (they are the writer's), so a machine never
// holds more than its memory in its writes either: past memory_mb the OOM
// killer strikes, as for any memory it takes. A mount costs tens of
// microseconds, where a disk of its own (a sparse ext4 image on a loop
// device: mkfs, losetup, mount) would cost tens of milliseconds at each
// start; project quotas on the host's file system would keep writes on
// disk, but need it mounted with prjquota, which Flame cannot count on
// (this host's root is not). Its inodes are capped too (one per 4 KiB).

// rootfsBytes is the size of spec's writable layer.
func rootfsBytes(spec driver.Spec) int64 {
	mb := spec.RootfsSizeMB
	if mb <= 0 {
		mb = api.DefaultGuestRootfsSizeMB
	}
	return int64(mb) << 20
}

// mountDisk mounts the tmpfs that holds spec's writes on dir.
func mountDisk(spec driver.Spec, dir string) error {
	size := rootfsBytes(spec)
	opts := "mode=0700,size=" + strconv.FormatInt(size, 10) + ",nr_inodes=" + strconv.FormatInt(size/4096, 10)
	// Not noexec nor nosuid: a program the machine writes, or an image's
	// set-user-id program copied up, runs as from the layers.
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("mount writable layer: %w", err)
	}
	return nil
}

// unmountDisk unmounts what mountDisk mounted on dir, if anything; the
// overlay that used it may still be in use (a sandbox's mount namespace
// ending): the tmpfs goes with its last user.
func unmountDisk(dir string) error {
	for range 8 {
		var st unix.Statfs_t
		var self, parent unix.Stat_t
		if err := unix.Statfs(dir, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return fmt.Errorf("unmount writable layer: %w", err)
		}
		if unix.Lstat(dir, &self) != nil || unix.Lstat(filepath.Dir(dir), &parent) != nil ||
			self.Dev == parent.Dev || st.Type != unix.TMPFS_MAGIC {
			return nil // not a mount of its own
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount writable layer: %w", err)
		}
	}
	return nil
}
