package agent

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// record is everything the agent knows about one machine. It is written to
// the store before the agent acts on a change, so an agent restarted at any
// point finds the operation it was in the middle of and finishes it.
type record struct {
	ID  string `json:"id"`
	App string `json:"app"`
	Org string `json:"org,omitempty"`
	// OrgNet is the org's number in the private network: its machines'
	// addresses are in its network (see orgnet.go).
	OrgNet    layout.Org         `json:"org_net,omitempty"`
	Name      string             `json:"name"`
	Region    string             `json:"region"`
	State     machine.State      `json:"state"`
	Instance  string             `json:"instance_id"`
	Config    *api.MachineConfig `json:"config"`
	Versions  []version          `json:"versions"` // newest first
	CreatedAt time.Time          `json:"created_at"`
	UpdatedAt time.Time          `json:"updated_at"`

	// Op is the operation in flight while State is transient.
	Op *op `json:"op,omitempty"`
	// ImageDigest is the digest the driver resolved the image to.
	ImageDigest string `json:"image_digest,omitempty"`
	// Handle identifies the running workload to the driver.
	Handle string `json:"handle,omitempty"`
	// OldHandle is the workload of the version an update is replacing.
	OldHandle string `json:"old_handle,omitempty"`
	// StartedAt is when the current run began.
	StartedAt time.Time `json:"started_at,omitzero"`
	// Restarts counts consecutive restarts by the restart policy.
	Restarts int `json:"restarts,omitempty"`
	// RestartAt is when a restart waiting out its backoff is due.
	RestartAt time.Time `json:"restart_at,omitzero"`

	SkipLaunch bool `json:"skip_launch,omitempty"`
	// Secrets are the app's secrets as the control plane gave them: the
	// workload's environment, never shown in a view.
	Secrets  map[string]string `json:"secrets,omitempty"`
	Cordoned bool              `json:"cordoned,omitempty"`
	Lease    *lease            `json:"lease,omitempty"`

	// Events are newest first, at most maxEvents. They are stored apart from
	// the record, one key each, so a step writes only its new event.
	Events []*api.MachineEvent `json:"-"`
}

// op is an operation that has been decided but may not have finished.
type op struct {
	Kind    string        `json:"kind"` // create, start, stop, restart, destroy, update, exit
	Signal  string        `json:"signal,omitempty"`
	Timeout time.Duration `json:"timeout,omitempty"`
	// Deadline is when a stop's grace (Timeout, from when it was decided)
	// runs out and the workload is killed; an agent resuming the stop keeps
	// it. Records written before it was kept have none: their grace
	// restarts whole.
	Deadline time.Time `json:"deadline,omitzero"`
	Force    bool      `json:"force,omitempty"`
	// Then is the state an update or a restart goes on to once the old
	// workload is gone (started, stopped or created).
	Then machine.State `json:"then,omitempty"`
}

type version struct {
	Instance  string             `json:"instance_id"`
	State     machine.State      `json:"state"`
	CreatedAt time.Time          `json:"created_at"`
	Config    *api.MachineConfig `json:"config"`
}

type lease struct {
	Nonce       string    `json:"nonce"`
	Owner       string    `json:"owner,omitempty"`
	Description string    `json:"description,omitempty"`
	ExpiresAt   time.Time `json:"expires_at"`
}

const maxEvents = 50

var (
	bucketMachines = []byte("machines")
	// bucketEvents holds one nested bucket per machine: sequence → event.
	bucketEvents = []byte("events")
)

// store keeps records in bbolt, one key per machine.
type store struct {
	db *bolt.DB
}

func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 500 * time.Millisecond})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: in use by another agent", path)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketMachines); err != nil {
			return err
		}
		_, err := tx.CreateBucketIfNotExists(bucketEvents)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", path, err)
	}
	return &store{db: db}, nil
}

// put writes r, and ev if not nil, durably (bbolt syncs on commit), in one
// transaction. Events beyond maxEvents are dropped from the store.
func (s *store) put(r *record, ev *api.MachineEvent) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode machine %s: %w", r.ID, err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketMachines).Put([]byte(r.ID), b); err != nil {
			return err
		}
		if ev == nil {
			return nil
		}
		eb, err := tx.Bucket(bucketEvents).CreateBucketIfNotExists([]byte(r.ID))
		if err != nil {
			return err
		}
		seq, _ := eb.NextSequence()
		v, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		if err := eb.Put(seqKey(seq), v); err != nil {
			return err
		}
		if seq > maxEvents {
			return eb.Delete(seqKey(seq - maxEvents))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store machine %s: %w", r.ID, err)
	}
	return nil
}

// delete removes the records of ids and their events in one transaction.
func (s *store) delete(ids []string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		machines, events := tx.Bucket(bucketMachines), tx.Bucket(bucketEvents)
		for _, id := range ids {
			if err := machines.Delete([]byte(id)); err != nil {
				return err
			}
			if err := events.DeleteBucket([]byte(id)); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete %d machines: %w", len(ids), err)
	}
	return nil
}

func seqKey(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }

// all loads every record with its events.
func (s *store) all() ([]*record, error) {
	var out []*record
	err := s.db.View(func(tx *bolt.Tx) error {
		events := tx.Bucket(bucketEvents)
		return tx.Bucket(bucketMachines).ForEach(func(k, v []byte) error {
			r := new(record)
			if err := json.Unmarshal(v, r); err != nil {
				return fmt.Errorf("decode machine %s: %w", k, err)
			}
			if eb := events.Bucket(k); eb != nil {
				c := eb.Cursor()
				for ek, ev := c.Last(); ek != nil; ek, ev = c.Prev() {
					e := new(api.MachineEvent)
					if err := json.Unmarshal(ev, e); err != nil {
						return fmt.Errorf("decode event of machine %s: %w", k, err)
					}
					r.Events = append(r.Events, e)
				}
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}

func (s *store) close() error { return s.db.Close() }

// clone returns a copy of r that a step may change and store before it is
// made visible. Parts that steps replace rather than change (the config, the
// events, the op, the lease) are shared.
func (r *record) clone() *record {
	c := *r
	c.Versions = slices.Clone(r.Versions)
	return &c
}
