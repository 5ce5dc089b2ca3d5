package image

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"
)

// LocalImage is an image read from local files (by Build or Import). Close
// removes any temporary files it is backed by; use it until then.
type LocalImage struct {
	v1.Image
	cleanup []string
}

// Close removes the temporary files behind the image.
func (l *LocalImage) Close() error {
	var errs []error
	for _, p := range l.cleanup {
		errs = append(errs, os.RemoveAll(p))
	}
	return errors.Join(errs...)
}

// Import reads an image from path: a `docker save` tarball (plain or
// gzipped), an OCI image layout directory, or a tarball of one. A layout
// or tarball holding several images must hold exactly one for linux and
// this host's architecture. Temporary files go to tempDir ("" for the
// system's).
func Import(path, tempDir string) (*LocalImage, error) {
	img, err := importImage(path, tempDir)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", path, err)
	}
	return img, nil
}

func importImage(path, tempDir string) (*LocalImage, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.IsDir() {
		img, err := fromLayout(path)
		if err != nil {
			return nil, err
		}
		return &LocalImage{Image: img}, nil
	}
	li := &LocalImage{}
	tarPath := path
	if gz, err := isGzip(path); err != nil {
		return nil, err
	} else if gz {
		if tarPath, err = gunzipTo(path, tempDir); err != nil {
			return nil, err
		}
		li.cleanup = append(li.cleanup, tarPath)
	}
	names, err := tarNames(tarPath)
	if err != nil {
		li.Close()
		return nil, err
	}
	switch {
	case names["manifest.json"]:
		img, err := tarball.ImageFromPath(tarPath, nil)
		if err != nil {
			li.Close()
			return nil, fmt.Errorf("%w: docker save tarball: %v", ErrInvalid, err)
		}
		// Read the config now, so a broken tarball fails here and not
		// halfway through a push.
		if _, err := img.ConfigFile(); err != nil {
			li.Close()
			return nil, fmt.Errorf("%w: docker save tarball: %v", ErrInvalid, err)
		}
		li.Image = img
		return li, nil
	case names["oci-layout"]:
		dir, err := os.MkdirTemp(tempDir, "flame-oci-")
		if err != nil {
			li.Close()
			return nil, err
		}
		li.cleanup = append(li.cleanup, dir)
		f, err := os.Open(tarPath)
		if err != nil {
			li.Close()
			return nil, err
		}
		_, err = unpack(f, dir, formOCI, false, Limits{})
		f.Close()
		if err != nil {
			li.Close()
			return nil, fmt.Errorf("%w: OCI layout tarball: %v", ErrInvalid, err)
		}
		if li.Image, err = fromLayout(dir); err != nil {
			li.Close()
			return nil, err
		}
		return li, nil
	}
	li.Close()
	return nil, fmt.Errorf("%w: neither a docker save tarball (no manifest.json) nor an OCI layout (no oci-layout file)", ErrInvalid)
}

func isGzip(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	var magic [2]byte
	n, _ := io.ReadFull(f, magic[:])
	return n == 2 && magic[0] == 0x1f && magic[1] == 0x8b, nil
}

func gunzipTo(path, tempDir string) (string, error) {
	in, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer in.Close()
	zr, err := gzip.NewReader(bufio.NewReader(in))
	if err != nil {
		return "", fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	}
	out, err := os.CreateTemp(tempDir, "flame-import-*.tar")
	if err != nil {
		return "", err
	}
	_, err = io.Copy(out, zr)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out.Name())
		return "", fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	}
	return out.Name(), nil
}

// tarNames lists the top-level files of a tarball; a file that is not a
// tarball is an error saying so.
func tarNames(path string) (map[string]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names := map[string]bool{}
	tr := tar.NewReader(bufio.NewReader(f))
	for i := 0; ; i++ {
		hdr, err := tr.Next()
		if err == io.EOF {
			if i == 0 {
				return nil, fmt.Errorf("%w: empty tarball", ErrInvalid)
			}
			return names, nil
		}
		if err != nil {
			if i == 0 {
				return nil, fmt.Errorf("%w: not a tarball (%v)", ErrInvalid, err)
			}
			return nil, fmt.Errorf("%w: broken tarball: %v", ErrInvalid, err)
		}
		names[strings.TrimPrefix(filepath.Clean(hdr.Name), "./")] = true
	}
}

// fromLayout picks the image in an OCI layout.
func fromLayout(dir string) (v1.Image, error) {
	if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
		return nil, fmt.Errorf("%w: %s is not an OCI image layout (no oci-layout file)", ErrInvalid, dir)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: OCI layout: %v", ErrInvalid, err)
	}
	img, err := pickFromIndex(idx, 0)
	if err != nil {
		return nil, fmt.Errorf("OCI layout: %w", err)
	}
	if _, err := img.ConfigFile(); err != nil {
		return nil, fmt.Errorf("%w: OCI layout: %v", ErrInvalid, err)
	}
	return img, nil
}

func pickFromIndex(idx v1.ImageIndex, depth int) (v1.Image, error) {
	if depth > 4 {
		return nil, fmt.Errorf("%w: indexes nested too deeply", ErrInvalid)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	var candidates []v1.Descriptor
	for _, d := range im.Manifests {
		if !d.MediaType.IsImage() && !d.MediaType.IsIndex() {
			continue
		}
		if d.Platform != nil && (d.Platform.OS != "linux" || d.Platform.Architecture != runtime.GOARCH) {
			continue
		}
		candidates = append(candidates, d)
	}
	switch {
	case len(candidates) == 0:
		return nil, fmt.Errorf("%w: no linux/%s image in it", ErrNotFound, runtime.GOARCH)
	case len(candidates) > 1:
		return nil, fmt.Errorf("%w: it holds %d images; keep one", ErrInvalid, len(candidates))
	}
	d := candidates[0]
	if d.MediaType.IsIndex() {
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		return pickFromIndex(child, depth+1)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return img, nil
}
