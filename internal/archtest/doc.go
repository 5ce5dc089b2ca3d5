// Package archtest holds tests of the code base's own rules: every package
// is documented, and the pure decision packages stay free of I/O, of the
// clock and of goroutines (their source is parsed and walked for calls like
// time.Now and for go statements).
package archtest
