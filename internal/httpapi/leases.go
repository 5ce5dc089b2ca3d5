package httpapi

import (
	"net/http"

	"github.com/flamehq/flame/api"
)

func (s *Server) getLease(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	l, err := s.backend.MachineLease(r.Context(), ref)
	return answer(w, l, err)
}

// acquireLease answers POST .../lease. The body ({ttl, description}) is
// optional: Fly's client sends none and puts the ttl in the query instead.
// With the current nonce in the header it refreshes the lease.
func (s *Server) acquireLease(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	var in api.LeaseInput
	if err := DecodeBody(r, &in, false); err != nil {
		return err
	}
	if in.TTL < 0 {
		return badRequest("invalid ttl %d: want seconds, not negative", in.TTL)
	}
	if in.TTL == 0 {
		if in.TTL, err = parseUint(q, "ttl", 0); err != nil {
			return err
		}
	}
	if err := api.CheckLeaseTTL("ttl", in.TTL); err != nil {
		return err
	}
	l, err := s.backend.AcquireMachineLease(r.Context(), ref, in)
	return answer(w, l, err)
}

func (s *Server) releaseLease(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	if err := s.backend.ReleaseMachineLease(r.Context(), ref); err != nil {
		return err
	}
	writeOK(w)
	return nil
}
