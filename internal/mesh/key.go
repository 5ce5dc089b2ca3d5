package mesh

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/curve25519"
)

// KeyFile is the name of the file in a host's data dir that keeps its
// private key, base64, owner-only.
const KeyFile = "mesh.key"

// PrivateKey is a host's WireGuard private key.
type PrivateKey [32]byte

// NewPrivateKey draws a key from crypto/rand, clamped as Curve25519 wants.
func NewPrivateKey() (PrivateKey, error) {
	var k PrivateKey
	if _, err := rand.Read(k[:]); err != nil {
		return k, fmt.Errorf("mesh key: %w", err)
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// Public is the key's public half.
func (k PrivateKey) Public() PublicKey {
	var p PublicKey
	b, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err == nil {
		copy(p[:], b)
	}
	return p
}

// LoadKey returns the private key kept in dir, generating and keeping one
// (0600 in a 0700 dir) on first use. A key file readable by others is
// refused, not used: the key may have leaked.
func LoadKey(dir string) (PrivateKey, error) {
	path := filepath.Join(dir, KeyFile)
	b, err := os.ReadFile(path)
	if err == nil {
		fi, err := os.Stat(path)
		if err != nil {
			return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return PrivateKey{}, fmt.Errorf("mesh key %s: mode %v, want 0600", path, fi.Mode().Perm())
		}
		return parsePrivate(path, string(b))
	}
	if !errors.Is(err, os.ErrNotExist) {
		return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
	}
	k, err := NewPrivateKey()
	if err != nil {
		return k, err
	}
	// Written whole under another name and linked into place, so two
	// starts on one dir agree on one key and a crash leaves none or one.
	tmp, err := os.CreateTemp(dir, KeyFile+".*")
	if err != nil {
		return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.WriteString(base64.StdEncoding.EncodeToString(k[:]) + "\n")
	if err := errors.Join(werr, tmp.Chmod(0o600), tmp.Sync(), tmp.Close()); err != nil {
		return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
	}
	if err := os.Link(tmp.Name(), path); errors.Is(err, os.ErrExist) {
		return LoadKey(dir)
	} else if err != nil {
		return PrivateKey{}, fmt.Errorf("mesh key: %w", err)
	}
	return k, nil
}

func parsePrivate(path, s string) (PrivateKey, error) {
	var k PrivateKey
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("mesh key %s: not a key", path)
	}
	copy(k[:], b)
	return k, nil
}
