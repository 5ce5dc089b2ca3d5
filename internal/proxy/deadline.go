package proxy

import (
	"net"
	"time"
)

// Deadlines on the fast path's connections. A connection's deadline is a
// runtime timer: setting it from nothing, moving it earlier or clearing it
// takes the timer heap's lock and can wake the network poller (a write to
// its eventfd, another epoll_wait), several times per request if every
// request sets and clears its own. The fast path instead leaves a
// deadline standing on a connection while nothing reads (or writes) under
// it, sets the next one only where a read may wait, and keeps a deadline
// already set a little after the one wanted: a keep-alive connection's
// timers move about once per slack, not on every request. Every read of a
// fast-path connection sets its deadline through a deadlines value first.

// deadlines is a connection's read and write deadlines as last set (zero:
// none).
type deadlines struct{ r, w time.Time }

// slackDiv: a deadline may fire up to its timeout / slackDiv late (60 s
// of idle: 1.9 s), where the callers allow slack at all.
const slackDiv = 32

// read makes c's read deadline fall within [t, t+slack]: the one set is
// kept if it does, else t+slack is set. A zero t clears it.
func (d *deadlines) read(c net.Conn, t time.Time, slack time.Duration) {
	if at, ok := within(d.r, t, slack); !ok {
		d.r = at
		c.SetReadDeadline(at)
	}
}

// write is read for the write deadline.
func (d *deadlines) write(c net.Conn, t time.Time, slack time.Duration) {
	if at, ok := within(d.w, t, slack); !ok {
		d.w = at
		c.SetWriteDeadline(at)
	}
}

// within reports whether the deadline cur falls in [t, t+slack]; if not,
// it returns the one to set.
func within(cur, t time.Time, slack time.Duration) (time.Time, bool) {
	if t.IsZero() {
		return t, cur.IsZero()
	}
	if !cur.IsZero() && !cur.Before(t) && cur.Sub(t) <= slack {
		return cur, true
	}
	return t.Add(slack), false
}
