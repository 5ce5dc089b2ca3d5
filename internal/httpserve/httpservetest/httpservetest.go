// Package httpservetest plays the slow clients httpserve's bounds exist
// for — a slowloris, a body that stops, a keep-alive that idles — against
// a real server, and reports how long the server took to cut each.
package httpservetest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Allowance is what a test adds to a bound before calling a server late:
// the server cuts at its deadline, and a busy machine may run the cut and
// the client's noticing it that much later. A server that never cuts
// fails the test once it is over.
const Allowance = 10 * time.Second

// ErrNotCut is returned when the server kept the connection past the
// given limit plus Allowance.
var ErrNotCut = errors.New("the server did not cut the connection")

// Slowloris sends a request's headers a line every tick without ever ending
// them, and returns how long after connecting the server closed the
// connection.
func Slowloris(addr string, limit, tick time.Duration) (time.Duration, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	closed := watchClose(c, nil)
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: slow\r\n"); err != nil {
		return 0, err
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	end := time.After(limit + Allowance)
	for i := 0; ; i++ {
		select {
		case <-closed:
			return time.Since(start), nil
		case <-end:
			return time.Since(start), ErrNotCut
		case <-t.C:
			// A write may fail once the server has gone: closed says so.
			fmt.Fprintf(c, "X-Slow-%d: 1\r\n", i)
		}
	}
}

// SlowBody sends a POST to path announcing a body of 64 KiB, sends one
// byte of it and stops; it reads whatever response comes and returns how
// long after that byte the server closed the connection.
func SlowBody(addr, path string, limit time.Duration) (time.Duration, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{", path, 64<<10); err != nil {
		return 0, err
	}
	start := time.Now()
	return waitClosed(watchClose(c, nil), start, limit)
}

// Idle makes one GET request for path on a keep-alive connection, reads
// the whole response, and returns how long after it the server closed the
// idle connection.
func Idle(addr, path string, limit time.Duration) (time.Duration, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: idle\r\n\r\n", path); err != nil {
		return 0, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, fmt.Errorf("read the response: %w", err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, fmt.Errorf("read the response body: %w", err)
	}
	resp.Body.Close()
	if resp.Close {
		return 0, errors.New("the server closed after one request: not a keep-alive connection")
	}
	start := time.Now()
	return waitClosed(watchClose(c, br), start, limit)
}

// watchClose reads c (through br when set) until it fails, then closes the
// returned channel.
func watchClose(c net.Conn, br *bufio.Reader) <-chan struct{} {
	var r io.Reader = c
	if br != nil {
		r = br
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(io.Discard, r)
	}()
	return done
}

func waitClosed(closed <-chan struct{}, start time.Time, limit time.Duration) (time.Duration, error) {
	select {
	case <-closed:
		return time.Since(start), nil
	case <-time.After(limit + Allowance):
		return time.Since(start), ErrNotCut
	}
}
