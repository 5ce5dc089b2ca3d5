package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Remote says how to talk to a registry when pushing, listing or reading a
// base image.
type Remote struct {
	// Token is sent as "Authorization: Bearer <token>" when set.
	Token string
	// Insecure speaks plain HTTP (loopback registries always get it).
	Insecure bool
	// Progress, when set, receives a line per step of a push.
	Progress io.Writer
}

func (r Remote) nameOpts() []name.Option {
	if r.Insecure {
		return []name.Option{name.Insecure}
	}
	return nil
}

func (r Remote) options(ctx context.Context, _ name.Registry) []remote.Option {
	opts := []remote.Option{remote.WithContext(ctx), remote.WithJobs(2)}
	if r.Token != "" {
		opts = append(opts, remote.WithAuth(authn.FromConfig(authn.AuthConfig{RegistryToken: r.Token})))
	}
	return opts
}

func (r Remote) progressf(format string, args ...any) {
	if r.Progress != nil {
		fmt.Fprintf(r.Progress, format+"\n", args...)
	}
}

// classify puts an error from go-containerregistry under this package's
// sentinels.
func classify(err error, registry string) error {
	var te *transport.Error
	if errors.As(err, &te) {
		switch {
		case te.StatusCode == http.StatusNotFound:
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden:
			return fmt.Errorf("%w: %v", ErrUnauthorized, err)
		case te.StatusCode >= 500:
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("%w: %v", ErrNotFound, err)
			case transport.DigestInvalidErrorCode:
				return fmt.Errorf("%w: %v", ErrDigest, err)
			}
		}
		return err
	}
	var ne net.Error
	var oe *net.OpError
	var ue *url.Error
	if errors.As(err, &oe) || errors.As(err, &ne) || (errors.As(err, &ue) && !errors.Is(err, context.Canceled)) {
		return fmt.Errorf("%w: cannot reach %s: %v", ErrUnavailable, registry, err)
	}
	return err
}

// Push uploads img as ref (registry/repository:tag), layer by layer, and
// returns the digest of its manifest. Layers the registry has are not sent
// again.
func Push(ctx context.Context, img v1.Image, ref string, r Remote) (string, error) {
	tag, err := name.NewTag(ref, r.nameOpts()...)
	if err != nil {
		return "", fmt.Errorf("push: %w: %q is not registry/repository[:tag]: %v", ErrInvalid, ref, err)
	}
	reg := tag.Context().RegistryStr()
	opts := r.options(ctx, tag.Context().Registry)
	layers, err := img.Layers()
	if err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	var sent int64
	start := time.Now()
	for i, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return "", fmt.Errorf("push %s: layer %d: %w", ref, i+1, err)
		}
		size, err := l.Size()
		if err != nil {
			return "", fmt.Errorf("push %s: layer %s: %w", ref, d, err)
		}
		label := fmt.Sprintf("layer %d/%d %s", i+1, len(layers), shortDigest(d.String()))
		var upload v1.Layer = l
		var n atomic.Int64
		if _, mountable := l.(*remote.MountableLayer); !mountable {
			upload = &progressLayer{Layer: l, n: &n, size: size, label: label, r: r}
		}
		if err := remote.WriteLayer(tag.Context(), upload, opts...); err != nil {
			return "", fmt.Errorf("push %s: %s: %w", ref, label, classify(err, reg))
		}
		if got := n.Load(); got > 0 {
			sent += got
			r.progressf("%s: pushed %s", label, humanBytes(got))
		} else {
			r.progressf("%s: already in the registry (%s)", label, humanBytes(size))
		}
	}
	if err := remote.Write(tag, img, opts...); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, classify(err, reg))
	}
	digest, err := img.Digest()
	if err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	r.progressf("pushed %s@%s: %d layers, %s sent in %s", tag.Name(), digest, len(layers), humanBytes(sent), time.Since(start).Round(time.Millisecond))
	return digest.String(), nil
}

// progressLayer counts the compressed bytes read from a layer while it is
// uploaded and reports each tenth of the way.
type progressLayer struct {
	v1.Layer
	n     *atomic.Int64
	size  int64
	label string
	r     Remote
}

func (p *progressLayer) Compressed() (io.ReadCloser, error) {
	rc, err := p.Layer.Compressed()
	if err != nil {
		return nil, err
	}
	p.n.Store(0)
	return &progressReader{ReadCloser: rc, l: p}, nil
}

type progressReader struct {
	io.ReadCloser
	l    *progressLayer
	next int64
}

func (pr *progressReader) Read(b []byte) (int, error) {
	n, err := pr.ReadCloser.Read(b)
	total := pr.l.n.Add(int64(n))
	if pr.l.size > 4<<20 && total >= pr.next && total < pr.l.size {
		if pr.next > 0 {
			pr.l.r.progressf("%s: %s / %s", pr.l.label, humanBytes(total), humanBytes(pr.l.size))
		}
		pr.next = total + pr.l.size/10
	}
	return n, err
}

// Listing is one tag in a registry.
type Listing struct {
	Repository string `json:"repository"`
	Tag        string `json:"tag"`
	Digest     string `json:"digest"`
	MediaType  string `json:"media_type"`
	// Size is the compressed size of config and layers (for an index,
	// of the manifests it lists).
	Size   int64 `json:"size"`
	Layers int   `json:"layers"`
}

// List returns every tag of every repository in the registry at host
// (host[:port]), sorted by repository and tag.
func List(ctx context.Context, host string, r Remote) ([]Listing, error) {
	reg, err := name.NewRegistry(host, r.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("list: %w: registry %q: %v", ErrInvalid, host, err)
	}
	opts := r.options(ctx, reg)
	repos, err := remote.Catalog(ctx, reg, opts...)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", host, classify(err, host))
	}
	sort.Strings(repos)
	var out []Listing
	for _, repoName := range repos {
		repo := reg.Repo(strings.Split(repoName, "/")...)
		tags, err := remote.List(repo, opts...)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", repoName, classify(err, host))
		}
		sort.Strings(tags)
		for _, t := range tags {
			desc, err := remote.Get(repo.Tag(t), opts...)
			if err != nil {
				return nil, fmt.Errorf("list %s:%s: %w", repoName, t, classify(err, host))
			}
			l := Listing{Repository: repoName, Tag: t, Digest: desc.Digest.String(), MediaType: string(desc.MediaType)}
			if desc.MediaType.IsIndex() {
				if im, err := v1.ParseIndexManifest(strings.NewReader(string(desc.Manifest))); err == nil {
					for _, m := range im.Manifests {
						l.Size += m.Size
					}
				}
			} else if m, err := v1.ParseManifest(strings.NewReader(string(desc.Manifest))); err == nil {
				l.Size = m.Config.Size
				for _, layer := range m.Layers {
					l.Size += layer.Size
				}
				l.Layers = len(m.Layers)
			}
			out = append(out, l)
		}
	}
	return out, nil
}

func shortDigest(d string) string {
	if len(d) > len("sha256:")+12 {
		return d[:len("sha256:")+12]
	}
	return d
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
