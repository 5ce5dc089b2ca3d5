// Package atomicfile writes files whole or not at all: the data goes to a
// temporary file, is synced, and is renamed into place, so a reader or a
// crash never sees half a file.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write writes data to path. The temporary file is made in tmpDir, which must
// be on the same file system as path ("" means path's directory, created if
// missing).
func Write(path string, data []byte, tmpDir string) error {
	if tmpDir == "" {
		tmpDir = filepath.Dir(path)
		if err := os.MkdirAll(tmpDir, 0o755); err != nil {
			return err
		}
	}
	f, err := os.CreateTemp(tmpDir, ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
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
	return os.Rename(f.Name(), path)
}
