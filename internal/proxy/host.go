package proxy

import (
	"fmt"
	"net"
	"strings"
)

// validDomain accepts a DNS name of labels of letters, digits and hyphens.
func validDomain(d string) error {
	if len(d) > 253 {
		return fmt.Errorf("proxy: domain %q is too long", d)
	}
	for l := range strings.SplitSeq(d, ".") {
		if !validLabel(l) {
			return fmt.Errorf("proxy: domain %q is not a DNS name", d)
		}
	}
	return nil
}

func validLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// appOf returns the app a Host header names under domain: "<app>.<domain>"
// with an optional port, any case, one label. It allocates only for a host
// with capitals.
func appOf(host, domain string) (string, bool) {
	if strings.IndexByte(host, ':') >= 0 { // else SplitHostPort fails, allocating its error
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	host = strings.TrimSuffix(host, ".")
	for i := 0; i < len(host); i++ {
		if c := host[i]; c >= 'A' && c <= 'Z' {
			host = strings.ToLower(host)
			break
		}
	}
	app, ok := strings.CutSuffix(host, "."+domain)
	if !ok || !validLabel(app) {
		return "", false
	}
	return app, true
}
