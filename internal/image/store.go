package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"github.com/flamehq/flame/internal/atomicfile"
)

// StoreConfig configures a Store.
type StoreConfig struct {
	// Dir holds the store: layers/<hex> (one unpacked layer each),
	// images/<hex>.json (one pulled image each), tmp/ (work in progress).
	Dir    string
	Logger *slog.Logger
	// Insecure speaks plain HTTP to every registry (loopback registries
	// always get plain HTTP).
	Insecure bool
	// Auth returns the bearer token for a registry (host[:port]), or "".
	Auth func(registry string) string
	// DialContext, when set, opens the connections to registries (a
	// simulated network's dialer, in a dev cluster).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Limits bound what each layer unpacks to (defaults:
	// DefaultMaxLayerBytes, DefaultMaxLayerEntries).
	Limits Limits
}

// Validate reports what is wrong with c.
func (c StoreConfig) Validate() error {
	if c.Dir == "" {
		return errors.New("image store: Dir is required")
	}
	return nil
}

// StoreStats are counters since the Store was made.
type StoreStats struct {
	BytesDownloaded  int64 // compressed layer bytes read from registries
	LayersDownloaded int64 // layers fetched and unpacked
	LayersReused     int64 // layers a pull found already unpacked
}

// Store is a host's content-addressed image cache: each layer is downloaded
// and unpacked once (by compressed digest) and shared, read-only, by every
// machine's root filesystem.
type Store struct {
	dir      string
	log      *slog.Logger
	insecure bool
	token    func(string) string
	http     clientFactory
	form     layerForm // how this host stores whiteouts
	overlay  bool      // overlayfs mounts work here
	chown    bool      // running as root: keep owners from the tar
	limits   Limits

	flights singleflight.Group
	// gc excludes GC from pulls: a pull holds it shared from its first
	// layer to writing its image record.
	gc sync.RWMutex

	bytes, downloaded, reused atomic.Int64
}

type clientFactory func(registry string) *client

// NewStore opens the store in cfg.Dir, removing work a crash left behind,
// and finds out whether this host can use overlayfs.
func NewStore(cfg StoreConfig) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	// 0700: layers keep their setuid files and owners; host users other
	// than the agent have no business reaching them.
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	os.RemoveAll(filepath.Join(cfg.Dir, "tmp"))
	for _, d := range []string{"layers", "images", "tmp", emptyLower} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("image store: %w", err)
		}
	}
	s := &Store{
		dir:      cfg.Dir,
		log:      logger.With("component", "image"),
		insecure: cfg.Insecure,
		token:    cfg.Auth,
		chown:    os.Geteuid() == 0,
		limits:   cfg.Limits.withDefaults(),
	}
	hc := newHTTPClient(cfg.DialContext)
	s.http = func(registry string) *client {
		c := &client{http: hc, scheme: "https", registry: registry}
		if s.insecure || isLoopback(registry) {
			c.scheme = "http"
		}
		if s.token != nil {
			c.token = s.token(registry)
		}
		return c
	}
	s.form, s.overlay = probe(filepath.Join(cfg.Dir, "tmp"))
	s.log.Debug("image store", "dir", cfg.Dir, "layer_form", s.form, "overlay", s.overlay)
	if !s.overlay {
		s.log.Info("overlayfs mounts unavailable: machines get copies of their image's layers (as root, 'modprobe overlay' may help)")
	}
	return s, nil
}

// Overlay reports whether Mount gives machines overlayfs mounts (true) or
// copies of the layers (false).
func (s *Store) Overlay() bool { return s.overlay }

// Stats returns the store's counters.
func (s *Store) Stats() StoreStats {
	return StoreStats{
		BytesDownloaded:  s.bytes.Load(),
		LayersDownloaded: s.downloaded.Load(),
		LayersReused:     s.reused.Load(),
	}
}

func (s *Store) layerDir(hexDigest string) string { return filepath.Join(s.dir, "layers", hexDigest) }
func (s *Store) imagePath(hexDigest string) string {
	return filepath.Join(s.dir, "images", hexDigest+".json")
}

// layerMeta is layers/<hex>/layer.json; the layer's files are in fs/.
type layerMeta struct {
	Digest string    `json:"digest"`
	DiffID string    `json:"diff_id"`
	Size   int64     `json:"size"`
	Form   layerForm `json:"form"`
}

// Pull makes the image ref present on this host: it resolves a tag to a
// digest, fetches the manifest (for an index, the one for linux and this
// host's architecture) and the config, and downloads and unpacks each layer
// not already here. Every blob is checked against its digest.
func (s *Store) Pull(ctx context.Context, ref string) (*Image, error) {
	return s.pullRef(ctx, ref, false)
}

// PullAnonymous is Pull without credentials, whatever Auth gives for the
// registry, and without the shortcut of an image already here: the
// registry alone says whether the image may be had.
func (s *Store) PullAnonymous(ctx context.Context, ref string) (*Image, error) {
	return s.pullRef(ctx, ref, true)
}

func (s *Store) pullRef(ctx context.Context, ref string, anonymous bool) (*Image, error) {
	r, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	img, err := s.pull(ctx, r, anonymous)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	return img, nil
}

func (s *Store) pull(ctx context.Context, r name.Reference, anonymous bool) (*Image, error) {
	s.gc.RLock()
	defer s.gc.RUnlock()
	repo := r.Context().RepositoryStr()
	c := s.http(r.Context().RegistryStr())
	if anonymous {
		c.token = ""
	}

	// By digest and already here, pulled from the same repository: no
	// registry needed. Not from another one: knowing an image's digest
	// is not being allowed to pull it.
	if d, ok := r.(name.Digest); ok && !anonymous {
		from := r.Context()
		if img, ok := s.localImage(d.DigestStr(), &from); ok {
			img.Ref = r.Name()
			return img, nil
		}
	}
	body, mt, digest, err := c.fetchManifest(ctx, repo, r.Identifier())
	if err != nil {
		return nil, err
	}
	if mt.IsIndex() {
		child, err := pickPlatform(body)
		if err != nil {
			return nil, err
		}
		if body, mt, digest, err = c.fetchManifest(ctx, repo, child); err != nil {
			return nil, err
		}
	}
	if !mt.IsImage() && mt != "" {
		return nil, fmt.Errorf("%w: manifest %s has media type %s, not an image", ErrInvalid, digest, mt)
	}
	if img, ok := s.localImage(digest, nil); ok {
		img.Ref = r.Name()
		return img, nil
	}
	m, err := v1.ParseManifest(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%w: manifest %s: %v", ErrInvalid, digest, err)
	}
	cfg, err := s.fetchConfig(ctx, c, repo, m.Config)
	if err != nil {
		return nil, err
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("%w: manifest %s has %d layers, its config %d diff_ids", ErrInvalid, digest, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}

	img := &Image{
		Ref:    r.Name(),
		Digest: digest,
		Config: Config{
			Entrypoint: cfg.Config.Entrypoint,
			Cmd:        cfg.Config.Cmd,
			Env:        cfg.Config.Env,
			WorkingDir: cfg.Config.WorkingDir,
			User:       cfg.Config.User,
		},
		Layers: make([]Layer, len(m.Layers)),
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(3)
	for i, desc := range m.Layers {
		if !desc.MediaType.IsDistributable() {
			return nil, fmt.Errorf("%w: layer %s is a foreign layer (%s), which is not supported", ErrInvalid, desc.Digest, desc.MediaType)
		}
		diffID := cfg.RootFS.DiffIDs[i].String()
		g.Go(func() error {
			l, err := s.layer(gctx, c, repo, desc, diffID)
			img.Layers[i] = l
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if err := writeJSONAtomic(s.imagePath(strings.TrimPrefix(digest, "sha256:")), img, filepath.Join(s.dir, "tmp")); err != nil {
		return nil, fmt.Errorf("record image: %w", err)
	}
	return img, nil
}

// localImage returns the image with manifest digest if its record and all
// its layers are here, and, with from set, it was pulled from that
// repository.
func (s *Store) localImage(digest string, from *name.Repository) (*Image, bool) {
	hexd, ok := strings.CutPrefix(digest, "sha256:")
	if !ok {
		return nil, false
	}
	b, err := os.ReadFile(s.imagePath(hexd))
	if err != nil {
		return nil, false
	}
	var img Image
	if json.Unmarshal(b, &img) != nil {
		return nil, false
	}
	if from != nil {
		was, err := name.ParseReference(img.Ref)
		if err != nil || was.Context().Name() != from.Name() {
			return nil, false
		}
	}
	for i, l := range img.Layers {
		dir := s.layerDir(strings.TrimPrefix(l.Digest, "sha256:"))
		if _, err := os.Stat(filepath.Join(dir, "fs")); err != nil {
			return nil, false
		}
		img.Layers[i].Dir = filepath.Join(dir, "fs")
	}
	s.reused.Add(int64(len(img.Layers)))
	return &img, true
}

func pickPlatform(index []byte) (string, error) {
	im, err := v1.ParseIndexManifest(bytes.NewReader(index))
	if err != nil {
		return "", fmt.Errorf("%w: index: %v", ErrInvalid, err)
	}
	var found []string
	for _, d := range im.Manifests {
		if d.Platform == nil {
			continue
		}
		found = append(found, d.Platform.OS+"/"+d.Platform.Architecture)
		if d.Platform.OS == "linux" && d.Platform.Architecture == runtime.GOARCH {
			return d.Digest.String(), nil
		}
	}
	return "", fmt.Errorf("%w: no linux/%s image in the index (it has %v)", ErrNotFound, runtime.GOARCH, found)
}

func (s *Store) fetchConfig(ctx context.Context, c *client, repo string, desc v1.Descriptor) (*v1.ConfigFile, error) {
	what := fmt.Sprintf("config %s", desc.Digest)
	if desc.Size > maxMetadata {
		return nil, fmt.Errorf("%w: %s: %d bytes is too large", ErrInvalid, what, desc.Size)
	}
	rc, err := c.blob(ctx, repo, desc.Digest.String(), what)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	v := newVerifier(rc, desc.Size)
	b, err := io.ReadAll(v)
	if err != nil && !v.over {
		return nil, fmt.Errorf("%w: %s: %v", ErrUnavailable, what, err)
	}
	if got := v.digest(); v.over || got != desc.Digest.String() || v.n != desc.Size {
		return nil, fmt.Errorf("%w: %s: downloaded content has digest %s (%d bytes), expected %d bytes", ErrDigest, what, got, v.n, desc.Size)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, what, err)
	}
	return cfg, nil
}

// layer makes the layer desc present: unpacked already, or downloaded by
// exactly one caller while concurrent callers for the same layer wait.
func (s *Store) layer(ctx context.Context, c *client, repo string, desc v1.Descriptor, diffID string) (Layer, error) {
	l := Layer{Digest: desc.Digest.String(), DiffID: diffID, Size: desc.Size}
	if desc.Digest.Algorithm != "sha256" {
		return l, fmt.Errorf("%w: layer %s: unsupported digest algorithm", ErrInvalid, desc.Digest)
	}
	dir := s.layerDir(desc.Digest.Hex)
	l.Dir = filepath.Join(dir, "fs")
	if _, err := os.Stat(l.Dir); err == nil {
		s.reused.Add(1)
		return l, nil
	}
	for {
		led := false
		_, err, _ := s.flights.Do(desc.Digest.Hex, func() (any, error) {
			led = true
			if _, err := os.Stat(l.Dir); err == nil {
				s.reused.Add(1) // finished by a flight that just ended
				return nil, nil
			}
			return nil, s.download(ctx, c, repo, desc, diffID, dir)
		})
		// A flight led by a caller that gave up is not this caller's
		// failure: try again (leading it this time) while ctx lives.
		if !led && err != nil && ctx.Err() == nil &&
			(errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
			continue
		}
		if !led && err == nil {
			s.reused.Add(1)
		}
		return l, err
	}
}

// download streams the layer blob through a digest check, decompression
// and a diff ID check into a temporary directory, which becomes dir only
// when every check passed. A failed layer leaves nothing behind.
func (s *Store) download(ctx context.Context, c *client, repo string, desc v1.Descriptor, diffID, dir string) (err error) {
	what := fmt.Sprintf("layer %s", desc.Digest)
	tmp, err := os.MkdirTemp(filepath.Join(s.dir, "tmp"), "layer-")
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Mkdir(filepath.Join(tmp, "fs"), 0o755); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	rc, err := c.blob(ctx, repo, desc.Digest.String(), what)
	if err != nil {
		return err
	}
	defer rc.Close()
	counted := &countingReader{r: rc, n: &s.bytes}
	blob := newVerifier(counted, desc.Size)

	st, unpackErr := s.unpackStream(blob, diffID, filepath.Join(tmp, "fs"))
	// Read what unpacking left (tar padding, or everything after a
	// failure) so the digest covers the whole blob: a corrupt blob is
	// reported as such even when it also broke the tar.
	_, drainErr := io.Copy(io.Discard, blob)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if blob.over || blob.n != desc.Size || blob.digest() != desc.Digest.String() {
		if drainErr != nil && !blob.over {
			return fmt.Errorf("%w: %s: download broke off after %d of %d bytes: %v", ErrUnavailable, what, blob.n, desc.Size, drainErr)
		}
		return fmt.Errorf("%w: %s: downloaded content has digest %s (%d bytes), expected %d bytes", ErrDigest, what, blob.digest(), blob.n, desc.Size)
	}
	if unpackErr != nil {
		if errors.Is(unpackErr, ErrDigest) {
			return fmt.Errorf("%s: %w", what, unpackErr)
		}
		if errors.Is(unpackErr, ErrTooLarge) {
			return fmt.Errorf("%w: %s: %w", ErrInvalid, what, unpackErr)
		}
		return fmt.Errorf("%w: %s: unpack: %v", ErrInvalid, what, unpackErr)
	}
	meta := layerMeta{Digest: desc.Digest.String(), DiffID: diffID, Size: desc.Size, Form: s.form}
	if err := writeJSONAtomic(filepath.Join(tmp, "layer.json"), meta, tmp); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, "fs")); serr == nil {
			os.RemoveAll(tmp) // another process of this host got there first
			return nil
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	s.downloaded.Add(1)
	s.log.Debug("layer unpacked", "digest", desc.Digest, "bytes", desc.Size, "skipped", st.skipped)
	return nil
}

// unpackStream decompresses r (gzip, zstd or plain tar, told by its first
// bytes), checks the result against diffID and unpacks it into dir.
func (s *Store) unpackStream(r io.Reader, diffID, dir string) (unpackStats, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	var tarStream io.Reader = br
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return unpackStats{}, err
		}
		defer zr.Close()
		tarStream = zr
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		zr, err := zstd.NewReader(br)
		if err != nil {
			return unpackStats{}, err
		}
		defer zr.Close()
		tarStream = zr
	}
	diff := newVerifier(tarStream, -1)
	st, err := unpack(diff, dir, s.form, s.chown, s.limits)
	if err != nil {
		return st, err
	}
	if _, err := io.Copy(io.Discard, diff); err != nil {
		return st, err
	}
	if got := diff.digest(); got != diffID {
		return st, fmt.Errorf("%w: uncompressed content has digest %s, the image config says %s", ErrDigest, got, diffID)
	}
	return st, nil
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// GC removes the images for which inUse is false, then every layer no
// remaining image references, and returns the bytes freed. Pulls wait
// while it runs.
func (s *Store) GC(ctx context.Context, inUse func(digest string) bool) (freed int64, err error) {
	s.gc.Lock()
	defer s.gc.Unlock()
	entries, err := os.ReadDir(filepath.Join(s.dir, "images"))
	if err != nil {
		return 0, fmt.Errorf("gc: %w", err)
	}
	keep := map[string]bool{}
	for _, e := range entries {
		hexd, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		p := filepath.Join(s.dir, "images", e.Name())
		if !inUse("sha256:" + hexd) {
			if fi, err := os.Stat(p); err == nil {
				freed += fi.Size()
			}
			if err := os.Remove(p); err != nil {
				return freed, fmt.Errorf("gc: %w", err)
			}
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return freed, fmt.Errorf("gc: %w", err)
		}
		var img Image
		if err := json.Unmarshal(b, &img); err != nil {
			return freed, fmt.Errorf("gc: image record %s: %w", e.Name(), err)
		}
		for _, l := range img.Layers {
			keep[strings.TrimPrefix(l.Digest, "sha256:")] = true
		}
	}
	layers, err := os.ReadDir(filepath.Join(s.dir, "layers"))
	if err != nil {
		return freed, fmt.Errorf("gc: %w", err)
	}
	for _, e := range layers {
		if ctx.Err() != nil {
			return freed, ctx.Err()
		}
		if keep[e.Name()] {
			continue
		}
		dir := s.layerDir(e.Name())
		size := diskUsage(dir)
		if err := os.RemoveAll(dir); err != nil {
			return freed, fmt.Errorf("gc: layer %s: %w", e.Name(), err)
		}
		freed += size
		s.log.Debug("layer removed", "digest", "sha256:"+e.Name(), "bytes", size)
	}
	return freed, nil
}

// diskUsage sums the sizes of the files under dir.
func diskUsage(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func writeJSONAtomic(path string, v any, tmpDir string) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, tmpDir)
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
