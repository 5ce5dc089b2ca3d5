package image

import "errors"

// Sentinels for what can go wrong getting an image; errors from this
// package wrap them with the exact reason. Callers test with errors.Is.
var (
	// ErrNotFound: the registry has no such repository, tag or digest.
	ErrNotFound = errors.New("image not found")
	// ErrUnavailable: the registry could not be reached or failed.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrDigest: content did not match the digest that names it.
	ErrDigest = errors.New("digest mismatch")
	// ErrUnauthorized: the registry refused the credentials (or their absence).
	ErrUnauthorized = errors.New("registry refused access")
	// ErrInvalid: the reference, manifest or layer is malformed or unsupported.
	ErrInvalid = errors.New("invalid image")
	// ErrTooLarge: a layer unpacks to more than the store's Limits allow.
	// It comes with ErrInvalid: the image will not fit however often it
	// is pulled.
	ErrTooLarge = errors.New("image too large")
)
