package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
)

// BuildSpec describes an image made from a directory: its contents become
// one layer (at the image's root) on top of Base, or alone when Base is "".
type BuildSpec struct {
	Dir  string
	Base string // image reference; "" builds from scratch
	// Remote is how to reach Base's registry.
	Remote Remote
	// Entrypoint, Cmd, WorkingDir and User replace the base image's when
	// set; Env entries are added to its environment (a key set again wins).
	Entrypoint []string
	Cmd        []string
	Env        []string // KEY=VALUE
	WorkingDir string
	User       string
	// TempDir holds the packed layer until the LocalImage is closed; "" is the
	// system's temporary directory.
	TempDir string
}

// buildEpoch is the time stamped on every packed file, so the same
// directory always packs to the same layer digest.
var buildEpoch = time.Unix(0, 0).UTC()

// Build packs spec.Dir as one layer and stacks it on the base image, the
// way ko packs a Go binary: owners are root, times are the epoch, entries
// are in lexical order, so the layer's digest depends on the contents only.
func Build(ctx context.Context, spec BuildSpec) (*LocalImage, error) {
	if spec.Dir == "" {
		return nil, fmt.Errorf("build: %w: no directory given", ErrInvalid)
	}
	fi, err := os.Stat(spec.Dir)
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("build: %s is not a directory", spec.Dir)
	}
	for _, kv := range spec.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return nil, fmt.Errorf("build: %w: env %q is not KEY=VALUE", ErrInvalid, kv)
		}
	}

	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	layerType := types.OCILayer
	if spec.Base != "" {
		ref, err := parseRef(spec.Base)
		if err != nil {
			return nil, fmt.Errorf("build: base: %w", err)
		}
		base, err = remote.Image(ref, spec.Remote.options(ctx, ref.Context().Registry)...)
		if err != nil {
			return nil, fmt.Errorf("build: base %s: %w", spec.Base, classify(err, ref.Context().RegistryStr()))
		}
		if mt, err := base.MediaType(); err == nil && mt == types.DockerManifestSchema2 {
			layerType = types.DockerLayer
		}
	}

	f, err := os.CreateTemp(spec.TempDir, "flame-layer-*.tar.gz")
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	built := &LocalImage{cleanup: []string{f.Name()}}
	err = packDir(spec.Dir, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		built.Close()
		return nil, fmt.Errorf("build: pack %s: %w", spec.Dir, err)
	}
	layer, err := tarball.LayerFromFile(f.Name(), tarball.WithMediaType(layerType))
	if err != nil {
		built.Close()
		return nil, fmt.Errorf("build: %w", err)
	}
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:     layer,
		MediaType: layerType,
		History:   v1.History{CreatedBy: "flame image build", Created: v1.Time{Time: buildEpoch}},
	})
	if err != nil {
		built.Close()
		return nil, fmt.Errorf("build: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		built.Close()
		return nil, fmt.Errorf("build: %w", err)
	}
	cf = cf.DeepCopy()
	if cf.OS == "" {
		cf.OS = "linux"
	}
	if cf.Architecture == "" {
		cf.Architecture = runtime.GOARCH
	}
	cf.Created = v1.Time{Time: buildEpoch}
	applySpec(&cf.Config, spec)
	if built.Image, err = mutate.ConfigFile(img, cf); err != nil {
		built.Close()
		return nil, fmt.Errorf("build: %w", err)
	}
	return built, nil
}

func applySpec(c *v1.Config, spec BuildSpec) {
	if len(spec.Entrypoint) > 0 {
		c.Entrypoint = spec.Entrypoint
		// As in a Dockerfile: a new entrypoint drops the base's cmd.
		c.Cmd = nil
	}
	if len(spec.Cmd) > 0 {
		c.Cmd = spec.Cmd
	}
	if spec.WorkingDir != "" {
		c.WorkingDir = spec.WorkingDir
	}
	if spec.User != "" {
		c.User = spec.User
	}
	for _, kv := range spec.Env {
		k, _, _ := strings.Cut(kv, "=")
		c.Env = append(filterEnv(c.Env, k), kv)
	}
}

func filterEnv(env []string, key string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k != key {
			out = append(out, kv)
		}
	}
	return out
}

// packDir writes dir as a gzipped tar to w: directories, regular files
// and symlinks, owned by root, stamped with buildEpoch.
func packDir(dir string, w io.Writer) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		hdr := &tar.Header{
			Name:    filepath.ToSlash(rel),
			Mode:    int64(fi.Mode().Perm()),
			ModTime: buildEpoch,
			Format:  tar.FormatPAX,
		}
		if fi.Mode()&fs.ModeSetuid != 0 {
			hdr.Mode |= 0o4000
		}
		if fi.Mode()&fs.ModeSetgid != 0 {
			hdr.Mode |= 0o2000
		}
		switch {
		case fi.IsDir():
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
		case fi.Mode().IsRegular():
			hdr.Typeflag = tar.TypeReg
			hdr.Size = fi.Size()
		case fi.Mode()&fs.ModeSymlink != 0:
			hdr.Typeflag = tar.TypeSymlink
			if hdr.Linkname, err = os.Readlink(p); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: %s files cannot be packed", rel, fi.Mode().Type())
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		in, err := os.Open(p)
		if err != nil {
			return err
		}
		defer in.Close()
		n, err := io.Copy(tw, in)
		if err == nil && n != hdr.Size {
			err = errors.New("file changed while being packed")
		}
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}
