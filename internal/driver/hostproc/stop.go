package hostproc

import (
	"context"
	"errors"
	"os"
	"time"
)

// Step is one rung of stopping a process: deliver a signal, then give the
// process a while to end.
type Step struct {
	// Send delivers the step's signal. An error wrapping os.ErrProcessDone
	// means the process already ended; Stop then waits for done.
	Send func() error
	// Wait is how long the process gets to end before the next step. The
	// last step waits for as long as the context allows, whatever its Wait.
	Wait time.Duration
	// OnTimeout, when set, is called when Wait ran out and the next step
	// is about to be taken.
	OnTimeout func()
}

// Stop stops a process by escalation: it takes the steps in order — each
// sends its signal and waits up to its Wait for done to close — until done
// closes. Typically the first step asks (SIGTERM, the caller's timeout) and
// a later one forces (SIGKILL). A process whose done is already closed is
// sent nothing.
//
// Stop returns nil once done has closed, ctx's error when ctx ends first,
// and the error of a Send that failed other than with os.ErrProcessDone.
func Stop(ctx context.Context, done <-chan struct{}, steps ...Step) error {
	select {
	case <-done:
		return nil
	default:
	}
	for i, st := range steps {
		if err := st.Send(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return err
		}
		var timeout <-chan time.Time
		if i < len(steps)-1 {
			t := time.NewTimer(max(st.Wait, 0))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-timeout:
		}
		if st.OnTimeout != nil {
			st.OnTimeout()
		}
	}
	// No steps: wait for an end someone else brings about.
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
