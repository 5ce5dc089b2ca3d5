package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Duration is a time.Duration that travels as a Go duration string ("10s").
// When decoding it also takes a number, read as nanoseconds, as Fly's own
// client does.
type Duration struct {
	time.Duration
}

// Dur returns a *Duration of d, for building configs.
func Dur(d time.Duration) *Duration { return &Duration{d} }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(d.String())
}

// UnmarshalJSON reads a duration string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var v any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return err
	}
	switch x := v.(type) {
	case nil:
		d.Duration = 0
	case json.Number:
		n, err := durationNumber(x)
		if err != nil {
			return err
		}
		d.Duration = n
	case string:
		p, err := time.ParseDuration(x)
		if err != nil {
			return fmt.Errorf("invalid duration %q", x)
		}
		d.Duration = p
	default:
		return fmt.Errorf("invalid duration %s: want a string like \"10s\"", b)
	}
	return nil
}

// durationNumber reads a JSON number of nanoseconds: exactly when it is an
// integer, truncated when it has a fraction, and an error when it does not fit.
func durationNumber(n json.Number) (time.Duration, error) {
	if i, err := strconv.ParseInt(n.String(), 10, 64); err == nil {
		return time.Duration(i), nil
	}
	f, err := n.Float64()
	if err != nil || f < math.MinInt64 || f >= math.MaxInt64 {
		return 0, fmt.Errorf("invalid duration %s: out of range", n)
	}
	return time.Duration(int64(f)), nil
}

// Autostop values.
const (
	AutostopOff     = "off"
	AutostopStop    = "stop"
	AutostopSuspend = "suspend"
)

// Autostop says whether the proxy stops idle machines: "off", "stop" or
// "suspend". It decodes from a bool (false = off, true = stop) or a string,
// and encodes off and stop as bools, as Fly does for older clients.
type Autostop string

// MarshalJSON writes off and stop as bools, suspend as a string.
func (a Autostop) MarshalJSON() ([]byte, error) {
	switch a {
	case AutostopStop:
		return []byte("true"), nil
	case AutostopSuspend:
		return []byte(`"suspend"`), nil
	default:
		return []byte("false"), nil
	}
}

// UnmarshalJSON reads a bool or one of "off", "stop", "suspend".
func (a *Autostop) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch x := v.(type) {
	case nil:
		*a = AutostopOff
	case bool:
		if x {
			*a = AutostopStop
		} else {
			*a = AutostopOff
		}
	case string:
		switch x {
		case AutostopOff, AutostopStop, AutostopSuspend:
			*a = Autostop(x)
		case "true":
			*a = AutostopStop
		case "false":
			*a = AutostopOff
		default:
			return fmt.Errorf("invalid autostop %q: want off, stop, suspend or a bool", x)
		}
	default:
		return fmt.Errorf("invalid autostop %s: want off, stop, suspend or a bool", b)
	}
	return nil
}
