package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// MountTree is Mount for a machine in a user namespace of its own (userns,
// an open /proc/<pid>/ns/user): it returns the machine's root filesystem
// as a detached mount (a file descriptor, as open_tree gives; the caller
// attaches it where it wants and closes it), nodev, whose image layers show
// the namespace's ids: a file a layer owns as uid 0 is owned by the
// namespace's root, whose id outside is rootID. Nothing is copied or
// chowned for that (see MountIDMapped). Without overlayfs the copy Mount
// makes in dir/rootfs is mapped the same way. It is idempotent as Mount is.
func (s *Store) MountTree(ctx context.Context, img *Image, dir string, userns int, rootID uint32) (int, error) {
	lowers, overlay, err := s.lowerDirs(img)
	if err != nil {
		return -1, fmt.Errorf("mount %s: %w", img.Ref, err)
	}
	if overlay {
		tree, err := MountIDMapped(lowers, dir, userns, rootID)
		if err != nil {
			return -1, fmt.Errorf("mount %s: %w", img.Ref, err)
		}
		return tree, nil
	}
	rootfs := filepath.Join(dir, mountRootfs)
	if err := s.copyLayers(ctx, rootfs, dir, lowers); err != nil {
		return -1, fmt.Errorf("mount %s: %w", img.Ref, err)
	}
	tree, err := idmappedClone(rootfs, userns)
	if err != nil {
		return -1, fmt.Errorf("mount %s: %w", img.Ref, err)
	}
	return tree, nil
}

// lowerDirs are img's unpacked layers, bottom first, and whether all are
// in overlay form (the host's).
func (s *Store) lowerDirs(img *Image) ([]string, bool, error) {
	lowers := make([]string, len(img.Layers))
	overlay := s.overlay
	for i, l := range img.Layers {
		hexd, ok := strings.CutPrefix(l.Digest, "sha256:")
		if !ok || strings.ContainsAny(hexd, "/.") {
			return nil, false, fmt.Errorf("%w: layer digest %q", ErrInvalid, l.Digest)
		}
		b, err := os.ReadFile(filepath.Join(s.layerDir(hexd), "layer.json"))
		if err != nil {
			return nil, false, fmt.Errorf("%w: layer %s is not in the store (pull the image again)", ErrNotFound, l.Digest)
		}
		var meta layerMeta
		if err := json.Unmarshal(b, &meta); err != nil {
			return nil, false, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		if meta.Form != formOverlay {
			overlay = false
		}
		lowers[i] = filepath.Join(s.layerDir(hexd), "fs")
	}
	if len(lowers) == 0 {
		lowers = append(lowers, filepath.Join(s.dir, emptyLower))
	}
	return lowers, overlay, nil
}

// MountIDMapped makes a detached overlayfs mount (nodev) of the layer
// directories lowers (bottom first) with dir/upper for its writes and
// dir/work, and returns it. Each lower layer is an idmapped mount of its
// directory (mount_setattr MOUNT_ATTR_IDMAP with the user namespace
// userns), so that the layers, shared by every machine of the host, show
// the namespace's ids without a copy; overlayfs itself takes no idmapping.
// The upper layer is not idmapped (overlayfs writes to it as the host's
// root, the mounter): what the machine writes is stored with its ids as
// the host sees them (rootID and up), and goes with the machine. Its top
// directory, the root of the tree, belongs to the namespace's root.
// Overlayfs has taken layers as descriptors since Linux 6.13, idmapped
// layers since 5.19: an older kernel fails here.
func MountIDMapped(lowers []string, dir string, userns int, rootID uint32) (tree int, err error) {
	for _, d := range []string{mountUpper, mountWork} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return -1, err
		}
	}
	upper := filepath.Join(dir, mountUpper)
	if err := os.Lchown(upper, int(rootID), int(rootID)); err != nil {
		return -1, err
	}
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("open overlay: %w", err)
	}
	defer unix.Close(fsfd)
	// lowerdir+ stacks each layer below the ones given before it. A
	// detached mount lives as long as its descriptor: they are kept until
	// the overlay is made.
	// Closing them dissolves each one's mount, and an unmount waits for
	// an RCU grace period (milliseconds on a busy host): that is done off
	// the caller's way, on a thread of its own.
	var layers []int
	defer func() {
		go closeAll(layers)
	}()
	for i := len(lowers) - 1; i >= 0; i-- {
		fd, err := idmappedClone(lowers[i], userns)
		if err != nil {
			return -1, err
		}
		layers = append(layers, fd)
		if err := unix.FsconfigSetFd(fsfd, "lowerdir+", fd); err != nil {
			return -1, fmt.Errorf("overlay layer %s (needs Linux 6.13 or later): %w", lowers[i], err)
		}
	}
	for _, d := range []string{mountUpper, mountWork} {
		fd, err := unix.Open(filepath.Join(dir, d), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		err = unix.FsconfigSetFd(fsfd, d+"dir", fd)
		unix.Close(fd)
		if err != nil {
			return -1, fmt.Errorf("overlay %sdir: %w", d, err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("create overlay: %w%s", err, FSLog(fsfd))
	}
	tree, err = unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return -1, fmt.Errorf("mount overlay: %w", err)
	}
	return tree, nil
}

// idmappedClone is a detached copy of the mount at dir (open_tree), nodev
// and idmapped to the user namespace userns.
func idmappedClone(dir string, userns int) (int, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("clone mount of %s: %w", dir, err)
	}
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_NODEV, Userns_fd: uint64(userns)}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("idmapped mount of %s (needs Linux 5.12 or later, and a file system that takes idmappings): %w", dir, err)
	}
	return fd, nil
}

// FSLog is what the kernel said about a file system context's failure
// (read from its descriptor, fsopen(2)), as " (<messages>)", or "".
func FSLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for range 8 {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	if len(msgs) == 0 {
		return ""
	}
	return " (" + strings.Join(msgs, "; ") + ")"
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
