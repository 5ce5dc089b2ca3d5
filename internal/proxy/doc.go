// Package proxy is the edge proxy every host runs: it takes HTTP requests
// for <app>.<domain>, chooses the machines that should answer from the pure
// route table (internal/proxy/route) rebuilt on every cluster change, and
// delivers each request to the first that takes it — straight to the
// machine's private address when it runs on this host, else over the
// backhaul to the proxy of the machine's host, which checks the hop's
// credential (mutual TLS between hosts' certificates, or a shared token
// without a control plane: hostcreds.go) and delivers to its own machine. A refused connect, a reset before the
// response started, or the far host answering that the machine is not
// running there moves the request to the next candidate at once; bodies up
// to MaxBufferedBody are buffered so the retry is safe. Circuit breakers
// per machine, per host and per app and region keep the requests that
// follow away from what failed, and probe it back: a machine with one
// request, a silent host with the proxy's own probes (probe.go), off the
// request path.
//
// The edge listener serves plain HTTP/1.1 on a fast path of its own
// (fastconn.go: a strict parser, pooled buffers and upstream connections,
// nothing allocated per request) and hands everything else — h2c,
// upgrades, fly-replay answers, the unusual — to the same handler over
// net/http, so both answer alike.
//
// Raw TCP services (ports with handlers none or proxy_proto) are served on
// their own public ports, one listener each, routed by the same table and
// spliced byte for byte (tcp.go). Between hosts, what net/http sends goes
// as HTTP/2 streams over a few pooled connections (backhaul.go).
//
// Two kinds of listener: the edge (public: clients, plus its raw TCP
// ports) and the backhaul (other hosts' proxies only). A request on the
// edge never chooses its machine or address
// itself: the internal headers that name a machine are stripped there and
// honoured only on the backhaul, from another host.
package proxy
