package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Inside the directory a caller gives Mount.
const (
	mountRootfs = "rootfs"      // the machine's root filesystem
	mountUpper  = "upper"       // overlay: the machine's writes
	mountWork   = "work"        // overlay: overlayfs's scratch space
	copyDone    = ".rootfs-ok"  // copy: rootfs is complete
	emptyLower  = "empty-layer" // under the store: the lower dir of a layerless image
)

// maxMountData is the most a mount(2) option string may hold (one page,
// less a margin); images whose layer list is longer are copied instead.
const maxMountData = 4000

// Mount gives img a copy-on-write root filesystem at dir/rootfs and returns
// that path. With overlayfs it is an overlay mount whose lower layers are
// the store's shared layer directories and whose upper is dir/upper, so
// nothing is copied. Without it (no privileges, or a kernel without
// overlayfs) the layers are copied into dir/rootfs, bottom first, applying
// whiteouts. Mount is idempotent: a rootfs already mounted (or completely
// copied) in dir is returned as is, and an existing dir/upper is kept.
func (s *Store) Mount(ctx context.Context, img *Image, dir string) (string, error) {
	rootfs := filepath.Join(dir, mountRootfs)
	lowers, overlay, err := s.lowerDirs(img)
	if err != nil {
		return "", fmt.Errorf("mount %s: %w", img.Ref, err)
	}
	if len(img.Layers) == 0 {
		lowers = nil // overlayOptions puts the empty layer
	}
	if overlay {
		opts, ok := overlayOptions(lowers, filepath.Join(s.dir, emptyLower), dir)
		if ok {
			if err := s.mountOverlay(rootfs, dir, opts); err != nil {
				return "", fmt.Errorf("mount %s: %w", img.Ref, err)
			}
			return rootfs, nil
		}
		s.log.Debug("layer list too long for an overlay mount; copying", "image", img.Ref, "layers", len(lowers))
	}
	if err := s.copyLayers(ctx, rootfs, dir, lowers); err != nil {
		return "", fmt.Errorf("mount %s: %w", img.Ref, err)
	}
	return rootfs, nil
}

// overlayOptions builds the mount data: lowerdir lists the top layer first.
func overlayOptions(lowers []string, empty, dir string) (string, bool) {
	if strings.ContainsAny(dir, ",:") {
		return "", false
	}
	top := make([]string, 0, len(lowers))
	for i := len(lowers) - 1; i >= 0; i-- {
		top = append(top, lowers[i])
	}
	if len(top) == 0 {
		top = append(top, empty)
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s",
		strings.Join(top, ":"), filepath.Join(dir, mountUpper), filepath.Join(dir, mountWork))
	return opts, len(opts) <= maxMountData
}

func (s *Store) mountOverlay(rootfs, dir, opts string) error {
	if mounted, err := isMountpoint(rootfs); err != nil {
		return err
	} else if mounted {
		return nil
	}
	for _, d := range []string{mountRootfs, mountUpper, mountWork} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	if err := unix.Mount("overlay", rootfs, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay mount on %s: %w", rootfs, err)
	}
	return nil
}

// copyLayers is Mount's fallback: it copies the layers into rootfs.
func (s *Store) copyLayers(ctx context.Context, rootfs, dir string, lowers []string) error {
	if _, err := os.Stat(filepath.Join(dir, copyDone)); err == nil {
		return nil
	}
	if err := os.RemoveAll(rootfs); err != nil {
		return err
	}
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, l := range lowers {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := applyLayer(root, l, s.chown); err != nil {
			return fmt.Errorf("copy layer %s: %w", filepath.Base(filepath.Dir(l)), err)
		}
	}
	return os.WriteFile(filepath.Join(dir, copyDone), nil, 0o644)
}

// applyLayer copies the unpacked layer src over dst, deleting what its
// whiteouts (in either form) name and emptying its opaque directories.
func applyLayer(dst *os.Root, src string, chown bool) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil || rel == "." {
			return err
		}
		base := d.Name()
		parent := filepath.Dir(rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case base == whOpaque:
			return nil // applied with its directory
		case strings.HasPrefix(base, whPrefix):
			return dst.RemoveAll(filepath.Join(parent, strings.TrimPrefix(base, whPrefix)))
		case isWhiteoutDevice(fi):
			return dst.RemoveAll(rel)
		case d.IsDir():
			existing, err := dst.Lstat(rel)
			switch {
			case err == nil && existing.IsDir() && isOpaque(p):
				if err := emptyDir(dst, rel); err != nil {
					return err
				}
			case err == nil && !existing.IsDir():
				if err := dst.Remove(rel); err != nil {
					return err
				}
				fallthrough
			case errors.Is(err, fs.ErrNotExist):
				if err := dst.Mkdir(rel, 0o755); err != nil {
					return err
				}
			case err != nil:
				return err
			}
			if err := copyOwner(dst, rel, fi, chown); err != nil {
				return err
			}
			return dst.Chmod(rel, fi.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
		case fi.Mode().IsRegular():
			if err := dst.RemoveAll(rel); err != nil {
				return err
			}
			if err := copyFile(dst, rel, p); err != nil {
				return err
			}
			if err := copyOwner(dst, rel, fi, chown); err != nil {
				return err
			}
			if err := dst.Chmod(rel, fi.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
				return err
			}
			return dst.Chtimes(rel, fi.ModTime(), fi.ModTime())
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := dst.RemoveAll(rel); err != nil {
				return err
			}
			if err := dst.Symlink(target, rel); err != nil {
				return err
			}
			return copyOwner(dst, rel, fi, chown)
		}
		return nil // nothing else is ever unpacked
	})
}

func isOpaque(dir string) bool {
	var v [1]byte
	if n, err := unix.Lgetxattr(dir, overlayOpaque, v[:]); err == nil && n == 1 && v[0] == 'y' {
		return true
	}
	_, err := os.Lstat(filepath.Join(dir, whOpaque))
	return err == nil
}

func emptyDir(root *os.Root, dir string) error {
	f, err := root.Open(dir)
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := root.RemoveAll(filepath.Join(dir, n)); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(dst *os.Root, rel, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := dst.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func copyOwner(dst *os.Root, rel string, fi fs.FileInfo, chown bool) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !chown || !ok {
		return nil
	}
	return dst.Lchown(rel, int(st.Uid), int(st.Gid))
}

// Unmount undoes Mount in dir: it unmounts dir/rootfs if it is mounted and
// removes rootfs and the machine's writes. It is idempotent.
func (s *Store) Unmount(ctx context.Context, dir string) error {
	rootfs := filepath.Join(dir, mountRootfs)
	for range 8 {
		mounted, err := isMountpoint(rootfs)
		if err != nil {
			return fmt.Errorf("unmount %s: %w", rootfs, err)
		}
		if !mounted {
			break
		}
		if err := unix.Unmount(rootfs, 0); err != nil {
			if !errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("unmount %s: %w", rootfs, err)
			}
			// Something still has it open: detach it now, the kernel
			// frees it when the last user goes.
			if err := unix.Unmount(rootfs, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", rootfs, err)
			}
		}
	}
	if mounted, _ := isMountpoint(rootfs); mounted {
		return fmt.Errorf("unmount %s: still mounted", rootfs)
	}
	for _, d := range []string{copyDone, mountRootfs, mountUpper, mountWork} {
		if err := os.RemoveAll(filepath.Join(dir, d)); err != nil {
			return fmt.Errorf("unmount: %w", err)
		}
	}
	return nil
}

// isMountpoint reports whether p is the root of a mount: overlay mounts get
// a device of their own.
func isMountpoint(p string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if err := unix.Lstat(filepath.Dir(p), &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino, nil
}

// probe finds out, in the scratch directory tmp, whether this host can
// store layers in overlay form and mount overlayfs.
func probe(tmp string) (layerForm, bool) {
	dir, err := os.MkdirTemp(tmp, "probe-")
	if err != nil {
		return formOCI, false
	}
	defer os.RemoveAll(dir)
	lower := filepath.Join(dir, "lower")
	if err := os.MkdirAll(filepath.Join(lower, "opaque"), 0o755); err != nil {
		return formOCI, false
	}
	if unix.Mknod(filepath.Join(lower, "gone"), unix.S_IFCHR|0o600, 0) != nil ||
		unix.Setxattr(filepath.Join(lower, "opaque"), overlayOpaque, []byte("y"), 0) != nil {
		return formOCI, false
	}
	for _, d := range []string{"upper", "work", "merged"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return formOverlay, false
		}
	}
	merged := filepath.Join(dir, "merged")
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		return formOverlay, false
	}
	defer unix.Unmount(merged, unix.MNT_DETACH)
	_, err = os.Lstat(filepath.Join(merged, "gone"))
	return formOverlay, errors.Is(err, fs.ErrNotExist)
}
