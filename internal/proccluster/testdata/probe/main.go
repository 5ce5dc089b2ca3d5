// Command probe is what the private network tests run inside sandboxed
// machines: as a machine's workload it serves HTTP (its machine id) and TCP
// echo; run by exec it connects, fetches or resolves once and says how it
// went, in one line whose first word the tests match.
//
//	probe serve                    HTTP on :8080, echo on :8081
//	probe dial <host:port> <wait>  "ok <rtt>" after an echo round trip
//	probe get <url> <wait>         "ok <body>"
//	probe resolve <name> <wait>    "ok <addr>..." (AAAA records)
//	probe bulk <host:port> <n> <wait>  "ok <n> <time>" after n bytes echoed
//
// Failures print "timeout", "refused", "notfound" or "error", then the
// error, and exit 1.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: probe serve | dial | get | resolve"))
	}
	if os.Args[1] == "serve" {
		serve()
		return
	}
	if len(os.Args) < 4 {
		fail(fmt.Errorf("%s: want a target and a wait", os.Args[1]))
	}
	wait, err := time.ParseDuration(os.Args[len(os.Args)-1])
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	switch target := os.Args[2]; os.Args[1] {
	case "dial":
		start := time.Now()
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			fail(err)
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			c.SetDeadline(dl)
		}
		msg := []byte("ping\n")
		if _, err := c.Write(msg); err != nil {
			fail(err)
		}
		if _, err := io.ReadFull(c, msg); err != nil {
			fail(err)
		}
		fmt.Printf("ok %v\n", time.Since(start))
	case "bulk":
		// n bytes sent and read back at once: full-sized segments both
		// ways, which need the path's MTU right.
		n, err := strconv.Atoi(os.Args[3])
		if err != nil || n <= 0 || n > 1<<30 {
			fail(fmt.Errorf("bulk: byte count %q", os.Args[3]))
		}
		start := time.Now()
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			fail(err)
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			c.SetDeadline(dl)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := io.Copy(c, io.LimitReader(zeros{}, int64(n)))
			errc <- err
		}()
		got, err := io.CopyN(io.Discard, c, int64(n))
		if err != nil {
			fail(fmt.Errorf("%d of %d bytes back: %w", got, n, err))
		}
		if err := <-errc; err != nil {
			fail(err)
		}
		fmt.Printf("ok %d %v\n", n, time.Since(start))
	case "get":
		req, err := http.NewRequestWithContext(ctx, "GET", target, nil)
		if err != nil {
			fail(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			fail(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if err != nil {
			fail(err)
		}
		if resp.StatusCode != http.StatusOK {
			fail(fmt.Errorf("%s: %s", resp.Status, b))
		}
		fmt.Printf("ok %s\n", strings.TrimSpace(string(b)))
	case "resolve":
		addrs, err := net.DefaultResolver.LookupIP(ctx, "ip6", target)
		if err != nil {
			fail(err)
		}
		out := make([]string, len(addrs))
		for i, a := range addrs {
			out[i] = a.String()
		}
		fmt.Printf("ok %s\n", strings.Join(out, " "))
	default:
		fail(fmt.Errorf("unknown command %q", os.Args[1]))
	}
}

// serve answers GET with the machine's id on :8080 and echoes on :8081.
func serve() {
	ln, err := net.Listen("tcp", ":8081")
	if err != nil {
		fail(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Minute))
				io.Copy(c, c)
			}()
		}
	}()
	id := os.Getenv("FLY_MACHINE_ID")
	fail(http.ListenAndServe(":8080", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, id)
	})))
}

// zeros reads as endless zero bytes.
type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}

// fail prints what went wrong, classified, and exits 1.
func fail(err error) {
	kind := "error"
	var dnsErr *net.DNSError
	var ne net.Error
	switch {
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		kind = "notfound"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		kind = "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		kind = "refused"
	}
	fmt.Printf("%s %v\n", kind, err)
	os.Exit(1)
}
