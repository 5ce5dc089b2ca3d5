package server

import (
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/reconcile"
)

// The catalog's buckets and what each key holds. One key per aggregate, so
// every change is one compare-and-swap on one key.
const (
	bucketOrgs      = "orgs"      // <slug> → org
	bucketApps      = "apps"      // <name> → app
	bucketTokens    = "tokens"    // <sha256 of the token, hex> → token
	bucketMachines  = "machines"  // <app>.<id> → machineEntry: which host runs it
	bucketSecrets   = "secrets"   // <app> → appSecrets, sealed
	bucketGroups    = "groups"    // <app>.<group> → group: desired machines per region
	bucketLocks     = "locks"     // <name> → lock with a TTL: who reconciles
	bucketDestroyed = "destroyed" // <app>.<app id>.<id> → tombstone with a TTL: a destroyed machine
)

// org is an isolation boundary: its apps, tokens and private network.
type org struct {
	Slug      string    `json:"slug"`
	Name      string    `json:"name"`
	CreatedAt time.Time `json:"created_at"`
	// Net is the org's number in the private network (see orgnet.go);
	// 0 until its first machine.
	Net uint16 `json:"net,omitempty"`
}

// app is a named set of machines in an org. Names are unique across orgs,
// as at Fly (they are DNS names).
type app struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Org       string    `json:"org"`
	Network   string    `json:"network,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// token is what a bearer token may do; the catalog keeps only its hash.
type token struct {
	Name string `json:"name,omitempty"`
	// Admin tokens see and do everything, including creating orgs.
	Admin bool `json:"admin,omitempty"`
	// Org scopes the token to one org's apps; App narrows it to one app.
	Org      string    `json:"org,omitempty"`
	App      string    `json:"app,omitempty"`
	ReadOnly bool      `json:"read_only,omitempty"`
	Created  time.Time `json:"created_at"`
	// Expires, when set, is when the token stops working.
	Expires time.Time `json:"expires_at,omitzero"`
}

// machineEntry says where a machine runs. It is written before the host is
// asked to create the machine, so a crash between the two leaves an entry
// the reconciler can settle, never a machine nobody knows about.
type machineEntry struct {
	ID  string `json:"id"`
	App string `json:"app"`
	// AppID is the id of the app it belongs to: an app deleted and made
	// again under the same name (perhaps by another org) is another app.
	AppID   string    `json:"app_id"`
	Org     string    `json:"org"`
	Host    string    `json:"host"`
	Region  string    `json:"region"`
	Created time.Time `json:"created_at"`
	// Group and Standby are set for machines the reconciler keeps; For is
	// the region whose count the machine fills (it may run elsewhere when
	// that region had no room).
	Group   string `json:"group,omitempty"`
	Standby bool   `json:"standby,omitempty"`
	For     string `json:"for,omitempty"`
	// Lost is set when the machine's host died and the reconciler replaced
	// it; Doomed when it was destroyed while its host was down. Either way
	// the API no longer shows it, and the reconciler destroys it if the host
	// comes back.
	Lost   bool      `json:"lost,omitempty"`
	Doomed bool      `json:"doomed,omitempty"`
	Marked time.Time `json:"marked_at,omitzero"` // when it became lost or doomed
	// Guest is what the machine takes from its host, for fairness.
	CPUs     int `json:"cpus"`
	MemoryMB int `json:"memory_mb"`
}

// appSecrets are an app's secrets, each sealed with the server's key.
type appSecrets struct {
	AppID   string                  `json:"app_id"` // see machineEntry.AppID
	Version uint64                  `json:"version"`
	Values  map[string]sealedSecret `json:"values"`
}

type sealedSecret struct {
	Sealed    []byte    `json:"sealed"` // nonce ‖ AES-256-GCM ciphertext
	Digest    string    `json:"digest"` // of the plain text, to tell versions apart
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// group is an app's desired state for one process group: how many machines
// of Config each region runs, and how many stopped standbys each keeps ready.
type group struct {
	App      string             `json:"app"`
	AppID    string             `json:"app_id"` // see machineEntry.AppID
	Name     string             `json:"name"`
	Config   *api.MachineConfig `json:"config"`
	Regions  map[string]int     `json:"regions"`
	Standbys int                `json:"standbys,omitempty"`
	Spill    bool               `json:"spill,omitempty"`
	Updated  time.Time          `json:"updated_at"`
	// Backoff and Pending are the reconciler's, per region: the failures
	// it backs off from, and why declared machines are not placed.
	Backoff map[string]reconcile.Backoff `json:"backoff,omitempty"`
	Pending map[string]string            `json:"pending,omitempty"`
	// Started holds the reconciler's starts of machines not yet known to
	// be good (see reconcile.Run).
	Started map[string]reconcile.Run `json:"started,omitempty"`
}

// slot is the region whose count a machine fills.
func (me machineEntry) slot() string {
	if me.For != "" {
		return me.For
	}
	return me.Region
}

func machineKey(appName, id string) string { return appName + "." + id }
func groupKey(appName, name string) string { return appName + "." + name }
