package proxy

import "github.com/flamehq/flame/internal/httpserve"

// httpLimits are the bounds of the proxy's net/http servers (the edge's
// slow path and the backhaul): its own header, idle and header-size
// settings, httpserve's bound between response writes, and no bound
// between body reads — the edge bounds a buffered body in all itself
// (BodyReadTimeout) and lets a streamed one take its time.
func (p *Proxy) httpLimits() httpserve.Limits {
	return httpserve.Limits{ReadHeader: p.cfg.ReadHeaderTimeout, Idle: p.cfg.IdleTimeout,
		MaxHeaderBytes: p.cfg.MaxHeaderBytes, Body: -1}
}
