package pki

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
)

// A join token is what an admin hands a new host, once:
//
//	flamejoin.<id>.<secret>.<ca fingerprint>
//
// The id names the token's record in the catalog; the secret never crosses
// the network — the host proves it holds it with an HMAC over its request;
// the fingerprint tells the host which CA to trust, so an answer from
// anyone else is refused.
type JoinToken struct {
	ID            string // 16 hex digits
	Secret        []byte // 32 bytes
	CAFingerprint string // hex SHA-256 of the CA's certificate
}

const joinPrefix = "flamejoin"

// NewJoinToken makes a token for the CA of fingerprint fp.
func NewJoinToken(fp string) JoinToken {
	var id [8]byte
	rand.Read(id[:])
	secret := make([]byte, 32)
	rand.Read(secret)
	return JoinToken{ID: hex.EncodeToString(id[:]), Secret: secret, CAFingerprint: fp}
}

// String is the token as the admin hands it over.
func (t JoinToken) String() string {
	return joinPrefix + "." + t.ID + "." + base64.RawURLEncoding.EncodeToString(t.Secret) + "." + t.CAFingerprint
}

// ErrBadJoinToken is a token that does not parse.
var ErrBadJoinToken = errors.New("pki: malformed join token")

// ParseJoinToken reads a token (surrounding space ignored, as read from a
// file).
func ParseJoinToken(s string) (JoinToken, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 4 || parts[0] != joinPrefix || !ValidJoinTokenID(parts[1]) || !isHex(parts[3], 64) {
		return JoinToken{}, ErrBadJoinToken
	}
	secret, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || len(secret) != 32 {
		return JoinToken{}, ErrBadJoinToken
	}
	return JoinToken{ID: parts[1], Secret: secret, CAFingerprint: parts[3]}, nil
}

// ValidJoinTokenID reports whether s can be a token's id.
func ValidJoinTokenID(s string) bool { return isHex(s, 16) }

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// EnrollClaim is what a host asks to be enrolled as.
type EnrollClaim struct {
	TokenID, HostID, Region, APIAddr string
	CSR                              []byte // DER
}

// Proof is the HMAC under the token's secret over everything the host
// claims: a request changed on the way (another address, another key) no
// longer matches.
func Proof(secret []byte, c EnrollClaim) []byte {
	m := hmac.New(sha256.New, secret)
	for _, s := range []string{"flame host enrollment v1", c.TokenID, c.HostID, c.Region, c.APIAddr} {
		m.Write([]byte(s))
		m.Write([]byte{0})
	}
	m.Write(c.CSR)
	return m.Sum(nil)
}

// CheckProof reports whether proof is Proof(secret, c), in constant time.
func CheckProof(secret []byte, c EnrollClaim, proof []byte) bool {
	return hmac.Equal(Proof(secret, c), proof)
}
