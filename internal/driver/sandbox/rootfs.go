package sandbox

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// setupRoot runs in the init, root of its own user namespace, in its new
// mount namespace with mounts made private: it attaches the image's root
// filesystem (tree, a detached and idmapped mount the driver cloned) and
// makes it the root (pivot_root), mounts /proc, /dev and /sys, and writes
// the machine's hostname, /etc/hosts and /etc/resolv.conf.
//
// The tree is attached over "/", a path the init can reach: its ids are
// not the host's, so it may not search the host directories (0700) that
// hold the root filesystem's own mount point. /proc, /sys and /dev's
// devices are mounted before pivot_root, while the host's are in sight: a
// user namespace may mount proc and sysfs only where a full instance of
// them is visible, and cannot make device nodes (it binds the host's).
func setupRoot(cfg *initConfig, tree int) error {
	defer unix.Close(tree)
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, "/", unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach root filesystem: %w", err)
	}
	if err := unix.Fchdir(tree); err != nil {
		return fmt.Errorf("chdir to root filesystem: %w", err)
	}
	// A clone of a shared mount is shared: pivot_root refuses it.
	if err := unix.Mount("", ".", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make root filesystem private: %w", err)
	}
	// Device nodes an image carries must not open devices: only /dev,
	// mounted below, has them (the driver made the tree nodev already).
	var st unix.Statfs_t
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NODEV)
	if err := unix.Statfs(".", &st); err == nil && st.Flags&unix.ST_RDONLY != 0 {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", ".", "", flags, ""); err != nil {
		return fmt.Errorf("remount root filesystem nodev: %w", err)
	}
	if err := mountProc(); err != nil {
		return err
	}
	if err := mountDev(); err != nil {
		return err
	}
	// sysfs is a convenience (and needs the network namespace): read-only.
	if err := mountPoint("sys", 0o555); err == nil {
		_ = unix.Mount("sysfs", "sys", "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	}
	// pivot_root(".", ".") stacks the old root on top of the new one;
	// detaching it leaves the new root alone, no put_old directory needed.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := protectProc(); err != nil {
		return err
	}
	if err := maskPaths(); err != nil {
		return err
	}
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	// Written after pivot_root, so that links in the image resolve inside
	// it. A read-only image keeps its own files.
	if err := os.MkdirAll("/etc", 0o755); err == nil {
		for _, f := range []struct{ name, data string }{
			{"/etc/hosts", cfg.Hosts},
			{"/etc/resolv.conf", cfg.Resolv},
			{"/etc/hostname", cfg.Hostname + "\n"},
		} {
			if err := os.WriteFile(f.name, []byte(f.data), 0o644); err != nil {
				fmt.Fprintf(os.Stderr, "flame sandbox-init: write %s: %v\n", f.name, err)
			}
		}
	}
	return nil
}

// mountPoint makes name, in the current directory (the new root, before
// pivot_root), a directory to mount on. Whatever the image has there that
// is not a directory goes: a symlink would point the mount outside the new
// root, at the host's tree still in place.
func mountPoint(name string, perm uint32) error {
	var st unix.Stat_t
	err := unix.Lstat(name, &st)
	if err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return nil
	}
	if err == nil {
		if err := unix.Unlink(name); err != nil {
			return fmt.Errorf("make mount point %s: %w", name, err)
		}
	} else if !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("make mount point %s: %w", name, err)
	}
	if err := unix.Mkdir(name, perm); err != nil {
		return fmt.Errorf("make mount point %s: %w", name, err)
	}
	return nil
}

// mountProc mounts the sandbox's /proc, at proc in the new root before
// pivot_root.
func mountProc() error {
	if err := mountPoint("proc", 0o555); err != nil {
		return err
	}
	if err := unix.Mount("proc", "proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	return nil
}

// protectProc makes the files of /proc that reach beyond the sandbox
// read-only, after pivot_root.
func protectProc() error {
	for _, p := range []string{"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"} {
		if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("protect %s: %w", p, err)
		}
		if err := unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("protect %s: %w", p, err)
		}
	}
	return nil
}

// maskedPaths are hidden from the sandbox as runc hides them: they tell of
// the host (its keyrings, timers, scheduler, memory) or reach its hardware.
// A file is covered with /dev/null, a directory with an empty read-only
// tmpfs.
var maskedPaths = []string{
	"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/key-users",
	"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
	"/proc/sched_debug", "/proc/scsi", "/proc/kpagecount", "/proc/kpageflags",
	"/proc/kpagecgroup", "/sys/firmware", "/sys/devices/virtual/powercap",
}

// maskPaths covers maskedPaths; it runs once /proc, /sys and /dev are
// mounted. A path the kernel does not have is skipped.
func maskPaths() error {
	for _, p := range maskedPaths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("mask %s: %w", p, err)
		}
		var err error
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=0,mode=555")
		} else {
			err = unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
		}
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("mask %s: %w", p, err)
		}
	}
	return nil
}

// mountDev gives the sandbox a minimal /dev of its own, at dev in the new
// root before pivot_root: a tmpfs with the host's harmless devices bound
// into it (a user namespace makes no device nodes, and its tmpfs would not
// open them).
func mountDev() error {
	if err := mountPoint("dev", 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", "dev", "tmpfs", unix.MS_NOSUID|unix.MS_STRICTATIME, "mode=755,size=65536k"); err != nil {
		return fmt.Errorf("mount /dev: %w", err)
	}
	for _, name := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		p := "dev/" + name
		fd, err := unix.Open(p, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o666)
		if err != nil {
			return fmt.Errorf("mount point %s: %w", p, err)
		}
		unix.Close(fd)
		if err := unix.Mount("/dev/"+name, p, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind /dev/%s: %w", name, err)
		}
	}
	if err := unix.Mkdir("dev/pts", 0o755); err != nil {
		return err
	}
	if err := unix.Mount("devpts", "dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"); err != nil {
		return fmt.Errorf("mount /dev/pts: %w", err)
	}
	if err := unix.Mkdir("dev/shm", 0o1777); err != nil {
		return err
	}
	if err := unix.Mount("shm", "dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=1777,size=65536k"); err != nil {
		return fmt.Errorf("mount /dev/shm: %w", err)
	}
	for _, l := range [][2]string{
		{"pts/ptmx", "dev/ptmx"}, {"/proc/self/fd", "dev/fd"},
		{"/proc/self/fd/0", "dev/stdin"}, {"/proc/self/fd/1", "dev/stdout"},
		{"/proc/self/fd/2", "dev/stderr"},
	} {
		if err := unix.Symlink(l[0], l[1]); err != nil {
			return fmt.Errorf("symlink %s: %w", l[1], err)
		}
	}
	return nil
}
