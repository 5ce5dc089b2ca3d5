package api

import (
	"regexp"
	"strings"
)

// ExecImagePrefix marks an image that names a program on the host
// ("exec:/abs/path"), which only the exec driver runs.
const ExecImagePrefix = "exec:"

// The grammar of an OCI image reference (the distribution project's):
// [domain[:port]/]path[:tag][@digest], where path components are lowercase.
var (
	imageDomainRE = regexp.MustCompile(`^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$`)
	imagePathRE   = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$`)
	imageTagRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
	imageDigestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`) // the only digest Flame's registry and store speak
)

// CheckImageRef reports why ref is not an image reference Flame can use:
// an OCI reference ("nginx", "registry.example:5000/team/app:v1@sha256:…")
// or an exec image ("exec:/abs/path"). It checks only the shape; whether
// the image exists is for the host that resolves it.
func CheckImageRef(ref string) error {
	const field = "config.image"
	switch {
	case strings.TrimSpace(ref) == "":
		return invalid(field, "is required")
	case len(ref) > MaxImageRefLen:
		return invalid(field, "is %d bytes; at most %d are allowed", len(ref), MaxImageRefLen)
	}
	if path, ok := strings.CutPrefix(ref, ExecImagePrefix); ok {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, "\x00\n") {
			return invalid(field, "%q: an exec image names an absolute path (exec:/path/to/program)", clipped(ref))
		}
		return nil
	}
	bad := func(why string) error {
		return invalid(field, "%q is not an image reference: %s", clipped(ref), why)
	}
	rest := ref
	if i := strings.IndexByte(rest, '@'); i >= 0 {
		if !imageDigestRE.MatchString(rest[i+1:]) {
			return bad("the digest after @ must be sha256:<64 lowercase hex>")
		}
		rest = rest[:i]
	}
	if i := strings.LastIndexByte(rest, ':'); i > strings.LastIndexByte(rest, '/') {
		if !imageTagRE.MatchString(rest[i+1:]) {
			return bad("the tag must be 1 to 128 letters, digits, '_', '.' and '-'")
		}
		rest = rest[:i]
	}
	if len(rest) > 255 {
		return bad("the name before the tag may be at most 255 characters")
	}
	parts := strings.Split(rest, "/")
	if len(parts) > 1 && (strings.ContainsAny(parts[0], ".:") || parts[0] == "localhost") {
		if !imageDomainRE.MatchString(parts[0]) {
			return bad("invalid registry host " + clipped(parts[0]))
		}
		parts = parts[1:]
	}
	for _, p := range parts {
		if !imagePathRE.MatchString(p) {
			return bad("repository names are lowercase letters, digits and separators (., _, __, -)")
		}
	}
	return nil
}
