package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
)

// An edge has one public address, so a raw TCP public port (a tcp
// service's port with handlers none or proxy_proto) is one app's,
// platform-wide: the first app whose machine or group config declares it
// holds it until the app is deleted, and a config of another app naming it
// is refused. The claims live in their own bucket, one key per port, taken
// by compare-and-swap.
const bucketTCPPorts = "tcpports" // <port> → tcpClaim

// tcpClaim is the app a raw TCP public port belongs to.
type tcpClaim struct {
	App   string `json:"app"`
	AppID string `json:"app_id"`
}

// errPortTaken is the refusal of a port another app holds.
func errPortTaken(port int) error {
	return api.Errorf(http.StatusConflict, "services: public port %d is already served as raw TCP by another app (a raw TCP port belongs to one app platform-wide)", port)
}

// claimTCPPorts claims for app a every raw TCP public port cfg declares.
// A port another live app holds refuses the config (409 naming the port),
// and what this call claimed is given back; a claim of an app since
// deleted is taken over.
func (s *Server) claimTCPPorts(ctx context.Context, a app, cfg *api.MachineConfig) error {
	ports := cfg.TCPPorts()
	if len(ports) > api.MaxTCPPortsPerConfig {
		return api.Errorf(http.StatusUnprocessableEntity, "services: more than %d raw TCP public ports (handlers none or proxy_proto; a range counts each port)", api.MaxTCPPortsPerConfig)
	}
	var claimed []string
	for _, port := range ports {
		key := strconv.Itoa(port)
		fresh := false
		_, _, err := catalog.UpdateJSON(ctx, s.tcpPorts, key, func(v *tcpClaim, exists bool) error {
			fresh = false
			if exists && v.AppID == a.ID {
				return errNoChange
			}
			if exists {
				if live, err := s.liveClaim(ctx, v.App, v.AppID); err != nil || live {
					return cmp.Or(err, errPortTaken(port))
				}
			}
			*v, fresh = tcpClaim{App: a.Name, AppID: a.ID}, true
			return nil
		})
		if errors.Is(err, errNoChange) {
			continue
		}
		if err != nil {
			s.releaseTCPPorts(ctx, a, claimed)
			return err
		}
		if fresh {
			claimed = append(claimed, key)
		}
	}
	if len(claimed) > 0 {
		s.log.Info("raw TCP ports claimed", "app", a.Name, "ports", claimed)
	}
	return nil
}

// releaseTCPPorts gives back the claims of app a: those named, or every
// one when keys is nil. A claim another app took meanwhile stays its.
func (s *Server) releaseTCPPorts(ctx context.Context, a app, keys []string) error {
	if keys == nil {
		es, err := s.tcpPorts.List(ctx, "")
		if err != nil {
			return fmt.Errorf("list raw TCP port claims: %w", err)
		}
		for _, e := range es {
			keys = append(keys, e.Key)
		}
	}
	for _, key := range keys {
		_, _, err := catalog.UpdateJSON(ctx, s.tcpPorts, key, func(v *tcpClaim, exists bool) error {
			if !exists || v.AppID != a.ID {
				return errNoChange
			}
			return catalog.ErrDelete
		})
		if err != nil && !errors.Is(err, errNoChange) {
			return fmt.Errorf("release raw TCP port %s: %w", key, err)
		}
	}
	return nil
}

// liveClaim reports whether a claim (of a raw TCP port, of a hostname)
// made by the app named name with id id still stands: that very app still
// exists. A deleted app's claim, or an earlier app's of the same name, is
// taken over.
func (s *Server) liveClaim(ctx context.Context, name, id string) (bool, error) {
	held, _, err := catalog.GetJSON[app](ctx, s.apps, name)
	switch {
	case err == nil:
		return held.ID == id, nil
	case errors.Is(err, catalog.ErrNotFound):
		return false, nil
	}
	return false, err
}
