package api

import (
	"crypto/rand"
	"encoding/hex"
)

// MachineIDLen is the length of a machine id: 14 lowercase hex characters,
// as Fly's.
const MachineIDLen = 14

// NewMachineID returns a fresh machine id: 56 random bits as 14 lowercase
// hex characters. Whoever creates a machine (a host's agent, or the control
// plane before it asks a host) mints its id here.
func NewMachineID() string {
	var b [MachineIDLen / 2]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ValidMachineID reports whether id has the shape of a machine id.
func ValidMachineID(id string) bool {
	if len(id) != MachineIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
