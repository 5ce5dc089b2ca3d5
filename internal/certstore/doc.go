// Package certstore keeps the edge's certificates in the catalog: which
// app each public hostname belongs to (claimed by compare-and-swap, one app
// platform-wide), and a certmagic.Storage over the catalog's buckets
// holding what ACME issues (certificates, keys, the ACME account,
// challenge tokens) with distributed locks, so every edge of the cluster
// serves the same certificates and only one of them asks the CA for each.
package certstore
