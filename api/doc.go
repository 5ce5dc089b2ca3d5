// Package api holds the wire types of Flame's Fly-compatible Machines API, the
// contract its implementations share (Backend: a host's agent, the control
// plane), and a Go client for it that is itself a Backend.
//
// The JSON names and quirks (durations as strings, autostop as a bool or a
// string, millisecond event timestamps) follow Fly's public API so that programs
// written for Fly work against Flame unchanged.
package api
