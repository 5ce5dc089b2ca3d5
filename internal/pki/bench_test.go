package pki

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"
)

// BenchmarkCallPlainAndMutualTLS alternates one small POST over plain HTTP
// and one over the control plane's mutual TLS to a host, each on a kept-alive
// connection (as the control plane reuses its connections to a host), and
// reports both p50s and the difference; handshake-p50-us is a call on a new
// connection each time (the full TLS 1.3 handshake with both certificates).
func BenchmarkCallPlainAndMutualTLS(b *testing.B) {
	r := newRig(b, "ams-1")
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		w.Write([]byte(`{"id":"m1","state":"started"}`))
	})
	serve := func(tc *tls.Config) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		srv := &http.Server{Handler: h}
		if tc != nil {
			go srv.Serve(tls.NewListener(ln, tc))
		} else {
			go srv.Serve(ln)
		}
		b.Cleanup(func() { srv.Close() })
		return ln.Addr().String()
	}
	plainAddr := serve(nil)
	tlsAddr := serve(r.slot.ServerTLS(time.Now))
	plain := &http.Client{Transport: &http.Transport{}}
	mtls := &http.Client{Transport: &http.Transport{TLSClientConfig: ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", r.serial, time.Now)}}
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", r.serial, time.Now)}}
	call := func(c *http.Client, url string) time.Duration {
		t0 := time.Now()
		resp, err := c.Post(url, "application/json", nil)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return time.Since(t0)
	}
	call(plain, "http://"+plainAddr+"/")
	call(mtls, "https://"+tlsAddr+"/")
	var ps, ms, hs []time.Duration
	for i := 0; b.Loop(); i++ {
		hs = append(hs, call(fresh, "https://"+tlsAddr+"/"))
		// Each first half the time, so neither pays for following the
		// handshake.
		if i%2 == 0 {
			ps = append(ps, call(plain, "http://"+plainAddr+"/"))
			ms = append(ms, call(mtls, "https://"+tlsAddr+"/"))
		} else {
			ms = append(ms, call(mtls, "https://"+tlsAddr+"/"))
			ps = append(ps, call(plain, "http://"+plainAddr+"/"))
		}
	}
	p50 := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2].Nanoseconds()) / 1000
	}
	b.ReportMetric(p50(ps), "plain-p50-us")
	b.ReportMetric(p50(ms), "mtls-p50-us")
	b.ReportMetric(p50(ms)-p50(ps), "added-p50-us")
	b.ReportMetric(p50(hs), "handshake-p50-us")
	b.ReportMetric(0, "ns/op")
}
