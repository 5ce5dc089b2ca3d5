package netsim

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// event is one delivery: a datagram to a port of dst, or a stream segment
// (data, or the end of the stream) to an inbox.
type event struct {
	at  int64  // nanoseconds since the Network started
	seq uint64 // ties on at keep the order events were scheduled in

	src, dst *host
	data     []byte

	// datagrams
	srcPort, dstPort int

	// stream segments
	in  *inbox
	eof bool
}

// scheduler is a min-heap of events ordered by (at, seq).
type scheduler struct {
	mu   sync.Mutex
	q    []event
	seq  uint64
	wake chan struct{}
	// inFlight counts events scheduled and not yet delivered.
	inFlight atomic.Int64
}

func (s *scheduler) init() { s.wake = make(chan struct{}, 1) }

func (s *scheduler) less(i, j int) bool {
	a, b := &s.q[i], &s.q[j]
	return a.at < b.at || a.at == b.at && a.seq < b.seq
}

func (s *scheduler) push(e event) {
	s.inFlight.Add(1)
	s.mu.Lock()
	e.seq = s.seq
	s.seq++
	s.q = append(s.q, e)
	i := len(s.q) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !s.less(i, p) {
			break
		}
		s.q[i], s.q[p] = s.q[p], s.q[i]
		i = p
	}
	first := i == 0
	s.mu.Unlock()
	if first {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// popLocked removes the earliest event; s.mu held, s.q not empty.
func (s *scheduler) popLocked() event {
	e := s.q[0]
	last := len(s.q) - 1
	s.q[0] = s.q[last]
	s.q[last] = event{}
	s.q = s.q[:last]
	i := 0
	for {
		l := 2*i + 1
		if l >= last {
			break
		}
		m := l
		if r := l + 1; r < last && s.less(r, l) {
			m = r
		}
		if !s.less(m, i) {
			break
		}
		s.q[i], s.q[m] = s.q[m], s.q[i]
		i = m
	}
	return e
}

func (n *Network) now() int64 { return int64(time.Since(n.start)) }

// schedule queues an event to happen after delay.
func (n *Network) schedule(delay time.Duration, e event) {
	e.at = n.now() + int64(delay)
	n.sched.push(e)
}

// run delivers events when they are due, until the Network closes.
func (n *Network) run() {
	defer n.wg.Done()
	s := &n.sched
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var batch []event
	for {
		now := n.now()
		wait := int64(-1)
		s.mu.Lock()
		for len(s.q) > 0 && s.q[0].at <= now {
			batch = append(batch, s.popLocked())
		}
		if len(s.q) > 0 {
			wait = s.q[0].at - now
		}
		s.mu.Unlock()

		if len(batch) > 0 {
			for i := range batch {
				n.deliver(&batch[i])
				batch[i] = event{}
			}
			s.inFlight.Add(-int64(len(batch)))
			batch = batch[:0]
			continue
		}
		select {
		case <-n.done:
			return
		default:
		}
		if wait < 0 {
			select {
			case <-s.wake:
			case <-n.done:
				return
			}
			continue
		}
		timer.Reset(time.Duration(wait))
		select {
		case <-timer.C:
		case <-s.wake:
			timer.Stop()
		case <-n.done:
			return
		}
	}
}

func (n *Network) deliver(e *event) {
	if e.in != nil {
		n.deliverSegment(e)
		return
	}
	if !n.linkUp(e.src, e.dst) {
		return
	}
	e.dst.mu.Lock()
	sink := e.dst.udp[e.dstPort]
	e.dst.mu.Unlock()
	if sink == nil {
		return
	}
	from := &net.UDPAddr{IP: e.src.ip, Port: e.srcPort}
	if !sink.deliver(e.data, from) {
		n.log.Debug("datagram dropped: receive queue full", "host", e.dst.name, "port", e.dstPort)
		return
	}
	e.dst.recvPackets.Add(1)
	e.dst.recvBytes.Add(uint64(len(e.data)))
}
