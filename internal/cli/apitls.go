package cli

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spf13/pflag"
)

// apiTLSFlags are flame server's flags for serving its API over TLS.
type apiTLSFlags struct {
	cert, key string
	plainHTTP bool
}

func addAPITLSFlags(fs *pflag.FlagSet, f *apiTLSFlags) {
	fs.StringVar(&f.cert, "tls-cert", "", "PEM certificate (chain) the Machines API is served with over TLS")
	fs.StringVar(&f.key, "tls-key", "", "PEM private key of --tls-cert")
	fs.BoolVar(&f.plainHTTP, "plain-http", false, "serve the Machines API over plain HTTP (development only: tokens cross the network in clear)")
}

// config loads the API's TLS configuration: nil with --plain-http; a usage
// error without a certificate and key, or with both and --plain-http.
func (f apiTLSFlags) config() (*tls.Config, error) {
	switch {
	case f.plainHTTP && (f.cert != "" || f.key != ""):
		return nil, usageError{errors.New("--plain-http and --tls-cert/--tls-key exclude each other")}
	case f.plainHTTP:
		return nil, nil
	case f.cert == "" || f.key == "":
		return nil, usageError{errors.New("the Machines API is served over TLS: give --tls-cert and --tls-key (or --plain-http in development)")}
	}
	pair, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}}, nil
}
