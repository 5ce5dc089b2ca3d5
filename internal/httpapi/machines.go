package httpapi

import (
	"errors"
	"net/http"
	"slices"
	"strings"

	"github.com/flamehq/flame/api"
)

// errNoResult is a backend answering neither a value nor an error.
var errNoResult = errors.New("backend returned no result")

// listMachines answers GET /v1/apps/{app}/machines. Filters: region,
// include_deleted, metadata.{key}=value (every pair must match) and state
// (repeated or comma-separated; destroyed implies include_deleted).
func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) error {
	app, err := appParam(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	f := api.ListMachinesOptions{Region: lastValue(q, "region")}
	if f.IncludeDeleted, err = parseBool(q, "include_deleted"); err != nil {
		return err
	}
	for name, vs := range q {
		key, ok := strings.CutPrefix(name, "metadata.")
		if !ok {
			continue
		}
		if !validMetadataKey(key) {
			return badRequest("invalid metadata filter %q: keys are letters, digits, '_', '-' and '.'", clip(name))
		}
		if f.Metadata == nil {
			f.Metadata = make(map[string]string)
		}
		f.Metadata[key] = vs[len(vs)-1]
	}
	states, err := parseStates(q, "state", machineStates)
	if err != nil {
		return err
	}
	if slices.Contains(states, api.StateDestroyed) {
		f.IncludeDeleted = true
	}

	ms, err := s.backend.ListMachines(r.Context(), app, f)
	if err != nil {
		return err
	}
	out := make([]*api.Machine, 0, len(ms))
	for _, m := range ms {
		if m != nil && (len(states) == 0 || slices.Contains(states, m.State)) {
			out = append(out, m)
		}
	}
	WriteJSON(w, http.StatusOK, out)
	return nil
}

// launchInput decodes a create or update body, which must carry a config.
func launchInput(r *http.Request) (api.LaunchMachineInput, error) {
	var in api.LaunchMachineInput
	if err := DecodeBody(r, &in, true); err != nil {
		return in, err
	}
	if in.Config == nil {
		return in, api.Errorf(http.StatusUnprocessableEntity, "config is required")
	}
	if in.LeaseTTL < 0 {
		return in, badRequest("invalid lease_ttl %d: want seconds, not negative", in.LeaseTTL)
	}
	if err := api.CheckLeaseTTL("lease_ttl", in.LeaseTTL); err != nil {
		return in, err
	}
	return in, nil
}

func (s *Server) createMachine(w http.ResponseWriter, r *http.Request) error {
	app, err := appParam(r)
	if err != nil {
		return err
	}
	in, err := launchInput(r)
	if err != nil {
		return err
	}
	m, err := s.backend.CreateMachine(r.Context(), app, in)
	return answer(w, m, err)
}

func (s *Server) getMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	m, err := s.backend.GetMachine(r.Context(), ref)
	return answer(w, m, err)
}

func (s *Server) updateMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	in, err := launchInput(r)
	if err != nil {
		return err
	}
	m, err := s.backend.UpdateMachine(r.Context(), ref, in)
	return answer(w, m, err)
}

// destroyMachine answers DELETE; ?force=true (or Fly's client's ?kill=true)
// destroys a running machine too.
func (s *Server) destroyMachine(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	force, err := parseBool(q, "force")
	if err != nil {
		return err
	}
	kill, err := parseBool(q, "kill")
	if err != nil {
		return err
	}
	if err := s.backend.DestroyMachine(r.Context(), ref, force || kill); err != nil {
		return err
	}
	writeOK(w)
	return nil
}

// answer writes v with 200, or returns err; a backend answering neither is
// a fault of the backend.
func answer[T any](w http.ResponseWriter, v *T, err error) error {
	if err != nil {
		return err
	}
	if v == nil {
		return errNoResult
	}
	WriteJSON(w, http.StatusOK, v)
	return nil
}

// list writes vs with 200, as [] when empty, or returns err.
func list[T any](w http.ResponseWriter, vs []T, err error) error {
	if err != nil {
		return err
	}
	if vs == nil {
		vs = []T{}
	}
	WriteJSON(w, http.StatusOK, vs)
	return nil
}
