// Package cluster gives every host the facts of every other host — its
// machines, their services and health, its load and free capacity — within
// a fraction of a second and without a central server.
package cluster
