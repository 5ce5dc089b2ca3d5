// Package pure follows the pure packages' rules: time comes in as an
// argument, and names that only look like the forbidden ones are allowed.
package pure

import "time"

type Clock interface{ Now() time.Time }

func Deadline(now time.Time) time.Time { return now.Add(time.Second) }

func FromClock(c Clock) time.Time { return c.Now() }

func Shadowed() int {
	time := struct{ Now int }{Now: 1}
	return time.Now
}

func Parse(s string) (time.Duration, error) { return time.ParseDuration(s) }
