package check

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// bodyExcerpt is how much of an HTTP response body goes into the output.
const bodyExcerpt = 128

// dialFunc dials like net.Dialer.DialContext.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// prober runs one spec's probes.
type prober struct {
	spec   Spec
	addr   string
	dial   dialFunc
	client *http.Client // http checks only
}

func newProber(spec Spec, host string, dial dialFunc) *prober {
	p := &prober{spec: spec, addr: net.JoinHostPort(host, strconv.Itoa(spec.Port)), dial: dial}
	if spec.Type == TypeHTTP {
		p.client = &http.Client{
			Transport: &http.Transport{
				Proxy:       nil,
				DialContext: dial,
				TLSClientConfig: &tls.Config{
					InsecureSkipVerify: spec.TLSSkipVerify,
					ServerName:         spec.TLSServerName,
				},
				// Each probe opens its own connection, as a new client
				// would, and leaves nothing idle behind.
				DisableKeepAlives:  true,
				DisableCompression: true,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	return p
}

// probe runs the check once within its timeout.
func (p *prober) probe(ctx context.Context) (ok bool, output string) {
	ctx, cancel := context.WithTimeout(ctx, p.spec.Timeout)
	defer cancel()
	if p.spec.Type == TypeHTTP {
		ok, output = p.probeHTTP(ctx)
	} else {
		ok, output = p.probeTCP(ctx)
	}
	if !ok && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		output = fmt.Sprintf("timed out after %s", p.spec.Timeout)
	}
	return ok, output
}

func (p *prober) probeTCP(ctx context.Context) (bool, string) {
	c, err := p.dial(ctx, "tcp", p.addr)
	if err != nil {
		return false, err.Error()
	}
	c.Close()
	return true, "connected"
}

func (p *prober) probeHTTP(ctx context.Context) (bool, string) {
	u := p.spec.Protocol + "://" + p.addr + p.spec.Path
	req, err := http.NewRequestWithContext(ctx, p.spec.Method, u, nil)
	if err != nil {
		return false, err.Error()
	}
	for k, vs := range p.spec.Headers {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	if h := req.Header.Get("Host"); h != "" {
		req.Host = h
	}
	resp, err := p.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is always ours; say what went wrong
		}
		return false, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, bodyExcerpt))
	ok := resp.StatusCode >= 200 && resp.StatusCode < 400
	out := resp.Status
	if b := excerpt(body); b != "" {
		out += ": " + b
	}
	return ok, out
}

// excerpt makes the start of a body fit one line of output.
func excerpt(b []byte) string {
	s := strings.ToValidUTF8(string(b), "?")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	return strings.Join(strings.Fields(s), " ")
}

// closeIdle drops the prober's idle connections (there are none with
// keep-alives off, but the transport may hold TLS state).
func (p *prober) closeIdle() {
	if p.client != nil {
		p.client.CloseIdleConnections()
	}
}

// nextRun is the first scheduled time after now on the grid first + k*every.
func nextRun(first time.Time, every time.Duration, now time.Time) time.Time {
	if now.Before(first) {
		return first
	}
	k := now.Sub(first)/every + 1
	return first.Add(k * every)
}
