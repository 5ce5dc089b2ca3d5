package devcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Load under failover: a client sending GETs for the demo app at a steady
// rate with bounded concurrency, recording every answer as the client saw
// it, and the figures read from what it recorded. The failover tests and
// `flame bench failover` measure with it.

// Sample is one request as its client saw it.
type Sample struct {
	Sent, Done time.Time
	Status     int
	// Err is why the request failed, Cause its kind (SampleCause).
	Err, Cause string
	// Machine and Region answered (the demo app's FLY_MACHINE_ID and
	// FLY_REGION).
	Machine, Region string
	// RequestID is the edge's Fly-Request-Id for the request: the edge
	// names it so in its record of failed attempts.
	RequestID string
}

// Failed reports whether the request got anything but the demo app's 200.
func (s Sample) Failed() bool { return s.Err != "" || s.Status != http.StatusOK }

// LoadConfig sizes a load.
type LoadConfig struct {
	URL    string // the edge or global entry, http://host:port
	Host   string // the Host header: the app's name at the edge (default demo.localhost)
	Header map[string]string
	// Rate is requests a second; Concurrency the requests in flight at most.
	Rate, Concurrency int
	// Work is each request's delay on its machine (the demo app's ?delay).
	Work   time.Duration
	Client *http.Client
}

// Load sends requests until halted.
type Load struct {
	mu      sync.Mutex
	samples []Sample
	stop    context.CancelFunc
	done    chan struct{}
}

// StartLoad starts sending; Halt stops it.
func StartLoad(cfg LoadConfig) *Load {
	cfg = cfg.withDefaults()
	cfg.Rate, cfg.Concurrency = max(1, cfg.Rate), max(1, cfg.Concurrency)
	ctx, cancel := context.WithCancel(context.Background())
	l := &Load{stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		var wg sync.WaitGroup
		defer wg.Wait()
		sem := make(chan struct{}, cfg.Concurrency)
		interval := time.Second / time.Duration(cfg.Rate)
		next := time.Now()
		for {
			next = next.Add(interval)
			if d := time.Until(next); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			}
			select {
			case <-ctx.Done():
				return
			case sem <- struct{}{}:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				s := cfg.Send()
				l.mu.Lock()
				l.samples = append(l.samples, s)
				l.mu.Unlock()
			}()
		}
	}()
	return l
}

// Halt stops sending and waits for the requests in flight.
func (l *Load) Halt() {
	l.stop()
	<-l.done
}

func (cfg LoadConfig) withDefaults() LoadConfig {
	if cfg.Host == "" {
		cfg.Host = "demo.localhost"
	}
	if cfg.Client == nil {
		cfg.Client = http.DefaultClient
	}
	return cfg
}

// Send sends one request of the load, now, and records its answer.
func (cfg LoadConfig) Send() Sample {
	cfg = cfg.withDefaults()
	url := cfg.URL + "/"
	if cfg.Work > 0 {
		url += "?delay=" + cfg.Work.String()
	}
	req, _ := http.NewRequest("GET", url, nil)
	req.Host = cfg.Host
	for k, v := range cfg.Header {
		req.Header.Set(k, v)
	}
	s := Sample{Sent: time.Now()}
	resp, err := cfg.Client.Do(req)
	if err != nil {
		s.Done, s.Err, s.Cause = time.Now(), err.Error(), errorCause(err)
		return s
	}
	defer resp.Body.Close()
	s.RequestID = resp.Header.Get("Fly-Request-Id")
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10)) // the demo's answer is well under
	s.Done, s.Status = time.Now(), resp.StatusCode
	if err != nil {
		s.Err, s.Cause = err.Error(), errorCause(err)
		return s
	}
	if resp.StatusCode != http.StatusOK {
		s.Err, s.Cause = fmt.Sprintf("%.200s", strings.TrimSpace(string(b))), "status "+strconv.Itoa(resp.StatusCode)
		return s
	}
	var id struct {
		Env map[string]string `json:"env"`
	}
	if err := json.Unmarshal(b, &id); err != nil {
		s.Err, s.Cause = fmt.Sprintf("not the demo app's answer: %.200s", b), "not the demo app"
		return s
	}
	s.Machine, s.Region = id.Env["FLY_MACHINE_ID"], id.Env["FLY_REGION"]
	return s
}

// errorCause names the kind of a failed request's error.
func errorCause(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// Samples returns what was recorded so far, in the order sent.
func (l *Load) Samples() []Sample {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := slices.Clone(l.samples)
	sort.Slice(out, func(i, j int) bool { return out[i].Sent.Before(out[j].Sent) })
	return out
}

// Percentiles are the p50 and p99 of ds (zero when ds is empty).
func Percentiles(ds []time.Duration) [2]time.Duration {
	if len(ds) == 0 {
		return [2]time.Duration{}
	}
	slices.Sort(ds)
	at := func(p float64) time.Duration { return ds[min(len(ds)-1, int(p*float64(len(ds))))] }
	return [2]time.Duration{at(0.50), at(0.99)}
}

// Phases are the latencies around a fault at F: p50/p99 of the requests
// sent (and answered) in the second before F, sent in the second after F
// (during), and sent from then on (after); N counts each.
type Phases struct {
	Before, During, After    [2]time.Duration
	NBefore, NDuring, NAfter int
}

// LatencyPhases reads the phases of the fault at f from ss, counting only
// the requests answered before end (a request in flight when a next fault
// begins is that fault's).
func LatencyPhases(ss []Sample, f, end time.Time) Phases {
	var before, during, after []time.Duration
	for _, s := range ss {
		if !s.Done.Before(end) {
			continue
		}
		switch d := s.Sent.Sub(f); {
		case d >= -time.Second && d < 0 && s.Done.Before(f):
			before = append(before, s.Done.Sub(s.Sent))
		case d >= 0 && d < time.Second:
			during = append(during, s.Done.Sub(s.Sent))
		case d >= time.Second:
			after = append(after, s.Done.Sub(s.Sent))
		}
	}
	return Phases{Before: Percentiles(before), During: Percentiles(during), After: Percentiles(after),
		NBefore: len(before), NDuring: len(during), NAfter: len(after)}
}

// ServedElsewhere reads, from the requests sent at or after the fault at f,
// how long after f every request was served elsewhere, as the client sees
// it: a request is "on the fault" when it failed or was answered by what
// the fault killed (dead). Last is when the last request on the fault was
// sent (zero and none false when there was none); Elsewhere when the first
// request after it was sent, from which on every request was answered by
// a live machine. ok is false when no request was sent after the last one
// on the fault: the run never saw it served elsewhere.
func ServedElsewhere(ss []Sample, f time.Time, dead func(Sample) bool) (last, elsewhere time.Duration, any, ok bool) {
	idx := -1
	for i, s := range ss {
		if !s.Sent.Before(f) && (s.Failed() || dead(s)) {
			idx, any, last = i, true, s.Sent.Sub(f)
		}
	}
	for _, s := range ss[idx+1:] {
		if !s.Sent.Before(f) {
			return last, s.Sent.Sub(f), any, true
		}
	}
	return last, 0, any, false
}
