package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"sync/atomic"

	"github.com/flamehq/flame/internal/proxy/route"
)

// A request the fast path sent whose machine answered with a fly-replay is
// handed to serveEdge with that answer, so the replay is followed there,
// and the machine that asked is not asked again.

// prefetched is the fly-replay answer of a request handed over.
type prefetched struct {
	reqID string
	resp  *http.Response
	from  *route.Target
	taken atomic.Bool
}

// handedKey is the context key of a handed-over connection's prefetched
// answer.
type handedKey struct{}

// connContext gives a handed-over connection's requests its prefetched
// answer (the first request takes it).
func connContext(ctx context.Context, c net.Conn) context.Context {
	ctx = secureConn(ctx, c)
	if rc, ok := c.(*replayConn); ok && rc.pre != nil {
		return context.WithValue(ctx, handedKey{}, rc.pre)
	}
	return ctx
}

// handedOver returns the prefetched answer of a request, once.
func handedOver(r *http.Request) *prefetched {
	pre, _ := r.Context().Value(handedKey{}).(*prefetched)
	if pre == nil || !pre.taken.CompareAndSwap(false, true) {
		return nil
	}
	return pre
}

// answer is the prefetched answer as attempts returns one (nothing for a
// nil pre).
func (pre *prefetched) answer() (*http.Response, *route.Target, []string) {
	if pre == nil {
		return nil, nil, nil
	}
	return pre.resp, pre.from, nil
}

// prefetch builds the http.Response of a fly-replay answer the fast path
// read the head of: its headers, and for the JSON form the body (up to
// what parseReplayJSON accepts, plus one byte to see it is larger).
func (fc *fastConn) prefetch(uc *upConn, tg *route.Target) *prefetched {
	resp := &fc.resp
	hr := &http.Response{
		StatusCode: resp.status, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: make(http.Header, len(resp.headers)), ContentLength: resp.contentLength, Body: http.NoBody,
	}
	for _, h := range resp.headers {
		hr.Header.Add(string(h.name), string(h.value))
	}
	if hr.Header.Get(hdrReplay) == "" && !bodyless(str(fc.req.method) == http.MethodHead, resp.status) {
		lb := &limitedBuffer{max: maxReplayLen + 1}
		o := &outBuf{c: lb, b: make([]byte, 0, 4<<10)}
		uc.r += resp.headLen
		switch {
		case resp.contentLength >= 0:
			copyLength(o, uc, resp.contentLength)
		case resp.chunked:
			copyChunkedData(o, uc)
		default:
			copyUntilEOF(o, uc)
		}
		o.flush()
		hr.Body = io.NopCloser(bytes.NewReader(lb.b))
	}
	return &prefetched{reqID: string(fc.id[:fc.idLen]), resp: hr, from: tg}
}

// limitedBuffer keeps the first max bytes written, then fails.
type limitedBuffer struct {
	b   []byte
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if len(l.b)+len(p) > l.max {
		l.b = append(l.b, p[:l.max-len(l.b)]...)
		return 0, io.ErrShortWrite
	}
	l.b = append(l.b, p...)
	return len(p), nil
}
