package httpapi

import (
	"net/http"
	"strings"

	"github.com/flamehq/flame/api"
)

func (s *Server) events(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	evs, err := s.backend.MachineEvents(r.Context(), ref)
	return list(w, evs, err)
}

func (s *Server) versions(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	vs, err := s.backend.MachineVersions(r.Context(), ref)
	return list(w, vs, err)
}

func (s *Server) processes(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	ps, err := s.backend.MachineProcesses(r.Context(), ref)
	return list(w, ps, err)
}

// exec answers POST .../exec. The backend always gets the argv in Command:
// when a client sends only cmd (a single string, as Fly's client does), it is
// split into words the way a POSIX shell would, without expanding anything.
func (s *Server) exec(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	var in api.ExecRequest
	if err := DecodeBody(r, &in, true); err != nil {
		return err
	}
	if len(in.Command) == 0 {
		if strings.TrimSpace(in.Cmd) == "" {
			return badRequest("command is required")
		}
		if in.Command, err = splitWords(in.Cmd); err != nil {
			return badRequest("invalid cmd: %v", err)
		}
	}
	if in.Timeout < 0 {
		return badRequest("invalid timeout %d: want seconds, not negative", in.Timeout)
	}
	resp, err := s.backend.ExecMachine(r.Context(), ref, in)
	return answer(w, resp, err)
}
