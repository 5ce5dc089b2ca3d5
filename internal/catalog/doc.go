// Package catalog is the control plane's strongly consistent store: the
// small facts that must never disagree (orgs, apps, tokens, volumes, IP
// allocations, secrets, releases, leases), kept in named buckets of keys,
// plus the event bus (machine events, logs, agent commands) that travels
// over the same connection.
//
// # Engine
//
// It stands on NATS JetStream key/value buckets. By default Open embeds one
// NATS server in the process, without a TCP listener, and talks to it over
// an in-process connection; its file store lives under Config.DataDir and
// syncs every write to disk before acknowledging it (sync_always), so keys
// and revisions survive a restart on the same directory. Three embedded
// servers joined by routes form one JetStream cluster, in which every
// bucket with Replicas 3 is a Raft group inside NATS: a write is
// acknowledged once two of the three servers hold it, and the store keeps
// working while any one of them is down. (A clustered server also listens
// for NATS clients, on loopback unless told otherwise: nats-server routes
// only once its client listener is up.) Alternatively Config.URL connects
// to an existing NATS cluster, which then owns durability settings. No
// consensus is implemented here.
//
// # Data model
//
// One key per aggregate (`apps.myapp`, `machines.0123456789abcd`,
// `tokens.<sha256hex>`), its value opaque bytes (JSON through GetJSON and
// UpdateJSON). Every write returns the key's new revision, the sequence
// number of the write in the bucket's stream, which only grows. Writers
// read a key, change it, and write it back with Update(rev): a write based
// on a stale revision fails with ErrConflict, so no change is lost.
// UpdateJSON wraps that loop. Create succeeds only on an absent (deleted,
// expired) key, which makes it a lock or lease acquisition.
//
// Reads go to the bucket stream's leader (buckets are created without
// JetStream's direct get, which lets any replica answer), so a Get on one
// server sees every write acknowledged on another.
//
// Keys are NATS subject tokens: letters, digits and `-/_=.`, no empty
// dot-separated token. List and Watch take a key prefix; a prefix that ends
// at a dot ("apps.") is served by a subject filter ("apps.>") in the
// server, any other prefix by the nearest such filter and a check here.
//
// # Expiry
//
// A bucket declared with BucketSpec.TTL lets Create give a key a time to
// live (whole seconds, at least one). When it passes the server removes the
// key and leaves a marker, which Watch reports as a deletion. A TTL belongs
// to the value written with it: Update and Put write a value without one,
// so the key stops expiring. A lease holder renews with Refresh, a
// compare-and-swap on the revision that writes the value with a new TTL.
//
// # Lock
//
// With Config.Secret an embedded server is locked: an Ed25519 CA and the
// control role's nkey are derived from the secret (HKDF), so every server
// and control client holding it agrees on both without any exchange. The
// client listener and the routes speak TLS with a fresh certificate of that
// CA (routes both ways: a server without the secret cannot join), and a
// client is admitted only by signing the server's nonce with the control
// role's nkey (everything allowed) or with one Config.Users names, with
// the Permissions it gives (Restricted: some subjects to publish on, some
// buckets to read or write, replies under its own inbox). Recheck closes
// the connections of users no longer named. A restricted user opens the
// catalog with Config.Bind: it binds the buckets, never creates them.
package catalog
