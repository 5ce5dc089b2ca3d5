// Package edgecert provides the certificates the edge terminates TLS with:
// ACME certificates (through certmagic, HTTP-01 and TLS-ALPN-01) for the
// hostnames apps claimed, kept in the catalog so every edge shares them
// and one edge issues each; and, for `flame dev`, a local CA made in the
// data directory that signs <app>.localhost certificates without ACME.
package edgecert
