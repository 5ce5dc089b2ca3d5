// Package machine is the lifecycle of one machine instance as a pure state
// machine: its states, the transitions allowed between them, and the restart
// policy that decides what happens when a workload exits. It does no I/O and
// reads no clock: time comes in as arguments.
package machine

import (
	"errors"
	"fmt"
	"slices"
)

// State is where an instance (one config version of a machine) is in its life.
// The strings are the API's state names.
type State string

// The states.
const (
	Creating     State = "creating"
	Created      State = "created"
	Starting     State = "starting"
	Started      State = "started"
	Stopping     State = "stopping"
	Stopped      State = "stopped"
	Restarting   State = "restarting"
	Suspending   State = "suspending"
	Suspended    State = "suspended"
	Updating     State = "updating"
	Replacing    State = "replacing"
	Replaced     State = "replaced"
	Destroying   State = "destroying"
	Destroyed    State = "destroyed"
	Failed       State = "failed"
	LaunchFailed State = "launch_failed"
)

// Kind classifies states.
type Kind int

// Kinds of state.
const (
	// Persistent states are where a machine rests between operations.
	Persistent Kind = iota + 1
	// Transient states are passed through while an operation runs; an agent
	// that finds a machine in one after a restart finishes the operation.
	Transient
	// Terminal states never change again.
	Terminal
)

func (k Kind) String() string {
	switch k {
	case Persistent:
		return "persistent"
	case Transient:
		return "transient"
	case Terminal:
		return "terminal"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

var kinds = map[State]Kind{
	Created: Persistent, Started: Persistent, Stopped: Persistent, Suspended: Persistent, Failed: Persistent,
	Creating: Transient, Starting: Transient, Stopping: Transient, Restarting: Transient, Suspending: Transient,
	Destroying: Transient, Updating: Transient, Replacing: Transient, LaunchFailed: Transient,
	Destroyed: Terminal, Replaced: Terminal,
}

// States lists every state, in a fixed order.
func States() []State {
	return []State{Creating, Created, Starting, Started, Stopping, Stopped, Restarting, Suspending,
		Suspended, Updating, Replacing, Replaced, Destroying, Destroyed, Failed, LaunchFailed}
}

// Kind returns the state's kind, or 0 for an unknown state.
func (s State) Kind() Kind { return kinds[s] }

// Valid reports whether s is a known state.
func (s State) Valid() bool { return kinds[s] != 0 }

// ParseState checks a state name from outside (an API query, a store).
func ParseState(name string) (State, error) {
	s := State(name)
	if !s.Valid() {
		return "", fmt.Errorf("unknown machine state %q", name)
	}
	return s, nil
}

// transitions lists, for each state, the states it may move to.
//
// An instance begins in Creating (a new machine) or Updating (the new version
// of an updated machine). The version it replaces goes through Replacing to
// Replaced. A workload exiting on its own moves Started to Stopped (done),
// Restarting (the restart policy will start it again) or Failed (the policy
// gave up).
var transitions = map[State][]State{
	Creating:     {Created, Starting, LaunchFailed, Destroying},
	Updating:     {Created, Starting, Stopped, LaunchFailed, Destroying},
	Created:      {Starting, Replacing, Destroying},
	Starting:     {Started, Failed, Destroying},
	Started:      {Stopping, Stopped, Restarting, Suspending, Failed, Replacing, Destroying},
	Stopping:     {Stopped, Destroying},
	Stopped:      {Starting, Replacing, Destroying},
	Restarting:   {Starting, Stopping, Stopped, Failed, Destroying},
	Suspending:   {Suspended, Stopped, Destroying},
	Suspended:    {Starting, Stopping, Replacing, Destroying},
	Failed:       {Starting, Replacing, Destroying},
	LaunchFailed: {Failed, Destroying},
	Replacing:    {Replaced},
	Destroying:   {Destroyed},
	Destroyed:    nil,
	Replaced:     nil,
}

// ErrIllegalTransition is matched (errors.Is) by every *TransitionError.
var ErrIllegalTransition = errors.New("illegal state transition")

// TransitionError names a move the state machine does not allow.
type TransitionError struct {
	From, To State
}

func (e *TransitionError) Error() string {
	switch {
	case !e.From.Valid():
		return fmt.Sprintf("illegal transition from unknown state %q to %s", e.From, e.To)
	case !e.To.Valid():
		return fmt.Sprintf("illegal transition from %s to unknown state %q", e.From, e.To)
	case e.From.Kind() == Terminal:
		return fmt.Sprintf("illegal transition from %s to %s: %s is terminal", e.From, e.To, e.From)
	}
	return fmt.Sprintf("illegal transition from %s to %s", e.From, e.To)
}

// Is makes errors.Is(err, ErrIllegalTransition) true.
func (e *TransitionError) Is(target error) bool { return target == ErrIllegalTransition }

// Transition checks the move from → to, returning a *TransitionError naming
// both states when it is not allowed. Staying in the same state is not a
// transition and is rejected too.
func Transition(from, to State) error {
	if slices.Contains(transitions[from], to) {
		return nil
	}
	return &TransitionError{From: from, To: to}
}

// Next lists the states from may move to.
func Next(from State) []State { return slices.Clone(transitions[from]) }
