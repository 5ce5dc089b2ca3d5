package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
)

// upgradeOf returns the protocol a request (or a 101 response) switches to,
// "" for none: an Upgrade header named by Connection, as WebSockets send.
func upgradeOf(h http.Header) string {
	for _, v := range h["Connection"] {
		for f := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), "upgrade") {
				return h.Get("Upgrade")
			}
		}
	}
	return ""
}

// keepUpgrade puts back the two hop-by-hop headers an upgrade needs on the
// next hop.
func keepUpgrade(h http.Header, proto string) {
	if proto != "" {
		h.Set("Connection", "Upgrade")
		h.Set("Upgrade", proto)
	}
}

// upgrades are connections no HTTP server tracks — those switched to
// another protocol, and raw TCP ones — which Close ends: each add is one
// goroutine serving them, which done ends.
type upgrades struct {
	mu     sync.Mutex
	conns  map[io.Closer]struct{}
	closed bool
	wg     sync.WaitGroup
}

// add tracks the two ends of an upgraded connection; false once closed.
func (u *upgrades) add(cs ...io.Closer) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return false
	}
	if u.conns == nil {
		u.conns = map[io.Closer]struct{}{}
	}
	for _, c := range cs {
		u.conns[c] = struct{}{}
	}
	u.wg.Add(1)
	return true
}

func (u *upgrades) done(cs ...io.Closer) {
	u.mu.Lock()
	for _, c := range cs {
		delete(u.conns, c)
	}
	u.mu.Unlock()
	u.wg.Done()
}

// closeAll cuts every upgraded connection and waits for their copies.
func (u *upgrades) closeAll() {
	u.mu.Lock()
	u.closed = true
	for c := range u.conns {
		c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}

// switchProtocols completes a 101 answer: the client's connection is taken
// from the HTTP server and joined to the machine's (or the far proxy's)
// until either end closes.
func (p *Proxy) switchProtocols(w http.ResponseWriter, resp *http.Response, reqID string) {
	back, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		panic(http.ErrAbortHandler)
	}
	defer back.Close()
	proto := upgradeOf(resp.Header)
	removeHopHeaders(resp.Header)
	removeInternal(resp.Header)
	keepUpgrade(resp.Header, proto)
	if reqID != "" {
		resp.Header.Set("Fly-Request-Id", reqID)
		resp.Header.Set("Server", serverName)
		resp.Header.Add("Via", viaValue)
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		p.log.Debug("upgrade: take the client's connection", "err", err)
		panic(http.ErrAbortHandler)
	}
	defer conn.Close()
	if !p.upgraded.add(conn, back) {
		return // the proxy is closing
	}
	defer p.upgraded.done(conn, back)
	if err := writeSwitch(brw.Writer, resp); err != nil {
		return
	}
	// Whatever the client sent after its request is in brw.Reader.
	join(conn, brw.Reader, back)
}

// writeSwitch writes the 101 status line and headers.
func writeSwitch(w *bufio.Writer, resp *http.Response) error {
	if _, err := fmt.Fprintf(w, "HTTP/1.1 101 %s\r\n", http.StatusText(http.StatusSwitchingProtocols)); err != nil {
		return err
	}
	if err := resp.Header.Write(w); err != nil {
		return err
	}
	if _, err := w.WriteString("\r\n"); err != nil {
		return err
	}
	return w.Flush()
}

// join copies both ways until one side ends, then closes both.
func join(client net.Conn, fromClient io.Reader, back io.ReadWriteCloser) {
	done := make(chan struct{}, 2)
	go func() {
		io.Copy(back, fromClient)
		done <- struct{}{}
	}()
	go func() {
		io.Copy(client, back)
		done <- struct{}{}
	}()
	<-done
	client.Close()
	back.Close()
	<-done
}
