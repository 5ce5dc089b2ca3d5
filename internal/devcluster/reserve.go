package devcluster

import (
	"errors"
	"io"
	"net"
)

// A killed host's addresses on real loopback (API, DNS, edge) were mostly
// picked at random, from the range the kernel also hands out to outgoing
// connections: once the killed host's listeners close, any connection on
// the machine may take one, and Revive, which starts the host at the
// addresses it had, would fail to listen there. So the killed host's
// addresses are held until Revive: each by a listener that closes every
// connection at once, as a host whose process died refuses it.

// reserve holds a closed host's addresses (what cannot be held is left).
func (c *Cluster) reserve(h *Host) {
	var held []io.Closer
	tcp := func(addr string) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return
		}
		held = append(held, ln)
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				conn.Close()
			}
		}()
	}
	tcp(apiAddr(h.APIURL))
	if h.DNSAddr != "" {
		if pc, err := net.ListenPacket("udp", h.DNSAddr); err == nil {
			held = append(held, pc)
		}
		tcp(h.DNSAddr)
	}
	if h.EdgeAddr != "" {
		tcp(h.EdgeAddr)
	}
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	if c.faults.held == nil {
		c.faults.held = map[string][]io.Closer{}
	}
	c.faults.held[h.ID] = held
}

// release lets go of a host's held addresses, for it to listen there.
func (c *Cluster) release(id string) {
	c.faults.mu.Lock()
	held := c.faults.held[id]
	delete(c.faults.held, id)
	c.faults.mu.Unlock()
	for _, x := range held {
		x.Close()
	}
}

// releaseAll lets go of every held address, when the cluster closes.
func (c *Cluster) releaseAll() {
	c.faults.mu.Lock()
	var ids []string
	for id := range c.faults.held {
		ids = append(ids, id)
	}
	c.faults.mu.Unlock()
	for _, id := range ids {
		c.release(id)
	}
}
