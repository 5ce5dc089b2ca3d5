package api

import "time"

// App is an app as the apps endpoints show it (fly-go's flaps.App).
type App struct {
	ID           string  `json:"id"`
	Name         string  `json:"name"`
	Network      string  `json:"network,omitempty"`
	Status       string  `json:"status"`
	MachineCount int64   `json:"machine_count"`
	VolumeCount  int64   `json:"volume_count"`
	Organization AppOrg  `json:"organization"`
	CreatedAt    string  `json:"created_at,omitempty"`
	Groups       []Group `json:"groups,omitempty"`
}

// AppOrg is the org an app belongs to.
type AppOrg struct {
	Name string `json:"name"`
	Slug string `json:"slug"`
}

// CreateAppInput is the body of POST /v1/apps. Fly's documentation names the
// app app_name and fly-go sends name; both are accepted.
type CreateAppInput struct {
	AppName   string `json:"app_name,omitempty"`
	Name      string `json:"name,omitempty"`
	OrgSlug   string `json:"org_slug"`
	Network   string `json:"network,omitempty"`
	AppRoleID string `json:"app_role_id,omitempty"`
}

// ListAppsResponse is the answer of GET /v1/apps.
type ListAppsResponse struct {
	TotalApps int   `json:"total_apps"`
	Apps      []App `json:"apps"`
}

// Org is an org (a Flame extension: POST /v1/orgs with an admin token).
type Org struct {
	Slug      string `json:"slug"`
	Name      string `json:"name"`
	CreatedAt string `json:"created_at,omitempty"`
}

// CreateTokenInput is the body of POST /v1/tokens (a Flame extension): a
// token for one org, optionally only one app of it, optionally read-only,
// optionally expiring (at ExpiresAt, RFC 3339, or TTLSeconds from now; not
// both). A token minted by an expiring token expires no later than it.
// Admin (admin callers only, without an org) mints another admin token, to
// rotate the admin token.
type CreateTokenInput struct {
	Name       string `json:"name,omitempty"`
	Admin      bool   `json:"admin,omitempty"`
	OrgSlug    string `json:"org_slug"`
	App        string `json:"app,omitempty"`
	ReadOnly   bool   `json:"read_only,omitempty"`
	ExpiresAt  string `json:"expires_at,omitempty"`
	TTLSeconds int64  `json:"ttl_seconds,omitempty"`
}

// MaxTokenTTL bounds how far in the future a token may expire.
const MaxTokenTTL = 10 * 365 * 24 * time.Hour

// Token is a token as POST /v1/tokens answers it: the only time its secret
// is shown.
type Token struct {
	Token string `json:"token"`
	TokenInfo
}

// TokenInfo is a token as GET /v1/tokens lists it: never its secret. ID is
// the hex SHA-256 of the secret, the name DELETE /v1/tokens/{id} revokes it
// by. Admin tokens have no org.
type TokenInfo struct {
	ID        string `json:"id"`
	Name      string `json:"name,omitempty"`
	OrgSlug   string `json:"org_slug,omitempty"`
	App       string `json:"app,omitempty"`
	Admin     bool   `json:"admin,omitempty"`
	ReadOnly  bool   `json:"read_only,omitempty"`
	CreatedAt string `json:"created_at,omitempty"`
	ExpiresAt string `json:"expires_at,omitempty"`
}

// ListTokensResponse is the answer of GET /v1/tokens.
type ListTokensResponse struct {
	Tokens []TokenInfo `json:"tokens"`
}

// AppSecret is one secret as the secrets endpoints show it: never its value.
type AppSecret struct {
	Name      string `json:"name"`
	Digest    string `json:"digest,omitempty"`
	CreatedAt string `json:"created_at,omitempty"`
	UpdatedAt string `json:"updated_at,omitempty"`
}

// ListSecretsResponse is the answer of GET /v1/apps/{app}/secrets.
type ListSecretsResponse struct {
	Secrets []AppSecret `json:"secrets"`
}

// UpdateSecretsInput is the body of POST /v1/apps/{app}/secrets: a value
// sets a secret, null deletes it.
type UpdateSecretsInput struct {
	Values map[string]*string `json:"values"`
}

// UpdateSecretsResponse answers a bulk update.
type UpdateSecretsResponse struct {
	Secrets []AppSecret `json:"secrets"`
	Version uint64      `json:"version"`
}

// SetSecretInput is the body of POST /v1/apps/{app}/secrets/{name}.
type SetSecretInput struct {
	Value string `json:"value"`
}

// SetSecretResponse answers setting one secret.
type SetSecretResponse struct {
	AppSecret
	Version uint64 `json:"version"`
}

// DeleteSecretResponse answers deleting one secret.
type DeleteSecretResponse struct {
	Version uint64 `json:"version"`
}

// Region is one region in GET /v1/platform/regions. Capacity is how many
// machines of the smallest size (1 shared CPU, 256 MB) its live hosts have
// room for now.
type Region struct {
	Code             string  `json:"code"`
	Name             string  `json:"name"`
	Latitude         float32 `json:"latitude"`
	Longitude        float32 `json:"longitude"`
	GatewayAvailable bool    `json:"gateway_available"`
	RequiresPaidPlan bool    `json:"requires_paid_plan"`
	Deprecated       bool    `json:"deprecated"`
	Capacity         int64   `json:"capacity"`
	Hosts            int     `json:"hosts"`
	// Edge is where the region's edge proxy takes clients' requests
	// (host:port), when known (a Flame extension).
	Edge string `json:"edge,omitempty"`
}

// RegionsResponse is the answer of GET /v1/platform/regions (fly-go reads
// the capitalised keys).
type RegionsResponse struct {
	Regions []Region `json:"Regions"`
	Nearest string   `json:"Nearest,omitempty"`
	// Global is where the entry in front of every edge listens, handing
	// each request to the edge nearest to its client (a Flame extension).
	Global string `json:"Global,omitempty"`
}

// Group is an app's declared state for one process group (a Flame
// extension, what `fly scale count` sets): machines of Config per region,
// plus stopped standbys per region that start in milliseconds when a
// machine is lost. PUT /v1/apps/{app}/groups/{group}; GET lists or shows
// them with what runs now; DELETE stops keeping the count (machines stay).
type Group struct {
	Name     string         `json:"name"`
	Config   *MachineConfig `json:"config"`
	Regions  map[string]int `json:"regions"`
	Standbys int            `json:"standbys,omitempty"`
	// Spill lets machines that do not fit in their declared region run in
	// the nearest region with room; without it they wait, pending.
	Spill bool `json:"spill,omitempty"`
	// Running counts, per region, the group's started machines, and
	// Standby its ready standbys.
	Running map[string]int `json:"running,omitempty"`
	Ready   map[string]int `json:"standby,omitempty"`
	// Status is, per region, the group's machines by state and why any
	// are pending.
	Status map[string]GroupRegionStatus `json:"status,omitempty"`
	// LastError is the cause of the group's latest failure, while it
	// counts against the group.
	LastError string `json:"last_error,omitempty"`
}

// GroupRegionStatus is what one region of a group has now. Started,
// Stopped and Failed count the group's machines by state; Pending is how
// many declared machines are none of these (not placed yet, or being
// created or started), and PendingReason says why when they are not just
// in flight. Failures count the region's recent failures to start or create
// a machine: it tries again at RetryAt, and not before.
type GroupRegionStatus struct {
	Started       int       `json:"started"`
	Stopped       int       `json:"stopped"`
	Failed        int       `json:"failed"`
	Pending       int       `json:"pending"`
	Standby       int       `json:"standby"`
	PendingReason string    `json:"pending_reason,omitempty"`
	Failures      int       `json:"failures,omitempty"`
	LastError     string    `json:"last_error,omitempty"`
	RetryAt       time.Time `json:"retry_at,omitzero"`
}

// AppEvent is one machine event of an app, as the event bus carries it and
// GET /v1/apps/{app}/events streams it (one JSON object a line).
type AppEvent struct {
	App       string        `json:"app"`
	MachineID string        `json:"machine_id"`
	Region    string        `json:"region,omitempty"`
	Event     *MachineEvent `json:"event"`
}
