// Package impure breaks every rule of the pure packages' code, so the
// checker's test can see each one reported.
package impure

import (
	"time"
	clock "time"
)

func Deadline() time.Time {
	return time.Now().Add(time.Second) // want time.Now
}

func Elapsed(start time.Time) time.Duration {
	return clock.Since(start) // want time.Since, through a renamed import
}

func Background(f func()) {
	go f() // want a go statement
}

var sleep = time.Sleep // want time.Sleep, taken as a value
