package httpapi

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strconv"
	"strings"
)

// DecodeBody reads the request body strictly into v (a pointer to a struct):
// unknown fields, wrong types, malformed JSON and anything after the value
// are 400s that say what and where. An empty body is a 400 when required and
// leaves v alone otherwise.
func DecodeBody(r *http.Request, v any, required bool) error {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return badRequest("reading request body: %v", err)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		if required {
			return badRequest("request body is required")
		}
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return bodyError(b, err, reflect.TypeOf(v).Elem())
	}
	if end := skipSpace(b, dec.InputOffset()); end < int64(len(b)) {
		return badRequest("unexpected data after the JSON value at %s", position(b, end))
	}
	return nil
}

// bodyError turns a decoding error into a 400 naming the problem and where.
func bodyError(b []byte, err error, t reflect.Type) error {
	var syn *json.SyntaxError
	switch {
	case errors.As(err, &syn):
		return badRequest("malformed JSON at %s: %s", position(b, syn.Offset-1), syn.Error())
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return badRequest("malformed JSON at %s: unexpected end of input", position(b, int64(len(b))))
	}
	p, ok := locate(b, t)
	switch {
	case !ok:
		var typ *json.UnmarshalTypeError
		if errors.As(err, &typ) && typ.Field != "" {
			return badRequest("field %q: want %s, got %s", typ.Field, jsonKind(typ.Type), typ.Value)
		}
		return badRequest("invalid request body: %v", err)
	case p.unknown:
		return badRequest("unknown field %q at %s", p.path, position(b, p.offset))
	case p.path == "":
		return badRequest("invalid request body: %v", p.err)
	}
	return badRequest("field %q at %s: %v", p.path, position(b, p.offset), p.err)
}

// jsonKind names the JSON shape a Go type decodes from.
func jsonKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		return "object"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "integer"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	}
	return t.String()
}

// position renders a byte offset of b as "line L, column C" (both from 1).
func position(b []byte, off int64) string {
	off = min(max(off, 0), int64(len(b)))
	prefix := b[:off]
	line := bytes.Count(prefix, []byte{'\n'}) + 1
	col := len(prefix) - (bytes.LastIndexByte(prefix, '\n') + 1) + 1
	return fmt.Sprintf("line %d, column %d", line, col)
}

func skipSpace(b []byte, off int64) int64 {
	for off < int64(len(b)) && strings.IndexByte(" \t\r\n", b[off]) >= 0 {
		off++
	}
	return off
}

// problem is where in a body the first unknown field or rejected value sits.
type problem struct {
	path    string
	offset  int64
	unknown bool  // an unknown field; otherwise err says what is wrong
	err     error // from the value's own UnmarshalJSON
}

// errFound stops the walk in locate.
var errFound = errors.New("found")

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// locate walks syntactically valid JSON b alongside the Go type t it is
// decoded into and finds the first unknown field, value of the wrong type, or
// value its own UnmarshalJSON rejects, with its full path (array indexes and
// map keys included) and where it starts. encoding/json reports these without
// a path or with an incomplete one, so this runs after a decode has failed.
func locate(b []byte, t reflect.Type) (problem, bool) {
	w := &walker{b: b, dec: json.NewDecoder(bytes.NewReader(b))}
	w.dec.UseNumber()
	if err := w.value(t, ""); errors.Is(err, errFound) {
		return w.found, true
	}
	return problem{}, false
}

type walker struct {
	b     []byte
	dec   *json.Decoder
	found problem
}

// next is the offset where the next token starts.
func (w *walker) next() int64 {
	off := w.dec.InputOffset()
	for off < int64(len(w.b)) && strings.IndexByte(" \t\r\n,:", w.b[off]) >= 0 {
		off++
	}
	return off
}

func (w *walker) value(t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer && !t.Implements(unmarshalerType) {
		t = t.Elem()
	}
	start := w.next()
	if t.Implements(unmarshalerType) || reflect.PointerTo(t).Implements(unmarshalerType) {
		var raw json.RawMessage
		if err := w.dec.Decode(&raw); err != nil {
			return err
		}
		if string(raw) == "null" {
			return nil
		}
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if err := reflect.New(t).Interface().(json.Unmarshaler).UnmarshalJSON(raw); err != nil {
			return w.fail(path, start, err)
		}
		return nil
	}
	tok, err := w.dec.Token()
	if err != nil {
		return err
	}
	d, isDelim := tok.(json.Delim)
	switch {
	case !isDelim:
		if got, ok := scalarFits(t, tok); !ok {
			return w.fail(path, start, fmt.Errorf("want %s, got %s", jsonKind(t), got))
		}
		return nil
	case t.Kind() == reflect.Interface:
		return w.skip()
	case d == '{' && (t.Kind() == reflect.Struct || t.Kind() == reflect.Map):
		var fields map[string]reflect.Type
		if t.Kind() == reflect.Struct {
			fields = jsonFields(t)
		}
		for w.dec.More() {
			keyStart := w.next()
			tok, err := w.dec.Token()
			if err != nil {
				return err
			}
			key, _ := tok.(string)
			var ft reflect.Type
			if t.Kind() == reflect.Map {
				ft = t.Elem()
			} else if ft = fieldType(fields, key); ft == nil {
				w.found = problem{path: join(path, key), offset: keyStart, unknown: true}
				return errFound
			}
			if err := w.value(ft, join(path, key)); err != nil {
				return err
			}
		}
	case d == '[' && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array):
		for i := 0; w.dec.More(); i++ {
			if err := w.value(t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	default:
		got := "object"
		if d == '[' {
			got = "array"
		}
		return w.fail(path, start, fmt.Errorf("want %s, got %s", jsonKind(t), got))
	}
	_, err = w.dec.Token() // the closing delimiter
	return err
}

func (w *walker) fail(path string, off int64, err error) error {
	w.found = problem{path: path, offset: off, err: err}
	return errFound
}

var textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()

// scalarFits reports whether encoding/json would store the scalar token tok
// in a t, and names tok's JSON type when it would not.
func scalarFits(t reflect.Type, tok json.Token) (got string, ok bool) {
	if t.Kind() == reflect.Interface {
		return "", true
	}
	switch v := tok.(type) {
	case nil:
		return "null", true
	case bool:
		return "boolean", t.Kind() == reflect.Bool
	case string:
		return "string", t.Kind() == reflect.String ||
			t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8 ||
			reflect.PointerTo(t).Implements(textUnmarshalerType)
	case json.Number:
		got = "number " + clip(v.String())
		switch t.Kind() {
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			_, err := strconv.ParseInt(v.String(), 10, t.Bits())
			return got, err == nil
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
			_, err := strconv.ParseUint(v.String(), 10, t.Bits())
			return got, err == nil
		case reflect.Float32, reflect.Float64:
			_, err := strconv.ParseFloat(v.String(), t.Bits())
			return got, err == nil
		}
		return got, false
	}
	return "", true
}

// skip consumes the remainder of a value whose opening delimiter was read.
func (w *walker) skip() error {
	for depth := 1; depth > 0; {
		tok, err := w.dec.Token()
		if err != nil {
			return err
		}
		if d, ok := tok.(json.Delim); ok {
			if d == '{' || d == '[' {
				depth++
			} else {
				depth--
			}
		}
	}
	return nil
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// jsonFields maps the JSON names of t's fields (embedded structs flattened)
// to their types, as encoding/json sees them.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type)
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		if f.Anonymous && name == "" {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				for k, v := range jsonFields(ft) {
					if _, ok := out[k]; !ok {
						out[k] = v
					}
				}
				continue
			}
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

// fieldType finds key among fields the way encoding/json does: exactly, or
// else ignoring case; nil when there is none.
func fieldType(fields map[string]reflect.Type, key string) reflect.Type {
	if t, ok := fields[key]; ok {
		return t
	}
	for name, t := range fields {
		if strings.EqualFold(name, key) {
			return t
		}
	}
	return nil
}

// parseBool reads a boolean query parameter; present without a value is true.
func parseBool(q map[string][]string, name string) (bool, error) {
	vs, ok := q[name]
	if !ok {
		return false, nil
	}
	v := vs[len(vs)-1]
	if v == "" {
		return true, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, badRequest("invalid %s=%q: want true or false", name, clip(v))
	}
	return b, nil
}
