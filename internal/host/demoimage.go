package host

import (
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/flamehq/flame/internal/image"
)

// PushDemoImage packs this binary, with the shared libraries it loads, as an
// image whose entrypoint runs the built-in demo app, and pushes it to the
// registry at registryAddr as DemoImage. It returns the pushed reference
// (with its digest).
func PushDemoImage(ctx context.Context, registryAddr, token string, progress io.Writer) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("demo image: %w", err)
	}
	dir, err := os.MkdirTemp("", "flame-demo-image-")
	if err != nil {
		return "", fmt.Errorf("demo image: %w", err)
	}
	defer os.RemoveAll(dir)
	files, err := elfClosure(self)
	if err != nil {
		return "", fmt.Errorf("demo image: %w", err)
	}
	for src, dst := range files {
		if err := copyFile(src, filepath.Join(dir, dst)); err != nil {
			return "", fmt.Errorf("demo image: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return "", err
	}
	remote := image.Remote{Token: token, Progress: progress}
	img, err := image.Build(ctx, image.BuildSpec{
		Dir:        dir,
		Entrypoint: []string{"/flame", "demo-app"},
		Env:        []string{"PORT=8080"},
		WorkingDir: "/",
		Remote:     remote,
	})
	if err != nil {
		return "", fmt.Errorf("demo image: %w", err)
	}
	defer img.Close()
	ref := registryAddr + "/" + DemoImage + ":latest"
	digest, err := image.Push(ctx, img, ref, remote)
	if err != nil {
		return "", fmt.Errorf("demo image: %w", err)
	}
	return registryAddr + "/" + DemoImage + "@" + digest, nil
}

// elfClosure maps the binary at path (as /flame) and every shared library
// it needs, and their dependencies, to their paths inside the image.
func elfClosure(path string) (map[string]string, error) {
	files := map[string]string{path: "flame"}
	var visit func(p string) error
	visit = func(p string) error {
		f, err := elf.Open(p)
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		defer f.Close()
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b := make([]byte, prog.Filesz)
				if _, err := prog.ReadAt(b, 0); err != nil {
					return fmt.Errorf("read interpreter of %s: %w", p, err)
				}
				interp := string(b[:len(b)-1]) // NUL-terminated
				if _, seen := files[interp]; !seen {
					files[interp] = interp[1:]
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return nil // static
		}
		for _, lib := range libs {
			full, err := findLibrary(lib)
			if err != nil {
				return err
			}
			if _, seen := files[full]; seen {
				continue
			}
			files[full] = full[1:]
			if err := visit(full); err != nil {
				return err
			}
		}
		return nil
	}
	return files, visit(path)
}

var libraryDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
	"/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"}

func findLibrary(name string) (string, error) {
	for _, d := range libraryDirs {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("shared library %s not found in %v", name, libraryDirs)
}

func copyFile(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
