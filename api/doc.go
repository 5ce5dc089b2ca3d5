// Package api holds the wire types of Flame's Fly-compatible Machines API and a
// small Go client for it.
//
// The JSON names and quirks (durations as strings, autostop as a bool or a
// string, millisecond event timestamps) follow Fly's public API so that programs
// written for Fly work against Flame unchanged.
package api
