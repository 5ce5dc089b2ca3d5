package pki

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)

func now() time.Time { return t0 }

// handshake runs a TLS handshake between client and server configs over
// loopback and returns each side's error.
func handshake(t *testing.T, client, server *tls.Config) (cerr, serr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		s := tls.Server(conn, server)
		err = s.Handshake()
		if err == nil {
			// TLS 1.3: the client's certificate is checked after the
			// client's handshake returns; read to see the verdict.
			_, err = s.Read(make([]byte, 1))
		}
		done <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	c := tls.Client(conn, client)
	cerr = c.Handshake()
	if cerr == nil {
		_, cerr = c.Write([]byte{1})
		if cerr == nil {
			_, cerr = c.Read(make([]byte, 1)) // EOF once the server is done; an alert if it refused
		}
	}
	conn.Close()
	return cerr, <-done
}

type rig struct {
	ca      *CA
	slot    *Slot
	control *ControlCert
	serial  string
}

func newRig(t testing.TB, hostID string) rig {
	t.Helper()
	ca, err := NewCA("test", t0)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	key, err := HostKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := NewCSR(key, RoleHost, hostID)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := CheckCSR(csr)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue(RoleHost, hostID, pub, t0, HostValidity)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := CheckHostCert(ca.CertPEM(), CertPEM(cert.Raw), ca.Fingerprint(), hostID, key, t0); err != nil {
		t.Fatal(err)
	}
	if err := SaveHostIdentity(dir, ca.CertPEM(), CertPEM(cert.Raw)); err != nil {
		t.Fatal(err)
	}
	id, err := LoadHostIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	if id.HostID != hostID {
		t.Fatalf("loaded %q", id.HostID)
	}
	for _, f := range []string{keyFile, certFile, caFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, st.Mode(), err)
		}
	}
	return rig{ca: ca, slot: NewSlot(id), control: NewControlCert(ca, "plane", now), serial: Serial(cert)}
}

func TestMutualTLS(t *testing.T) {
	r := newRig(t, "ams-1")
	cerr, serr := handshake(t, ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", r.serial, now), r.slot.ServerTLS(now))
	if cerr != nil && !errors.Is(cerr, io.EOF) || serr != nil && !errors.Is(serr, io.EOF) {
		t.Fatalf("control → host: client %v, server %v", cerr, serr)
	}
}

func TestRefusals(t *testing.T) {
	r := newRig(t, "ams-1")
	other := newRig(t, "ams-1") // another CA
	hostAsClient := func() (*tls.Certificate, error) { c := r.slot.Get().Cert; return &c, nil }
	noCert := func() (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	for _, tc := range []struct {
		name           string
		client, server *tls.Config
	}{
		{"another host id expected", ClientTLS(r.ca.Pool(), r.control.Get, "ams-2", "", now), r.slot.ServerTLS(now)},
		{"a serial no longer the host's", ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", "abc", now), r.slot.ServerTLS(now)},
		{"a host of another CA", ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", "", now), other.slot.ServerTLS(now)},
		{"a control plane of another CA", ClientTLS(other.ca.Pool(), other.control.Get, "ams-1", "", now), r.slot.ServerTLS(now)},
		{"a host's certificate as a client", ClientTLS(r.ca.Pool(), hostAsClient, "ams-1", "", now), r.slot.ServerTLS(now)},
		{"no client certificate", ClientTLS(r.ca.Pool(), noCert, "ams-1", "", now), r.slot.ServerTLS(now)},
		{"a host not enrolled", ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", "", now), NewSlot(nil).ServerTLS(now)},
		{"an expired host certificate", ClientTLS(r.ca.Pool(), r.control.Get, "ams-1", "",
			func() time.Time { return t0.Add(HostValidity + time.Hour) }), r.slot.ServerTLS(now)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cerr, serr := handshake(t, tc.client, tc.server)
			if (cerr == nil || errors.Is(cerr, io.EOF)) && (serr == nil || errors.Is(serr, io.EOF)) {
				t.Fatal("the handshake succeeded")
			}
		})
	}
}

func TestJoinToken(t *testing.T) {
	tok := NewJoinToken(Fingerprint([]byte("ca")))
	got, err := ParseJoinToken(" " + tok.String() + "\n")
	if err != nil || got.ID != tok.ID || string(got.Secret) != string(tok.Secret) || got.CAFingerprint != tok.CAFingerprint {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for _, bad := range []string{"", "flamejoin", tok.String() + ".x", "flamejoin.zz.aa." + tok.CAFingerprint,
		"other." + tok.String()[len("flamejoin."):]} {
		if _, err := ParseJoinToken(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
	c := EnrollClaim{TokenID: tok.ID, HostID: "ams-1", Region: "ams", APIAddr: "10.0.0.1:4281", CSR: []byte("csr")}
	p := Proof(tok.Secret, c)
	if !CheckProof(tok.Secret, c, p) {
		t.Fatal("proof refused")
	}
	moved := c
	moved.APIAddr = "10.6.6.6:4281"
	if CheckProof(tok.Secret, moved, p) {
		t.Fatal("a proof for one address accepted for another")
	}
	if CheckProof(NewJoinToken("").Secret, c, p) {
		t.Fatal("a proof under another secret accepted")
	}
}

func TestCheckHostCertRefusesAnotherCA(t *testing.T) {
	r := newRig(t, "ams-1")
	rogue, _ := NewCA("rogue", t0)
	key, _ := NewKey()
	cert, _ := rogue.Issue(RoleHost, "ams-1", &key.PublicKey, t0, HostValidity)
	if _, _, err := CheckHostCert(rogue.CertPEM(), CertPEM(cert.Raw), r.ca.Fingerprint(), "ams-1", key, t0); !errors.Is(err, ErrIdentity) {
		t.Fatalf("a rogue CA's answer: %v", err)
	}
	mine, _ := r.ca.Issue(RoleHost, "ams-1", &key.PublicKey, t0, HostValidity)
	otherKey, _ := NewKey()
	if _, _, err := CheckHostCert(r.ca.CertPEM(), CertPEM(mine.Raw), r.ca.Fingerprint(), "ams-1", otherKey, t0); !errors.Is(err, ErrIdentity) {
		t.Fatalf("a certificate for another key: %v", err)
	}
	if _, _, err := CheckHostCert(r.ca.CertPEM(), CertPEM(mine.Raw), r.ca.Fingerprint(), "ams-2", key, t0); !errors.Is(err, ErrIdentity) {
		t.Fatalf("a certificate for another host: %v", err)
	}
}
