package server

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
)

// busOrigin checks where a message of the event bus comes from: a host's
// credential lets it publish only under its own name (natsauth.go), and
// this takes a machine's events and log lines only from the host the
// catalog says runs it — a host cannot speak for another's machines, nor
// for another app's. One per followed stream; its subscription calls it
// one message at a time.
type busOrigin struct {
	s *Server
	a app
	// hosts are the bus names of the hosts of the machines seen so far
	// ("": not a machine of this app). Machines do not move between hosts.
	hosts map[string]string
}

// maxOrigins bounds what one stream remembers: beyond it, messages of
// machines it has not seen yet are dropped rather than looked up (a host
// inventing machine ids costs a lookup each, at most this many).
const maxOrigins = 4096

func newBusOrigin(s *Server, a app) *busOrigin {
	return &busOrigin{s: s, a: a, hosts: map[string]string{}}
}

// ok reports whether subject (<kind>.<host>.<app>.<machine>) is the
// machine's own, from its host.
func (o *busOrigin) ok(subject, machineID string) bool {
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || parts[2] != o.a.Name || parts[3] != machineID || !api.ValidMachineID(machineID) {
		return false
	}
	host, seen := o.hosts[machineID]
	if !seen {
		if len(o.hosts) >= maxOrigins {
			return false
		}
		ctx, cancel := context.WithTimeout(o.s.ctx, 5*time.Second)
		me, _, err := catalog.GetJSON[machineEntry](ctx, o.s.machines, machineKey(o.a.Name, machineID))
		cancel()
		switch {
		case err == nil && me.AppID == o.a.ID:
			host = api.BusHost(me.Host)
		case err != nil && !errors.Is(err, catalog.ErrNotFound):
			return false // not remembered: asked again next time
		}
		o.hosts[machineID] = host
	}
	return host != "" && host == parts[1]
}
