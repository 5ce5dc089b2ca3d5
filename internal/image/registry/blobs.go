package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// diskBlobs keeps blobs as files named by digest: blobs/sha256/<hex>.
// Content is written to blobs/tmp (or streamed to uploads/) and renamed into
// place only once it was checked against its digest; a blob on disk has
// therefore always been verified.
//
// Blobs are shared between repositories, but a repository serves only the
// blobs linked to it (repos/<repo>/_layers/sha256/<hex>): those uploaded to
// it and those its manifests reference. Knowing a digest is not having its
// content: another org's layer is not served through one's own repository.
type diskBlobs struct {
	dir   string
	repos string
}

var (
	_ ggcr.BlobHandler     = (*diskBlobs)(nil)
	_ ggcr.BlobStatHandler = (*diskBlobs)(nil)
	_ ggcr.BlobPutHandler  = (*diskBlobs)(nil)
)

func (b *diskBlobs) path(h v1.Hash) string {
	return filepath.Join(b.dir, h.Algorithm, h.Hex)
}

func (b *diskBlobs) size(h v1.Hash) (int64, error) {
	fi, err := os.Stat(b.path(h))
	if errors.Is(err, os.ErrNotExist) {
		return 0, ggcr.ErrNotFound
	}
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (b *diskBlobs) linkPath(repo string, h v1.Hash) string {
	return filepath.Join(b.repos, filepath.FromSlash(repo), "_layers", h.Algorithm, h.Hex)
}

// linked reports whether repo may serve blob h.
func (b *diskBlobs) linked(repo string, h v1.Hash) bool {
	_, err := os.Stat(b.linkPath(repo, h))
	return err == nil
}

// link lets repo serve blob h.
func (b *diskBlobs) link(repo string, h v1.Hash) error {
	p := b.linkPath(repo, h)
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// stat is the size of blob h as repo serves it.
func (b *diskBlobs) stat(repo string, h v1.Hash) (int64, error) {
	if !b.linked(repo, h) {
		return 0, ggcr.ErrNotFound
	}
	return b.size(h)
}

func (b *diskBlobs) Stat(_ context.Context, repo string, h v1.Hash) (int64, error) {
	return b.stat(repo, h)
}

func (b *diskBlobs) Get(_ context.Context, repo string, h v1.Hash) (io.ReadCloser, error) {
	if !b.linked(repo, h) {
		return nil, ggcr.ErrNotFound
	}
	f, err := os.Open(b.path(h))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ggcr.ErrNotFound
	}
	return f, err
}

func (b *diskBlobs) Put(_ context.Context, repo string, h v1.Hash, rc io.ReadCloser) error {
	defer rc.Close()
	if err := b.write(h, rc); err != nil {
		return err
	}
	return b.link(repo, h)
}

// write stores the content of r as blob h. r is trusted to fail on a
// digest mismatch (the protocol handler's verifying reader does); callers
// with their own bytes have computed h from them.
func (b *diskBlobs) write(h v1.Hash, r io.Reader) error {
	if h.Algorithm != "sha256" {
		return fmt.Errorf("unsupported digest algorithm %q", h.Algorithm)
	}
	f, err := os.CreateTemp(filepath.Join(b.dir, "tmp"), "upload-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return b.place(f.Name(), h)
}

// place moves the verified file at tmp into place as blob h.
func (b *diskBlobs) place(tmp string, h v1.Hash) error {
	if err := os.MkdirAll(filepath.Dir(b.path(h)), 0o755); err != nil {
		return err
	}
	return os.Rename(tmp, b.path(h))
}
