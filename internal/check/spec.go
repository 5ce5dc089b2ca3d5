package check

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
)

// Check types.
const (
	TypeTCP  = "tcp"
	TypeHTTP = "http"
)

// Defaults for what a check's config leaves out. They are Fly's: interval
// 15 s, timeout 2 s, no grace period, GET /, plain http.
const (
	DefaultInterval = 15 * time.Second
	DefaultTimeout  = 2 * time.Second
	DefaultMethod   = http.MethodGet
	DefaultPath     = "/"
	// MinInterval is the shortest interval a config gets; shorter ones are
	// raised to it so a typo cannot make a check hammer its machine.
	MinInterval = time.Second
)

// Spec is one health check, with every default filled in.
type Spec struct {
	Name string
	Type string // TypeTCP or TypeHTTP
	// Service marks a services[].checks entry: it gates routing. Top-level
	// checks only report.
	Service bool
	Port    int

	Interval, Timeout, GracePeriod time.Duration

	// HTTP only.
	Method        string
	Path          string
	Protocol      string // "http" or "https"
	TLSSkipVerify bool
	TLSServerName string
	Headers       map[string][]string
}

// Validate reports a spec a Runner cannot run.
func (s Spec) Validate() error {
	if s.Name == "" {
		return errors.New("check has no name")
	}
	if err := s.fieldsErr(); err != nil {
		return fmt.Errorf("check %s: %w", s.Name, err)
	}
	return nil
}

// fieldsErr checks everything but the name.
func (s Spec) fieldsErr() error {
	switch {
	case s.Type != TypeTCP && s.Type != TypeHTTP:
		return fmt.Errorf("unknown type %q (want tcp or http)", s.Type)
	case s.Port < 1 || s.Port > 65535:
		return fmt.Errorf("port %d out of range", s.Port)
	case s.Interval <= 0:
		return errors.New("interval must be positive")
	case s.Timeout <= 0:
		return errors.New("timeout must be positive")
	case s.GracePeriod < 0:
		return errors.New("negative grace period")
	}
	if s.Type == TypeHTTP {
		switch {
		case s.Protocol != "http" && s.Protocol != "https":
			return fmt.Errorf("unknown protocol %q (want http or https)", s.Protocol)
		case !validMethod(s.Method):
			return fmt.Errorf("invalid method %q", s.Method)
		case !strings.HasPrefix(s.Path, "/"):
			return fmt.Errorf("path %q does not start with /", s.Path)
		}
	}
	return nil
}

// validMethod: an HTTP token (RFC 9110 5.6.2).
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for _, c := range m {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, c) {
			return false
		}
	}
	return true
}

// ServicePrefix begins the name of every check of services[].checks: only
// those gate routing (the edge proxy tells them by it); top-level checks
// only report, and the API refuses them a name with this prefix.
const ServicePrefix = api.ServiceCheckPrefix

// Specs lists the checks of a machine config: first its services' checks in
// order, named like Fly's "servicecheck-<nn>-<type>-<port>" (nn counting
// every service check of the machine from 00), whose port defaults to the
// service's internal_port; then the top-level checks in name order, named
// by their key, whose port is required. A check's type defaults to tcp, or
// http when it has a path.
func Specs(cfg *api.MachineConfig) ([]Spec, error) {
	if cfg == nil {
		return nil, nil
	}
	var specs []Spec
	names := map[string]bool{}
	n := 0
	for i, svc := range cfg.Services {
		for j, c := range svc.Checks {
			where := fmt.Sprintf("services[%d].checks[%d]", i, j)
			s, err := build(fields{
				Type: c.Type, Port: c.Port, Interval: c.Interval, Timeout: c.Timeout,
				GracePeriod: c.GracePeriod, Method: c.Method, Path: c.Path, Protocol: c.Protocol,
				TLSSkipVerify: c.TLSSkipVerify, TLSServerName: c.TLSServerName, Headers: c.Headers,
			}, svc.InternalPort)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			s.Service = true
			s.Name = fmt.Sprintf("%s%02d-%s-%d", ServicePrefix, n, s.Type, s.Port)
			n++
			names[s.Name] = true
			specs = append(specs, s)
		}
	}
	keys := make([]string, 0, len(cfg.Checks))
	for k := range cfg.Checks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		c := cfg.Checks[k]
		where := fmt.Sprintf("checks.%s", k)
		if k == "" {
			return nil, errors.New("checks: a check has an empty name")
		}
		if names[k] {
			return nil, fmt.Errorf("%s: name taken by a service check", where)
		}
		s, err := build(fields{
			Type: c.Type, Port: c.Port, Interval: c.Interval, Timeout: c.Timeout,
			GracePeriod: c.GracePeriod, Method: c.Method, Path: c.Path, Protocol: c.Protocol,
			TLSSkipVerify: c.TLSSkipVerify, TLSServerName: c.TLSServerName, Headers: c.Headers,
		}, 0)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		s.Name = k
		specs = append(specs, s)
	}
	return specs, nil
}

// fields are what api.MachineCheck and api.MachineServiceCheck share.
type fields struct {
	Type                           *string
	Port                           *int
	Interval, Timeout, GracePeriod *api.Duration
	Method, Path, Protocol         *string
	TLSSkipVerify                  *bool
	TLSServerName                  *string
	Headers                        []api.MachineHTTPHeader
}

// build fills in defaults and validates; defaultPort is 0 when there is none.
func build(f fields, defaultPort int) (Spec, error) {
	s := Spec{
		Type:     TypeTCP,
		Port:     defaultPort,
		Interval: DefaultInterval,
		Timeout:  DefaultTimeout,
		Method:   DefaultMethod,
		Path:     DefaultPath,
		Protocol: "http",
	}
	if f.Path != nil && *f.Path != "" {
		s.Type = TypeHTTP
		s.Path = *f.Path
	}
	if f.Type != nil && *f.Type != "" {
		s.Type = strings.ToLower(*f.Type)
	}
	if f.Port != nil && *f.Port != 0 {
		s.Port = *f.Port
	}
	if s.Port == 0 {
		return Spec{}, errors.New("no port")
	}
	if f.Interval != nil && f.Interval.Duration != 0 {
		if f.Interval.Duration < 0 {
			return Spec{}, fmt.Errorf("negative interval %s", f.Interval.Duration)
		}
		s.Interval = max(f.Interval.Duration, MinInterval)
	}
	if f.Timeout != nil && f.Timeout.Duration != 0 {
		if f.Timeout.Duration < 0 {
			return Spec{}, fmt.Errorf("negative timeout %s", f.Timeout.Duration)
		}
		s.Timeout = f.Timeout.Duration
	}
	if f.GracePeriod != nil {
		s.GracePeriod = f.GracePeriod.Duration
	}
	if f.Method != nil && *f.Method != "" {
		s.Method = strings.ToUpper(*f.Method)
	}
	if f.Protocol != nil && *f.Protocol != "" {
		s.Protocol = strings.ToLower(*f.Protocol)
	}
	if f.TLSSkipVerify != nil {
		s.TLSSkipVerify = *f.TLSSkipVerify
	}
	if f.TLSServerName != nil {
		s.TLSServerName = *f.TLSServerName
	}
	if len(f.Headers) > 0 {
		s.Headers = map[string][]string{}
		for _, h := range f.Headers {
			if h.Name == "" {
				return Spec{}, errors.New("header without a name")
			}
			s.Headers[h.Name] = append(s.Headers[h.Name], h.Values...)
		}
	}
	if err := s.fieldsErr(); err != nil {
		return Spec{}, err
	}
	return s, nil
}
