package cli

import (
	"fmt"
	"os"
	"strings"
)

// maxSecretFile bounds a token file.
const maxSecretFile = 4 << 10

// readSecret reads a secret from the file a flag names, else from an
// environment variable: secrets never go on a command line, where every
// user of the machine sees them. "" when neither is set.
func readSecret(flag, path, env string) (string, error) {
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("--%s: %w", flag, err)
		}
		if len(b) > maxSecretFile {
			return "", fmt.Errorf("--%s: %s is larger than %d bytes", flag, path, maxSecretFile)
		}
		s := strings.TrimSpace(string(b))
		if s == "" {
			return "", usageError{fmt.Errorf("--%s: %s is empty", flag, path)}
		}
		return s, nil
	}
	return strings.TrimSpace(os.Getenv(env)), nil
}
