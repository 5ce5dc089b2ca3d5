package exec

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/flamehq/flame/internal/driver"
)

// schemePrefix marks an image that names a local executable directly.
const schemePrefix = "exec:"

// argv resolves spec to the argv to execute, argv[0] being the path of an
// executable file. Failures wrap driver.ErrImage.
func (d *Driver) argv(spec driver.Spec) ([]string, error) {
	base, err := d.imageArgv(spec.Image)
	if err != nil {
		return nil, fmt.Errorf("image %q: %w: %w", spec.Image, err, driver.ErrImage)
	}
	var argv []string
	if len(spec.Entrypoint) > 0 {
		argv = append(argv, spec.Entrypoint...)
	} else {
		argv = append(argv, base...)
	}
	argv = append(argv, spec.Cmd...)
	path, err := lookPath(argv[0], spec)
	if err != nil {
		return nil, fmt.Errorf("image %q: %w: %w", spec.Image, err, driver.ErrImage)
	}
	argv[0] = path
	return argv, nil
}

// imageArgv is the argv image stands for.
func (d *Driver) imageArgv(image string) ([]string, error) {
	if path, ok := strings.CutPrefix(image, schemePrefix); ok {
		if !filepath.IsAbs(path) {
			return nil, errors.New("exec: needs an absolute path")
		}
		return []string{path}, nil
	}
	if image == "" {
		return nil, errors.New("no image")
	}
	argv, ok := d.cfg.Images[image]
	if !ok {
		argv, ok = d.cfg.Images[stripTag(image)]
	}
	if !ok {
		return nil, errors.New("not in the exec driver's image table (use exec:/path/to/program for a local executable)")
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, errors.New("configured with an empty argv")
	}
	return argv, nil
}

// stripTag removes the tag and digest from an image reference, leaving a
// registry's port alone: "host:5000/app:v1@sha256:..." → "host:5000/app".
func stripTag(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		ref = ref[:i]
	}
	return ref
}

// lookPath finds the executable file name stands for: a path with a slash is
// taken as is (relative to spec.Dir), a bare name is searched in the PATH of
// spec's environment, or the host's PATH when spec sets none.
func lookPath(name string, spec driver.Spec) (string, error) {
	if name == "" {
		return "", errors.New("empty program name")
	}
	if strings.Contains(name, "/") {
		path := name
		if !filepath.IsAbs(path) && spec.Dir != "" {
			path = filepath.Join(spec.Dir, path)
		}
		if err := checkExecutable(path); err != nil {
			return "", err
		}
		return path, nil
	}
	pathEnv, ok := spec.Env["PATH"]
	if !ok {
		pathEnv = os.Getenv("PATH")
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" || !filepath.IsAbs(dir) {
			continue
		}
		path := filepath.Join(dir, name)
		if checkExecutable(path) == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("%s: not found in PATH", name)
}

// checkExecutable reports why path is not an executable regular file.
func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: no such file", path)
		}
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", path)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s: not executable", path)
	}
	return nil
}
