package proxy

import (
	"bytes"
	"errors"
)

// A strict HTTP/1.1 parser for the edge's fast path (RFC 9112). It works on
// bytes already read into a connection's buffer and keeps slices into
// them: nothing is copied and nothing allocated. What it does not accept
// is either malformed (400), too large (431), or something the fast path
// leaves to net/http (errHandOff): the caller then serves the connection
// through the net/http server, replaying the bytes it read.

var (
	// errIncomplete: the head's end is not in the buffer yet.
	errIncomplete = errors.New("incomplete")
	// errMalformed is answered 400 and the connection closed.
	errMalformed = errors.New("malformed request")
	// errHandOff: a valid request the fast path does not serve itself
	// (HTTP/2's preface, absolute or asterisk form, transfer codings other
	// than chunked...).
	errHandOff = errors.New("not for the fast path")
)

// h1Header is one header line: its name and its value without the
// surrounding whitespace.
type h1Header struct {
	name, value []byte
}

// h1Request is a parsed request head.
type h1Request struct {
	method, target []byte
	minor          int // HTTP/1.<minor>
	headers        []h1Header
	host           []byte
	contentLength  int64 // -1: no Content-Length
	chunked        bool
	close          bool // Connection: close, or HTTP/1.0 without keep-alive
	upgrade        bool // an Upgrade header or Connection: upgrade
	expect         bool // an Expect header
	headLen        int  // bytes of the head, the blank line included
}

func (r *h1Request) reset() {
	*r = h1Request{headers: r.headers[:0], contentLength: -1}
}

// header returns the first value of a header (name in canonical case or
// any: the comparison ignores case).
func (r *h1Request) header(name string) []byte {
	for i := range r.headers {
		if equalFoldBS(r.headers[i].name, name) {
			return r.headers[i].value
		}
	}
	return nil
}

// tchar reports whether c may appear in a token (RFC 9110, 5.6.2).
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// parseRequestHead parses the head at the start of b. Up to limit bytes of
// head are allowed: past that without its end, errTooLarge.
func parseRequestHead(b []byte, limit int, r *h1Request) error {
	r.reset()
	// A server ignores empty lines before the request line (RFC 9112, 2.2).
	start := 0
	for start+1 < len(b) && b[start] == '\r' && b[start+1] == '\n' {
		start += 2
	}
	end := bytes.Index(b[start:], crlfcrlf)
	if end < 0 {
		if len(b) > limit {
			return errTooLarge
		}
		if len(b) > start && bytes.IndexByte(b[start:], '\n') >= 0 && bytes.Contains(b[start:], lflf) {
			return errMalformed // a bare LF ends lines: not ours to guess
		}
		return errIncomplete
	}
	end += start
	if end+4 > limit {
		return errTooLarge
	}
	r.headLen = end + 4
	head := b[start : end+2] // every line with its CRLF
	// The request line.
	nl := bytes.Index(head, crlf)
	line := head[:nl]
	head = head[nl+2:]
	sp := bytes.IndexByte(line, ' ')
	if sp <= 0 {
		return errMalformed
	}
	r.method = line[:sp]
	for _, c := range r.method {
		if !tchar[c] {
			return errMalformed
		}
	}
	rest := line[sp+1:]
	sp = bytes.IndexByte(rest, ' ')
	if sp <= 0 {
		return errMalformed
	}
	r.target = rest[:sp]
	inPath := true
	for i, c := range r.target {
		switch {
		case c <= ' ' || c == 0x7f:
			return errMalformed
		case c == '?':
			inPath = false
		case c == '%' && inPath:
			// A path's escapes are checked, as net/http checks them.
			if i+2 >= len(r.target) || !ishex(r.target[i+1]) || !ishex(r.target[i+2]) {
				return errMalformed
			}
		}
	}
	switch v := rest[sp+1:]; string(v) {
	case "HTTP/1.1":
		r.minor = 1
	case "HTTP/1.0":
		r.minor, r.close = 0, true
	case "HTTP/2.0":
		if string(r.method) == "PRI" && string(r.target) == "*" {
			return errHandOff // prior knowledge h2c
		}
		return errMalformed
	default:
		return errMalformed
	}
	if r.target[0] != '/' {
		return errHandOff // absolute form, '*', authority form (CONNECT)
	}
	hosts := 0
	keepAlive := false
	for len(head) > 0 {
		var name, v []byte
		var err error
		if name, v, head, err = nextHeader(head); err != nil {
			return err
		}
		r.headers = append(r.headers, h1Header{name: name, value: v})
		switch {
		case equalFoldBS(name, "Host"):
			hosts++
			r.host = v
		case equalFoldBS(name, "Content-Length"):
			n, ok := parseLength(v)
			if !ok || r.contentLength >= 0 && r.contentLength != n {
				return errMalformed
			}
			r.contentLength = n
		case equalFoldBS(name, "Transfer-Encoding"):
			if r.chunked || !equalFoldBS(v, "chunked") {
				return errHandOff // other codings: net/http answers them
			}
			r.chunked = true
		case equalFoldBS(name, "Connection"):
			for tok := range tokens(v) {
				switch {
				case equalFoldBS(tok, "close"):
					r.close = true
				case equalFoldBS(tok, "keep-alive"):
					keepAlive = true
				case equalFoldBS(tok, "upgrade"):
					r.upgrade = true
				}
			}
		case equalFoldBS(name, "Upgrade"):
			r.upgrade = true
		case equalFoldBS(name, "Expect"):
			r.expect = true
		}
	}
	if r.minor == 0 && keepAlive && !r.hasCloseToken() {
		r.close = false
	}
	switch {
	case hosts != 1 && r.minor == 1:
		return errMalformed // none, or more than one (RFC 9112, 3.2)
	case r.chunked && r.contentLength >= 0:
		return errMalformed // both framings: a smuggling attempt (RFC 9112, 6.1)
	}
	return nil
}

func (r *h1Request) hasCloseToken() bool {
	for i := range r.headers {
		if equalFoldBS(r.headers[i].name, "Connection") {
			for tok := range tokens(r.headers[i].value) {
				if equalFoldBS(tok, "close") {
					return true
				}
			}
		}
	}
	return false
}

// errTooLarge is answered 431.
var errTooLarge = errors.New("request header fields too large")

var (
	crlf     = []byte("\r\n")
	crlfcrlf = []byte("\r\n\r\n")
	lflf     = []byte("\n\n")
)

// parseLength parses a Content-Length: digits only, at most 18 of them.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

func trimOWS(v []byte) []byte {
	for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
		v = v[1:]
	}
	for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = v[:len(v)-1]
	}
	return v
}

// tokens yields the comma-separated elements of a list header, trimmed,
// empty ones skipped.
func tokens(v []byte) func(func([]byte) bool) {
	return func(yield func([]byte) bool) {
		for len(v) > 0 {
			i := bytes.IndexByte(v, ',')
			var t []byte
			if i < 0 {
				t, v = v, nil
			} else {
				t, v = v[:i], v[i+1:]
			}
			if t = trimOWS(t); len(t) > 0 && !yield(t) {
				return
			}
		}
	}
}

// equalFoldBS compares ASCII case-insensitively.
func equalFoldBS(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c, d := b[i], s[i]
		if c == d {
			continue
		}
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if 'A' <= d && d <= 'Z' {
			d += 'a' - 'A'
		}
		if c != d {
			return false
		}
	}
	return true
}

// hasPrefixFold reports whether b starts with s, ASCII case-insensitively.
func hasPrefixFold(b []byte, s string) bool {
	return len(b) >= len(s) && equalFoldBS(b[:len(s)], s)
}

// Limits of a chunked body's framing.
const (
	maxChunkLine    = 4 << 10 // a size line with its extensions
	maxTrailerBytes = 8 << 10
)

// decodeChunked decodes the chunked body at the start of b, appending its
// data to dst, with at most max data bytes. It returns the bytes of b the
// body took; errIncomplete when its end is not in b yet, errTooLarge past
// max.
func decodeChunked(b []byte, max int64, dst []byte) (out []byte, n int, err error) {
	out = dst
	var total int64
	for {
		nl := bytes.Index(b[n:], crlf)
		if nl < 0 {
			if len(b)-n > maxChunkLine {
				return out, 0, errMalformed
			}
			return out, 0, errIncomplete
		}
		if nl > maxChunkLine {
			return out, 0, errMalformed
		}
		line := b[n : n+nl]
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i] // extensions are ignored
		}
		line = trimOWS(line)
		size, ok := parseHex(line)
		if !ok {
			return out, 0, errMalformed
		}
		n += nl + 2
		if size == 0 {
			// Trailers (dropped), then the blank line.
			for {
				nl := bytes.Index(b[n:], crlf)
				if nl < 0 {
					if len(b)-n > maxTrailerBytes {
						return out, 0, errMalformed
					}
					return out, 0, errIncomplete
				}
				n += nl + 2
				if nl == 0 {
					return out, n, nil
				}
			}
		}
		if total += size; total > max {
			return out, 0, errTooLarge
		}
		if int64(len(b)-n) < size+2 {
			return out, 0, errIncomplete
		}
		out = append(out, b[n:n+int(size)]...)
		n += int(size)
		if b[n] != '\r' || b[n+1] != '\n' {
			return out, 0, errMalformed
		}
		n += 2
	}
}

func ishex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseHex parses a chunk size: hex digits, at most 15.
func parseHex(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 15 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		n = n<<4 | int64(d)
	}
	return n, true
}

// h1Response is a parsed response head from a machine or a far proxy.
type h1Response struct {
	status        int
	headers       []h1Header
	contentLength int64 // -1: none
	chunked       bool
	close         bool
	replay        bool // a Fly-Replay header or the replay JSON type
	retry         []byte
	retryKind     []byte
	timeout       []byte
	hasDate       bool
	headLen       int
}

// parseResponseHead parses the head at the start of b (limit as for
// requests; a response head past it is a failed attempt).
func parseResponseHead(b []byte, limit int, r *h1Response) error {
	*r = h1Response{headers: r.headers[:0], contentLength: -1}
	end := bytes.Index(b, crlfcrlf)
	if end < 0 {
		if len(b) > limit {
			return errTooLarge
		}
		return errIncomplete
	}
	r.headLen = end + 4
	head := b[:end+2]
	nl := bytes.Index(head, crlf)
	line := head[:nl]
	head = head[nl+2:]
	// HTTP/1.x NNN[ reason]
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' ||
		(len(line) > 12 && line[12] != ' ') {
		return errMalformed
	}
	if line[7] == '0' {
		r.close = true
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return errMalformed
		}
		r.status = r.status*10 + int(c-'0')
	}
	if r.status < 100 {
		return errMalformed
	}
	for len(head) > 0 {
		var name, v []byte
		var err error
		if name, v, head, err = nextHeader(head); err != nil {
			return err
		}
		r.headers = append(r.headers, h1Header{name: name, value: v})
		switch {
		case equalFoldBS(name, "Content-Length"):
			n, ok := parseLength(v)
			if !ok || r.contentLength >= 0 && r.contentLength != n {
				return errMalformed
			}
			r.contentLength = n
		case equalFoldBS(name, "Transfer-Encoding"):
			if !equalFoldBS(v, "chunked") {
				return errMalformed // not spoken by the machines' side
			}
			r.chunked = true
		case equalFoldBS(name, "Connection"):
			for tok := range tokens(v) {
				if equalFoldBS(tok, "close") {
					r.close = true
				}
			}
		case equalFoldBS(name, hdrReplay):
			r.replay = true
		case equalFoldBS(name, "Content-Type"):
			if hasPrefixFold(v, replayJSONType) && (len(v) == len(replayJSONType) || v[len(replayJSONType)] == ';' || v[len(replayJSONType)] == ' ') {
				r.replay = true
			}
		case equalFoldBS(name, hdrRetry):
			r.retry = v
		case equalFoldBS(name, hdrRetryKind):
			r.retryKind = v
		case equalFoldBS(name, hdrTimeout):
			r.timeout = v
		case equalFoldBS(name, "Date"):
			r.hasDate = true
		}
	}
	if r.chunked {
		r.contentLength = -1 // chunked wins (RFC 9112, 6.3)
	}
	return nil
}

// bodyless reports whether a response to method with status has no body.
func bodyless(head bool, status int) bool {
	return head || status/100 == 1 || status == 204 || status == 304
}

// nextHeader takes the first header line of head (every line ending in
// CRLF) strictly: a name of token characters right before the colon (no
// obs-fold, no whitespace), a value with its surrounding whitespace trimmed
// and no control character, no bare CR or LF anywhere. It returns the rest
// of head.
func nextHeader(head []byte) (name, value, rest []byte, err error) {
	nl := bytes.Index(head, crlf)
	line, rest := head[:nl], head[nl+2:]
	if bytes.IndexByte(line, '\n') >= 0 || bytes.IndexByte(line, '\r') >= 0 {
		return nil, nil, nil, errMalformed // bare CR or LF inside a line
	}
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return nil, nil, nil, errMalformed // no name, or obs-fold (a line starting with space)
	}
	name = line[:colon]
	for _, c := range name {
		if !tchar[c] {
			return nil, nil, nil, errMalformed // whitespace before the colon included
		}
	}
	value = trimOWS(line[colon+1:])
	for _, c := range value {
		if c < ' ' && c != '\t' || c == 0x7f {
			return nil, nil, nil, errMalformed
		}
	}
	return name, value, rest, nil
}
