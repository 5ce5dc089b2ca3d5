package server

import (
	"context"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
)

// The catalog's NATS, when the control plane embeds it, is locked
// (catalog.Config.Secret): the control role reads and writes everything;
// each enrolled host gets an nkey of its own at enrollment (the catalog's
// hosts bucket records the public key) and may publish only its own
// events and logs and use only the buckets its edge needs. A revoked host's
// key is refused from then on, and its connections are closed.

// hostBuckets are the buckets a host's edge uses (internal/certstore): the
// hostnames claimed through the API, read-only; the certificates ACME
// issued and the locks of their issuance, read and written. No other
// bucket — tokens, secrets, apps, authority, hosts — is reachable.
func hostBuckets() []catalog.BucketAccess {
	return []catalog.BucketAccess{
		{Bucket: certstore.BucketHostnames},
		{Bucket: certstore.BucketCerts, Write: true},
		{Bucket: certstore.BucketLocks, Write: true},
	}
}

// HostNATSPermissions is what host hostID's credential may do on the
// catalog's NATS.
func HostNATSPermissions(hostID string) catalog.Permissions {
	return catalog.Restricted(hostID, api.HostBusSubjects(hostID), hostBuckets())
}

// natsUsers maps the enrolled hosts' nkeys to their ids, fed by a watch of
// the hosts bucket and by this plane's own enrollments and revocations.
type natsUsers struct {
	mu     sync.RWMutex
	byKey  map[string]string // nkey → host id
	byHost map[string]string // host id → nkey
}

func newNATSUsers() *natsUsers {
	return &natsUsers{byKey: map[string]string{}, byHost: map[string]string{}}
}

// set records host id's key ("" or revoked: none); it reports a change.
func (u *natsUsers) set(id, nkey string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	old := u.byHost[id]
	if old == nkey {
		return false
	}
	delete(u.byKey, old)
	delete(u.byHost, id)
	if nkey != "" {
		u.byKey[nkey], u.byHost[id] = id, nkey
	}
	return true
}

func (u *natsUsers) host(nkey string) (string, bool) {
	u.mu.RLock()
	defer u.mu.RUnlock()
	id, ok := u.byKey[nkey]
	return id, ok
}

// NATSUser is the locked catalog's catalog.UserSource: an enrolled host
// that is not revoked, with its permissions.
func (s *Server) NATSUser(nkey string) (catalog.User, bool) {
	id, ok := s.natsUsers.host(nkey)
	if !ok {
		return catalog.User{}, false
	}
	return catalog.User{Name: id, Permissions: HostNATSPermissions(id)}, true
}

// setNATSUser records a host's key and closes the connections of keys no
// longer admitted.
func (s *Server) setNATSUser(r hostRecord) {
	key := r.NATSKey
	if r.Revoked {
		key = ""
	}
	if s.natsUsers.set(r.ID, key) {
		s.recheckNATS()
	}
}

func (s *Server) recheckNATS() {
	if rc, ok := s.cfg.Catalog.(interface{ Recheck() }); ok {
		rc.Recheck()
	}
}

// followNATSUsers keeps natsUsers as the hosts bucket says until ctx ends.
func (s *Server) followNATSUsers(ctx context.Context) {
	for ctx.Err() == nil {
		ch, err := s.ident.hosts.Watch(ctx, "")
		if err == nil {
			for c := range ch {
				var r hostRecord
				if c.Deleted || decodeJSON(c.Value, &r) != nil {
					r = hostRecord{ID: c.Key}
				}
				r.ID = c.Key
				s.setNATSUser(r)
			}
		}
		if ctx.Err() != nil {
			return
		}
		// Keys are kept meanwhile: a revocation this plane missed is
		// caught by the next watch, which starts with every record.
		s.log.Debug("catalog watch ended; watching again", "bucket", bucketHosts, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
