package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a", "b", "file")
	for _, data := range []string{"first", "second, longer"} {
		if err := Write(path, []byte(data), ""); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != data {
			t.Fatalf("read %q, %v; want %q", got, err, data)
		}
	}
	left, _ := os.ReadDir(filepath.Dir(path))
	if len(left) != 1 {
		t.Errorf("temporary files left: %v", left)
	}
	if err := Write(filepath.Join(dir, "x"), []byte("y"), filepath.Join(dir, "missing")); err == nil {
		t.Error("write through a missing temporary dir succeeded")
	}
}
