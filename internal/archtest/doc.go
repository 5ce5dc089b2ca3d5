// Package archtest holds tests of the code base's own rules: every package
// is documented, and the pure decision packages stay free of I/O.
package archtest
