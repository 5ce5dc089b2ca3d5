package httpapi

import (
	"net/http"
	"time"

	"github.com/flamehq/flame/api"
)

// maxWait is the longest a wait may wait, as Fly's proxy allows; longer asks
// are clamped to it (Fly's client clamps the same way).
const maxWait = 60 * time.Second

func (s *Server) startMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	resp, err := s.backend.StartMachine(r.Context(), ref)
	return answer(w, resp, err)
}

// stopBody is a stop's body. Fly's client also sends the machine's id.
type stopBody struct {
	ID      string        `json:"id,omitempty"`
	Signal  signal        `json:"signal,omitempty"`
	Timeout *api.Duration `json:"timeout,omitempty"`
}

// stopMachine answers POST .../stop with an optional body. A zero timeout
// (Fly's client sends "0s" when it means none) is no timeout.
func (s *Server) stopMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	var b stopBody
	if err := DecodeBody(r, &b, false); err != nil {
		return err
	}
	if b.ID != "" && b.ID != ref.ID {
		return badRequest("body id %q does not match the machine %q in the path", clip(b.ID), ref.ID)
	}
	in := api.StopMachineInput{Signal: string(b.Signal), Timeout: b.Timeout}
	if in.Timeout != nil {
		switch {
		case in.Timeout.Duration < 0:
			return badRequest("invalid timeout %q: must not be negative", in.Timeout.String())
		case in.Timeout.Duration == 0:
			in.Timeout = nil
		case in.Timeout.Duration > api.MaxStopTimeout:
			return api.CheckStopTimeout("timeout", in.Timeout.Duration)
		}
	}
	if err := s.backend.StopMachine(r.Context(), ref, in); err != nil {
		return err
	}
	writeOK(w)
	return nil
}

// restartMachine answers POST .../restart?force_stop=&timeout=&signal=.
func (s *Server) restartMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	var o api.RestartOptions
	if o.ForceStop, err = parseBool(q, "force_stop"); err != nil {
		return err
	}
	if o.Timeout, err = parseTimeout(q, "timeout"); err != nil {
		return err
	}
	o.Signal = normalizeSignal(lastValue(q, "signal"))
	if err := s.backend.RestartMachine(r.Context(), ref, o); err != nil {
		return err
	}
	writeOK(w)
	return nil
}

// signalBody is a signal's body: {"signal": "SIGUSR1"} or {"signal": 10}.
type signalBody struct {
	Signal signal `json:"signal"`
}

func (s *Server) signalMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	var b signalBody
	if err := DecodeBody(r, &b, true); err != nil {
		return err
	}
	if b.Signal == "" {
		return badRequest("signal is required")
	}
	if err := s.backend.SignalMachine(r.Context(), ref, string(b.Signal)); err != nil {
		return err
	}
	writeOK(w)
	return nil
}

func (s *Server) suspendMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	if err := s.backend.SuspendMachine(r.Context(), ref); err != nil {
		return err
	}
	writeOK(w)
	return nil
}

// cordon answers POST .../cordon (on) and .../uncordon (off).
func (s *Server) cordon(on bool) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		ref, err := machineRef(r)
		if err != nil {
			return err
		}
		if err := s.backend.CordonMachine(r.Context(), ref, on); err != nil {
			return err
		}
		writeOK(w)
		return nil
	}
}

// waitMachine answers GET .../wait. Parameters, as Fly's client sends them:
// state (repeated or comma-separated: any of them will do; default
// started), timeout in seconds (default and at most 60), instance_id or
// its other name version, and from_event_id (accepted, not used).
func (s *Server) waitMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	states, err := parseStates(q, "state", waitStates)
	if err != nil {
		return err
	}
	if len(states) == 0 {
		states = []string{api.StateStarted}
	}
	timeout, err := parseTimeout(q, "timeout")
	if err != nil {
		return err
	}
	if timeout == 0 || timeout > maxWait {
		timeout = maxWait
	}
	instance := lastValue(q, "instance_id")
	if v := lastValue(q, "version"); v != "" {
		if instance != "" && instance != v {
			return badRequest("instance_id %q and version %q disagree", clip(instance), clip(v))
		}
		instance = v
	}
	o := api.WaitOptions{States: states, InstanceID: instance, Timeout: timeout}
	if _, err := s.backend.WaitMachine(r.Context(), ref, o); err != nil {
		return err
	}
	writeOK(w)
	return nil
}
