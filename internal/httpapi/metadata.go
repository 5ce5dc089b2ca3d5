package httpapi

import (
	"net/http"

	"github.com/flamehq/flame/api"
)

// metadataKey is the request's {key}, checked for shape.
func metadataKey(r *http.Request) (string, error) {
	key := r.PathValue("key")
	if !validMetadataKey(key) {
		return "", badRequest("invalid metadata key %q: want letters, digits, '_', '-' and '.'", clip(key))
	}
	return key, nil
}

func (s *Server) metadata(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	md, err := s.backend.MachineMetadata(r.Context(), ref)
	if err != nil {
		return err
	}
	if md == nil {
		md = map[string]string{}
	}
	WriteJSON(w, http.StatusOK, md)
	return nil
}

func (s *Server) getMetadataKey(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	key, err := metadataKey(r)
	if err != nil {
		return err
	}
	md, err := s.backend.MachineMetadata(r.Context(), ref)
	if err != nil {
		return err
	}
	v, ok := md[key]
	if !ok {
		return api.Errorf(http.StatusNotFound, "metadata key %q not found", key)
	}
	WriteJSON(w, http.StatusOK, api.MetadataInput{Value: v})
	return nil
}

// metadataBody is a metadata write's body; value must be present.
type metadataBody struct {
	Value *string `json:"value"`
}

func (s *Server) setMetadataKey(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	key, err := metadataKey(r)
	if err != nil {
		return err
	}
	var b metadataBody
	if err := DecodeBody(r, &b, true); err != nil {
		return err
	}
	if b.Value == nil {
		return badRequest("value is required")
	}
	if err := s.backend.SetMachineMetadata(r.Context(), ref, key, *b.Value); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) deleteMetadataKey(w http.ResponseWriter, r *http.Request) error {
	ref, err := machineRef(r)
	if err != nil {
		return err
	}
	key, err := metadataKey(r)
	if err != nil {
		return err
	}
	if err := s.backend.DeleteMachineMetadata(r.Context(), ref, key); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
