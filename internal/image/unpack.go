package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Whiteouts, as OCI layers spell them: ".wh.<name>" deletes name from the
// layers below, ".wh..wh..opq" in a directory hides everything below it.
const (
	whPrefix = ".wh."
	whOpaque = ".wh..wh..opq"
)

// overlayOpaque is the xattr overlayfs reads to treat a directory as opaque.
const overlayOpaque = "trusted.overlay.opaque"

// layerForm is how a layer's whiteouts are stored once unpacked.
type layerForm string

const (
	// formOverlay: whiteouts are 0/0 character devices and opaque
	// directories carry trusted.overlay.opaque=y; overlayfs reads the
	// directory as a lower layer directly. Needs CAP_MKNOD and
	// CAP_SYS_ADMIN (trusted xattrs).
	formOverlay layerForm = "overlay"
	// formOCI: whiteouts stay the empty ".wh." files of the tar; only the
	// copying fallback of Mount understands them.
	formOCI layerForm = "oci"
)

// unpackStats counts what unpack wrote and left out.
type unpackStats struct {
	skipped int   // device files and other entries a layer may not carry
	bytes   int64 // file content written
	entries int64 // entries of the tar unpacked (files, directories, links, whiteouts)
}

// Limits bound what one layer may unpack to, so that a small download
// cannot fill the host's disk or inodes (a decompression bomb: gigabytes of
// zeros compress to megabytes). A zero field takes its default.
type Limits struct {
	// MaxLayerBytes caps the content of a layer's files once unpacked
	// (their sizes as the tar gives them, sparse files counted whole).
	MaxLayerBytes int64
	// MaxLayerEntries caps how many entries (files, directories, links,
	// whiteouts) a layer unpacks.
	MaxLayerEntries int64
}

// Default limits of one unpacked layer: larger than any layer of a real
// image and far below what fills a host.
const (
	DefaultMaxLayerBytes   = 8 << 30
	DefaultMaxLayerEntries = 1 << 20
)

func (l Limits) withDefaults() Limits {
	if l.MaxLayerBytes <= 0 {
		l.MaxLayerBytes = DefaultMaxLayerBytes
	}
	if l.MaxLayerEntries <= 0 {
		l.MaxLayerEntries = DefaultMaxLayerEntries
	}
	return l
}

// unpack extracts the layer tar r into the directory dir (which exists and
// is empty), converting whiteouts to form. Every path stays inside dir: names
// are cleaned of "..", and files are created through an os.Root, so neither
// a name nor a symlink unpacked earlier can point a write outside. Device
// files, other than whiteouts in overlay form, are not created. Owners are
// applied when chown is true. A layer past lim is refused with ErrTooLarge
// before the entry that would pass it is written; the caller removes dir.
func unpack(r io.Reader, dir string, form layerForm, chown bool, lim Limits) (unpackStats, error) {
	var st unpackStats
	lim = lim.withDefaults()
	root, err := os.OpenRoot(dir)
	if err != nil {
		return st, err
	}
	defer root.Close()
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return st, nil
		}
		if err != nil {
			return st, fmt.Errorf("read tar: %w", err)
		}
		name, err := cleanName(hdr.Name)
		if err != nil {
			return st, err
		}
		if name == "." {
			continue
		}
		if st.entries++; st.entries > lim.MaxLayerEntries {
			return st, fmt.Errorf("%w: layer has more than %d entries", ErrTooLarge, lim.MaxLayerEntries)
		}
		if hdr.Typeflag == tar.TypeReg {
			// The size is the header's: a body longer than it is not
			// read (the tar reader stops there).
			if hdr.Size < 0 || hdr.Size > lim.MaxLayerBytes-st.bytes {
				return st, fmt.Errorf("%w: layer unpacks to more than %d bytes (at %s)", ErrTooLarge, lim.MaxLayerBytes, hdr.Name)
			}
			st.bytes += hdr.Size
		}
		if err := unpackEntry(root, tr, hdr, name, form, chown, &st); err != nil {
			return st, fmt.Errorf("%s: %w", hdr.Name, err)
		}
	}
}

// cleanName turns a tar entry name into a path relative to the layer root,
// refusing names that climb out of it.
func cleanName(name string) (string, error) {
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("tar entry %q: NUL in name", name)
	}
	for _, elem := range strings.Split(strings.ReplaceAll(name, `\`, "/"), "/") {
		if elem == ".." {
			return "", fmt.Errorf("tar entry %q: path leaves the layer", name)
		}
	}
	clean := path.Clean("/" + name)
	if clean == "/" {
		return ".", nil
	}
	return clean[1:], nil
}

func unpackEntry(root *os.Root, tr *tar.Reader, hdr *tar.Header, name string, form layerForm, chown bool, st *unpackStats) error {
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		dir = "."
	}
	if dir != "." {
		if err := mkdirAll(root, dir); err != nil {
			return err
		}
	}

	if base == whOpaque {
		if form == formOCI {
			return writeEmpty(root, name)
		}
		return setOpaque(root, dir)
	}
	if target, ok := strings.CutPrefix(base, whPrefix); ok {
		if target == "" || target == "." || target == ".." {
			return errors.New("malformed whiteout")
		}
		if form == formOCI {
			return writeEmpty(root, name)
		}
		if err := removeExisting(root, path.Join(dir, target)); err != nil {
			return err
		}
		return mknodWhiteout(root, dir, target)
	}

	mode := hdr.FileInfo().Mode()
	perm := mode & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if fi, err := root.Lstat(name); err == nil && !fi.IsDir() {
			if err := root.Remove(name); err != nil {
				return err
			}
		}
		if err := root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		if err := lchown(root, name, hdr, chown); err != nil {
			return err
		}
		return root.Chmod(name, perm)
	case tar.TypeReg: // the reader reports the old TypeRegA as TypeReg
		if err := removeExisting(root, name); err != nil {
			return err
		}
		f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		// Owner before mode: chown clears setuid and setgid bits.
		if err := lchown(root, name, hdr, chown); err != nil {
			return err
		}
		if err := root.Chmod(name, perm); err != nil {
			return err
		}
		return root.Chtimes(name, hdr.ModTime, hdr.ModTime)
	case tar.TypeSymlink:
		if err := removeExisting(root, name); err != nil {
			return err
		}
		// The target is stored as is: it is resolved later inside the
		// machine's root, never while unpacking or copying.
		if err := root.Symlink(hdr.Linkname, name); err != nil {
			return err
		}
		return lchown(root, name, hdr, chown)
	case tar.TypeLink:
		old, err := cleanName(hdr.Linkname)
		if err != nil || old == "." {
			return fmt.Errorf("hard link to %q leaves the layer", hdr.Linkname)
		}
		if err := removeExisting(root, name); err != nil {
			return err
		}
		if err := root.Link(old, name); err != nil {
			return err
		}
		return nil // shares owner and mode with its target
	default:
		// Character and block devices, FIFOs and anything newer: a
		// machine gets its devices from the runtime, not its image.
		st.skipped++
		return nil
	}
}

func lchown(root *os.Root, name string, hdr *tar.Header, chown bool) error {
	if !chown {
		return nil
	}
	return root.Lchown(name, hdr.Uid, hdr.Gid)
}

// mkdirAll creates dir and its parents; an existing non-directory in the
// way (a file or a symlink from earlier in the same layer) is an error, so
// no write ever goes through a symlink.
func mkdirAll(root *os.Root, dir string) error {
	p := ""
	for _, elem := range strings.Split(dir, "/") {
		p = path.Join(p, elem)
		fi, err := root.Lstat(p)
		switch {
		case err == nil && fi.IsDir():
			continue
		case err == nil:
			return fmt.Errorf("%s is not a directory", p)
		case !errors.Is(err, fs.ErrNotExist):
			return err
		}
		if err := root.Mkdir(p, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	return nil
}

// removeExisting makes way for a new entry at name: what an earlier entry
// of the same layer put there goes (a directory with its contents).
func removeExisting(root *os.Root, name string) error {
	if _, err := root.Lstat(name); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return root.RemoveAll(name)
}

func writeEmpty(root *os.Root, name string) error {
	if err := removeExisting(root, name); err != nil {
		return err
	}
	return root.WriteFile(name, nil, 0o600)
}

func setOpaque(root *os.Root, dir string) error {
	f, err := root.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fsetxattr(int(f.Fd()), overlayOpaque, []byte("y"), 0); err != nil {
		return fmt.Errorf("mark %s opaque: %w", dir, err)
	}
	return nil
}

func mknodWhiteout(root *os.Root, dir, name string) error {
	f, err := root.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Mknodat(int(f.Fd()), name, unix.S_IFCHR|0o600, 0); err != nil {
		return fmt.Errorf("whiteout %s: %w", path.Join(dir, name), err)
	}
	return nil
}

// isWhiteoutDevice reports whether fi is an overlay whiteout (char 0/0).
func isWhiteoutDevice(fi fs.FileInfo) bool {
	if fi.Mode()&fs.ModeCharDevice == 0 {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && st.Rdev == 0
}
