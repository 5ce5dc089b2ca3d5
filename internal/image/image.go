// Package image is Flame's image handling: the embedded OCI registry, images
// built and imported without Docker, and each host's content-addressed layer
// store that pulls an image once and gives every machine a copy-on-write
// root filesystem of it.
package image

// Image is an image resolved and present on this host.
type Image struct {
	// Ref is the reference it was pulled by, normalized
	// (registry/repository:tag or registry/repository@digest).
	Ref string
	// Digest is the manifest's digest, "sha256:…".
	Digest string
	// Config is the part of the image config a machine's process needs.
	Config Config
	// Layers are bottom first.
	Layers []Layer
}

// Config is what the image says about how to run it.
type Config struct {
	Entrypoint []string
	Cmd        []string
	Env        []string // KEY=VALUE
	WorkingDir string
	User       string
}

// Layer is one unpacked layer in the host's store.
type Layer struct {
	Digest string // compressed blob digest, as in the manifest
	DiffID string // digest of the uncompressed tar
	Size   int64  // compressed size
	Dir    string // where it is unpacked on this host
}
