package server

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/pki"
)

// Certificates are made and checked on the machine's clock, never on
// Config.Now (a test's clock): hosts check them on theirs.
//
// Host identities: the cluster's CA lives in the catalog, its key sealed
// under the secrets key; an admin mints one-time join tokens; a host
// enrolls with one and its own key's certificate request and gets a
// certificate naming its id; the control plane calls a host only at the
// address it enrolled with, over mutual TLS, and only while it is not
// revoked.
const (
	bucketAuthority  = "authority"  // "ca" → caRecord
	bucketHosts      = "hosts"      // host id → hostRecord
	bucketJoinTokens = "jointokens" // token id → joinTokenRecord, expiring
)

func identityBuckets() []catalog.BucketSpec {
	return []catalog.BucketSpec{{Name: bucketAuthority}, {Name: bucketHosts}, {Name: bucketJoinTokens, TTL: true}}
}

// Join tokens' lifetimes.
const (
	defaultJoinTokenTTL = time.Hour
	maxJoinTokenTTL     = 7 * 24 * time.Hour
)

type caRecord struct {
	Cert      string `json:"cert"`
	SealedKey []byte `json:"sealed_key"`
}

type hostRecord struct {
	ID        string    `json:"id"`
	Region    string    `json:"region"`
	APIAddr   string    `json:"api_addr"`
	Serial    string    `json:"serial"`
	Enrolled  time.Time `json:"enrolled"`
	Expires   time.Time `json:"expires"`
	Revoked   bool      `json:"revoked,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	// NATSKey is the public nkey the host's credential on the catalog's
	// NATS signs with (natsauth.go); "" with an external NATS.
	NATSKey string `json:"nats_key,omitempty"`
	// Superseded are the host's earlier certificates it replaced by
	// renewing, until each ends (hosts_creds.go).
	Superseded []supersededCert `json:"superseded,omitempty"`
	// Number is the host's in the private network (hosts_mesh.go).
	Number uint16 `json:"number,omitempty"`
}

type joinTokenRecord struct {
	SealedSecret []byte    `json:"sealed_secret"`
	HostID       string    `json:"host_id,omitempty"`
	Expires      time.Time `json:"expires"`
	Used         bool      `json:"used,omitempty"`
}

// identity is the control plane's side of host identities.
type identity struct {
	ca      *pki.CA
	roots   *x509.CertPool
	control *pki.ControlCert
	hosts   catalog.Bucket
	tokens  catalog.Bucket
	cache   *cache[hostRecord]
	// revKick asks for the revocation list to be pushed to the hosts;
	// orgs are the orgs with machines on each host (hosts_creds.go).
	revKick chan struct{}
	orgs    hostOrgs
	// template is the transport each host's own is cloned from.
	template *http.Transport

	mu    sync.Mutex
	conns map[string]*hostConn // host id → its client, for one address and certificate
	// retired are transports replaced or dropped while a call may still
	// have held a connection: it goes idle there later, and Close closes it.
	retired []*http.Transport
}

type hostConn struct {
	addr, serial string
	client       *http.Client
	tr           *http.Transport
}

// AAD names for what the secrets key seals here, apart from apps' secrets.
const (
	sealCA        = "cluster-ca"
	sealJoinToken = "join-token"
)

// loadIdentity reads (or, the first time, makes) the cluster's CA from the
// catalog.
func (s *Server) loadIdentity(ctx context.Context) error {
	auth, err := s.cfg.Catalog.Bucket(bucketAuthority)
	if err != nil {
		return fmt.Errorf("server: bucket %s: %w", bucketAuthority, err)
	}
	id := &identity{conns: map[string]*hostConn{}, cache: newCache[hostRecord](), revKick: make(chan struct{}, 1)}
	if id.hosts, err = s.cfg.Catalog.Bucket(bucketHosts); err != nil {
		return fmt.Errorf("server: bucket %s: %w", bucketHosts, err)
	}
	if id.tokens, err = s.cfg.Catalog.Bucket(bucketJoinTokens); err != nil {
		return fmt.Errorf("server: bucket %s: %w", bucketJoinTokens, err)
	}
	rec, err := loadOrCreate(ctx, auth, "ca", func() (caRecord, error) {
		ca, err := pki.NewCA("flame cluster CA", time.Now())
		if err != nil {
			return caRecord{}, err
		}
		return caRecord{Cert: string(ca.CertPEM()), SealedKey: s.aead.seal(sealCA, "key", string(ca.KeyPEM()))}, nil
	})
	if err != nil {
		return fmt.Errorf("server: cluster ca: %w", err)
	}
	keyPEM, err := s.aead.open(sealCA, "key", rec.SealedKey)
	if err != nil {
		return fmt.Errorf("server: the secret key does not open the cluster's CA: give every control plane the same key")
	}
	if id.ca, err = pki.ParseCA([]byte(rec.Cert), []byte(keyPEM)); err != nil {
		return fmt.Errorf("server: cluster ca: %w", err)
	}
	id.roots = id.ca.Pool()
	var name [8]byte
	rand.Read(name[:])
	id.control = pki.NewControlCert(id.ca, "plane-"+hex.EncodeToString(name[:]), time.Now)
	if t, ok := s.cfg.HTTPClient.Transport.(*http.Transport); ok {
		id.template = t.Clone()
	} else {
		id.template = http.DefaultTransport.(*http.Transport).Clone()
	}
	s.ident = id
	return nil
}

// loadOrCreate reads key, creating it with make's value when absent (once,
// whichever control plane gets there first).
func loadOrCreate[T any](ctx context.Context, b catalog.Bucket, key string, make func() (T, error)) (T, error) {
	v, _, err := catalog.GetJSON[T](ctx, b, key)
	if !errors.Is(err, catalog.ErrNotFound) {
		return v, err
	}
	if v, err = make(); err != nil {
		return v, err
	}
	if _, err = catalog.CreateJSON(ctx, b, key, v, 0); errors.Is(err, catalog.ErrExists) {
		// Another plane made it first. A replicated catalog may answer
		// the read from a replica that has not applied that create yet:
		// the key exists, so not-found only means not yet.
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		for {
			v, _, err = catalog.GetJSON[T](ctx, b, key)
			if !errors.Is(err, catalog.ErrNotFound) {
				break
			}
			select {
			case <-ctx.Done():
				return v, fmt.Errorf("%s exists but cannot be read yet: %w", key, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return v, err
}

// CAFingerprint is the cluster's CA certificate's SHA-256.
func (s *Server) CAFingerprint() string { return s.ident.ca.Fingerprint() }

// ControlTLS is the TLS a client of host hostID's API uses: the control
// plane's certificate, and only that host's (any certificate of it the CA
// issued). Operators' tools and tests call hosts with it.
func (s *Server) ControlTLS(hostID string) *tls.Config {
	return pki.ClientTLS(s.ident.roots, s.ident.control.Get, hostID, "", time.Now)
}

// hostRecordOf reads a host's record, from the cache when it has it.
func (s *Server) hostRecordOf(ctx context.Context, hostID string) (hostRecord, bool, error) {
	if r, ok := s.ident.cache.get(hostID); ok {
		return r, true, nil
	}
	if !pki.ValidID(hostID) {
		return hostRecord{}, false, nil
	}
	r, _, err := catalog.GetJSON[hostRecord](ctx, s.ident.hosts, hostID)
	if errors.Is(err, catalog.ErrNotFound) {
		return hostRecord{}, false, nil
	}
	return r, err == nil, err
}

// hostCallable is placement's filter: only enrolled hosts not revoked are
// offered machines (a member of the gossip that never enrolled is not).
func (s *Server) hostCallable(hostID string) bool {
	if s.ident == nil {
		return false
	}
	r, ok := s.ident.cache.get(hostID)
	return ok && !r.Revoked
}

// enrolledClient is the client for an enrolled host's API: at the address
// it enrolled with, whatever the gossip says, over mutual TLS accepting
// only the certificate the catalog records for it.
func (s *Server) enrolledClient(hostID string) (*api.Client, error) {
	if s.ident == nil {
		return nil, api.Errorf(http.StatusServiceUnavailable, "the control plane has not loaded the cluster's CA")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rec, ok, err := s.hostRecordOf(ctx, hostID)
	switch {
	case err != nil:
		return nil, api.Errorf(http.StatusServiceUnavailable, "catalog unavailable, try again: %v", err)
	case !ok:
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is not enrolled", clipName(hostID))
	case rec.Revoked:
		s.dropHostConn(hostID)
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is revoked", hostID)
	}
	s.ident.mu.Lock()
	defer s.ident.mu.Unlock()
	hc := s.ident.conns[hostID]
	if hc == nil || hc.addr != rec.APIAddr || hc.serial != rec.Serial {
		if hc != nil {
			hc.tr.CloseIdleConnections()
			s.ident.retired = append(s.ident.retired, hc.tr)
		}
		tr := s.ident.template.Clone()
		tr.TLSClientConfig = pki.ClientTLS(s.ident.roots, s.ident.control.Get, hostID, rec.Serial, time.Now)
		hc = &hostConn{addr: rec.APIAddr, serial: rec.Serial, tr: tr, client: &http.Client{Transport: tr}}
		s.ident.conns[hostID] = hc
	}
	c := api.NewClient("https://"+hc.addr, "")
	c.HTTPClient = hc.client
	return c, nil
}

// dropHostConn closes the connections kept to a host.
func (s *Server) dropHostConn(hostID string) {
	s.ident.mu.Lock()
	defer s.ident.mu.Unlock()
	if hc := s.ident.conns[hostID]; hc != nil {
		hc.tr.CloseIdleConnections()
		s.ident.retired = append(s.ident.retired, hc.tr)
		delete(s.ident.conns, hostID)
	}
}

// closeHostConns closes every connection kept to hosts.
func (s *Server) closeHostConns() {
	if s.ident == nil {
		return
	}
	s.ident.mu.Lock()
	defer s.ident.mu.Unlock()
	for id, hc := range s.ident.conns {
		hc.tr.CloseIdleConnections()
		delete(s.ident.conns, id)
	}
	for _, tr := range s.ident.retired {
		tr.CloseIdleConnections()
	}
	s.ident.retired = nil
}

func (s *Server) identityRoutes() {
	s.api.Handle("POST /v1/hosts/join-tokens", s.createJoinToken)
	s.api.Handle("GET /v1/hosts", s.listHosts)
	s.api.Handle("POST /v1/hosts/{host}/revoke", s.revokeHost)
	s.api.Handle("POST /v1/hosts/client-certificates", s.issueClientCertificate)
	s.api.Handle("POST /v1/hosts/gossip-key/rotate", s.rotateGossipKey)
}

// operatorValidity is how long an operator's client certificate lasts: it
// cannot be revoked, so it is short.
const operatorValidity = time.Hour

// issueClientCertificate is POST /v1/hosts/client-certificates (admin
// only): a client certificate in the control plane's role, for an hour,
// for a key the caller keeps — an operator's tool (a test harness, a
// debugging session) calls hosts' APIs directly with it.
func (s *Server) issueClientCertificate(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can get a client certificate")
	}
	var in api.ClientCertificateInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	pub, err := pki.CheckCSR(in.CSR)
	if err != nil {
		return api.Errorf(http.StatusUnprocessableEntity, "csr: %v", err)
	}
	var name [8]byte
	rand.Read(name[:])
	cert, err := s.ident.ca.Issue(pki.RoleControl, "operator-"+hex.EncodeToString(name[:]), pub, time.Now(), operatorValidity)
	if err != nil {
		return err
	}
	s.log.Info("client certificate issued", "name", cert.Subject.CommonName, "by", caller(r.Context()).Name)
	httpapi.WriteJSON(w, http.StatusCreated, api.ClientCertificate{Certificate: string(pki.CertPEM(cert.Raw)),
		CA: string(s.ident.ca.CertPEM()), ExpiresAt: cert.NotAfter.UTC().Format(time.RFC3339)})
	return nil
}

// createJoinToken is POST /v1/hosts/join-tokens (admin only).
func (s *Server) createJoinToken(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can mint join tokens")
	}
	var in api.CreateJoinTokenInput
	if err := httpapi.DecodeBody(r, &in, false); err != nil {
		return err
	}
	ttl := defaultJoinTokenTTL
	switch {
	case in.HostID != "" && !pki.ValidID(in.HostID):
		return api.Errorf(http.StatusUnprocessableEntity, "host_id %q: use letters, digits, -, _ and .", clipName(in.HostID))
	case in.TTLSeconds < 0 || time.Duration(in.TTLSeconds)*time.Second > maxJoinTokenTTL:
		return api.Errorf(http.StatusUnprocessableEntity, "ttl_seconds: from 1 to %d", int(maxJoinTokenTTL/time.Second))
	case in.TTLSeconds > 0:
		ttl = time.Duration(in.TTLSeconds) * time.Second
	}
	if in.HostID != "" {
		rec, ok, err := s.hostRecordOf(r.Context(), in.HostID)
		if err != nil {
			return err
		}
		if ok && rec.Revoked {
			return api.Errorf(http.StatusConflict, "host %s was revoked: enroll the machine under another id", in.HostID)
		}
	}
	out, err := s.MintJoinToken(r.Context(), in.HostID, ttl)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusCreated, out)
	return nil
}

// MintJoinToken makes a one-time join token valid for ttl, for hostID only
// when set: what POST /v1/hosts/join-tokens answers an admin, and how
// `flame dev` enrolls the hosts it runs.
func (s *Server) MintJoinToken(ctx context.Context, hostID string, ttl time.Duration) (api.JoinToken, error) {
	tok := pki.NewJoinToken(s.ident.ca.Fingerprint())
	exp := s.cfg.Now().UTC().Add(ttl)
	rec := joinTokenRecord{SealedSecret: s.aead.seal(sealJoinToken, tok.ID, string(tok.Secret)), HostID: hostID, Expires: exp}
	// The record outlives the token a little: an expired token is refused
	// as expired rather than unknown.
	if _, err := catalog.CreateJSON(ctx, s.ident.tokens, tok.ID, rec, ttl+time.Minute); err != nil {
		return api.JoinToken{}, err
	}
	return api.JoinToken{ID: tok.ID, Token: tok.String(), HostID: hostID, ExpiresAt: exp.Format(time.RFC3339)}, nil
}

func hostView(r hostRecord) api.Host {
	h := api.Host{ID: r.ID, Region: r.Region, APIAddr: r.APIAddr, Serial: r.Serial, Revoked: r.Revoked,
		EnrolledAt: r.Enrolled.Format(time.RFC3339), ExpiresAt: r.Expires.Format(time.RFC3339)}
	if r.Revoked {
		h.RevokedAt = r.RevokedAt.Format(time.RFC3339)
	}
	return h
}

// listHosts is GET /v1/hosts (admin only).
func (s *Server) listHosts(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can list hosts")
	}
	es, err := s.ident.hosts.List(r.Context(), "")
	if err != nil {
		return err
	}
	out := api.ListHostsResponse{Hosts: []api.Host{}}
	for _, e := range es {
		var h hostRecord
		if decodeJSON(e.Value, &h) == nil {
			out.Hosts = append(out.Hosts, hostView(h))
		}
	}
	httpapi.WriteJSON(w, http.StatusOK, out)
	return nil
}

// revokeHost is POST /v1/hosts/{host}/revoke (admin only): for good — the
// control plane stops calling the host at once, and its id cannot enroll
// again.
func (s *Server) revokeHost(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can revoke hosts")
	}
	id := r.PathValue("host")
	if !pki.ValidID(id) {
		return api.Errorf(http.StatusNotFound, "host %s not found", clipName(id))
	}
	_, _, err := catalog.UpdateJSON(r.Context(), s.ident.hosts, id, func(h *hostRecord, exists bool) error {
		if !exists {
			return api.Errorf(http.StatusNotFound, "host %s not found", id)
		}
		if !h.Revoked {
			h.Revoked, h.RevokedAt = true, s.cfg.Now().UTC()
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.dropHostConn(id)
	s.setNATSUser(hostRecord{ID: id, Revoked: true})
	s.kickRevocations()
	s.log.Warn("host revoked", "host", id)
	s.revokeInGossip(r.Context(), id)
	httpapi.WriteJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

// maxEnrollBody bounds an enrollment request.
const maxEnrollBody = 16 << 10

// enroll is POST /v1/hosts/enroll. It takes no API token: the join token's
// proof is the credential. Every refusal of the token reads the same.
func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxEnrollBody)
	out, err := s.enrollHost(r.Context(), r)
	if err != nil {
		var ae *api.Error
		if !errors.As(err, &ae) {
			s.log.Error("enroll host", "err", err)
			ae = api.Errorf(http.StatusServiceUnavailable, "enrollment failed, try again")
		}
		httpapi.WriteJSON(w, ae.Status, api.ErrorBody{Error: ae.Message})
		return
	}
	httpapi.WriteJSON(w, http.StatusOK, out)
}

var errJoinToken = api.Errorf(http.StatusUnauthorized, "invalid, used or expired join token")

func (s *Server) enrollHost(ctx context.Context, r *http.Request) (*api.EnrollHostResponse, error) {
	var in api.EnrollHostInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return nil, err
	}
	if err := validEnrollment(in); err != nil {
		return nil, err
	}
	pub, err := pki.CheckCSR(in.CSR)
	if err != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "csr: %v", err)
	}
	tok, _, err := catalog.GetJSON[joinTokenRecord](ctx, s.ident.tokens, in.TokenID)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, errJoinToken
	}
	if err != nil {
		return nil, err
	}
	secret, err := s.aead.open(sealJoinToken, in.TokenID, tok.SealedSecret)
	claim := pki.EnrollClaim{TokenID: in.TokenID, HostID: in.HostID, Region: in.Region, APIAddr: in.APIAddr, CSR: in.CSR}
	now := s.cfg.Now().UTC()
	if err != nil || !pki.CheckProof([]byte(secret), claim, in.Proof) || tok.Used || !now.Before(tok.Expires) {
		return nil, errJoinToken
	}
	if tok.HostID != "" && tok.HostID != in.HostID {
		return nil, api.Errorf(http.StatusForbidden, "this join token enrolls host %s only", tok.HostID)
	}
	if err := s.mayEnroll(ctx, in, tok); err != nil {
		return nil, err
	}
	// Used once: whoever marks it first enrolls.
	if _, _, err := catalog.UpdateJSON(ctx, s.ident.tokens, in.TokenID, func(t *joinTokenRecord, exists bool) error {
		if !exists || t.Used {
			return errJoinToken
		}
		t.Used = true
		return nil
	}); err != nil {
		return nil, err
	}
	cert, err := s.ident.ca.Issue(pki.RoleHost, in.HostID, pub, time.Now(), s.hostCertValidity())
	if err != nil {
		return nil, err
	}
	network, number, err := s.meshPlace(ctx, in.HostID)
	if err != nil {
		return nil, err
	}
	rec := hostRecord{ID: in.HostID, Region: in.Region, APIAddr: in.APIAddr, Serial: pki.Serial(cert), Enrolled: now, Expires: cert.NotAfter.UTC(), Number: uint16(number)}
	var natsSeed []byte
	if s.cfg.CatalogCA != nil {
		// A fresh credential on the catalog's NATS at every enrollment:
		// the previous one stops working.
		if natsSeed, rec.NATSKey, err = catalog.NewUserKey(); err != nil {
			return nil, err
		}
	}
	if _, _, err := catalog.UpdateJSON(ctx, s.ident.hosts, in.HostID, func(h *hostRecord, exists bool) error {
		if exists && h.Revoked {
			return api.Errorf(http.StatusForbidden, "host %s was revoked: enroll the machine under another id", in.HostID)
		}
		*h = rec
		return nil
	}); err != nil {
		return nil, err
	}
	s.dropHostConn(in.HostID)
	// Admitted by this plane's NATS at once, not only when the watch
	// brings the record: the host connects right after this answer.
	s.setNATSUser(rec)
	s.kickRevocations()
	s.log.Info("host enrolled", "host", in.HostID, "region", in.Region, "api", in.APIAddr)
	out := &api.EnrollHostResponse{Certificate: string(pki.CertPEM(cert.Raw)), CA: string(s.ident.ca.CertPEM()),
		Network: network.String(), HostNumber: int(number)}
	if out.Gossip, err = s.GossipTrust(ctx); err != nil {
		return nil, err
	}
	if natsSeed != nil {
		out.NATSCredential, out.NATSCA = string(natsSeed), string(s.cfg.CatalogCA)
	}
	return out, nil
}

// mayEnroll checks the host's id against the enrolled hosts: a revoked id
// never enrolls again; an enrolled id only with a token minted for it. (Two
// hosts may name one address, one after the other: a call checks the
// certificate names the host it is meant for.)
func (s *Server) mayEnroll(ctx context.Context, in api.EnrollHostInput, tok joinTokenRecord) error {
	h, ok, err := s.hostRecordOf(ctx, in.HostID)
	switch {
	case err != nil:
		return err
	case ok && h.Revoked:
		return api.Errorf(http.StatusForbidden, "host %s was revoked: enroll the machine under another id", in.HostID)
	case ok && tok.HostID == "":
		return api.Errorf(http.StatusConflict, "host %s is enrolled: a join token minted for it enrolls it again", in.HostID)
	}
	return nil
}

func validEnrollment(in api.EnrollHostInput) error {
	switch {
	case !pki.ValidJoinTokenID(in.TokenID):
		return errJoinToken
	case !pki.ValidID(in.HostID):
		return api.Errorf(http.StatusUnprocessableEntity, "host_id %q: use letters, digits, -, _ and .", clipName(in.HostID))
	case !cluster.ValidRegion(in.Region):
		return api.Errorf(http.StatusUnprocessableEntity, "region %q is not a region code", clipName(in.Region))
	case len(in.Proof) != 32:
		return errJoinToken
	}
	h, p, err := net.SplitHostPort(in.APIAddr)
	port, perr := strconv.Atoi(p)
	if err != nil || perr != nil || port < 1 || port > 65535 || h == "" || len(in.APIAddr) > 255 || !validAddrHost(h) {
		return api.Errorf(http.StatusUnprocessableEntity, "api_addr %q: want host:port", clipName(in.APIAddr))
	}
	return nil
}

// validAddrHost accepts an IP or a DNS name.
func validAddrHost(h string) bool {
	if ip := net.ParseIP(h); ip != nil {
		return !ip.IsUnspecified()
	}
	for _, c := range h {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}
