package server

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"sync"

	"github.com/flamehq/flame/api"
)

// liveBuffer bounds the live items queued for one slow follower; beyond it
// the follower is cut off (it can reconnect and read history again).
const liveBuffer = 1024

// streamApp answers an app-wide NDJSON stream: history (gathered from the
// hosts), then, with ?follow=true, what arrives on the event bus under
// subject until the client goes away. It subscribes before reading history
// so nothing falls between the two; key names an item so none is sent twice.
// An item from the bus counts only from the host that runs its machine
// (busorigin.go).
func streamApp[T any](s *Server, w http.ResponseWriter, r *http.Request, a app, subject string,
	history func(ctx context.Context) ([]T, error), valid func(T) bool, machine, key func(T) string) error {
	ctx := r.Context()
	follow := false
	if v := r.URL.Query().Get("follow"); v != "" {
		var err error
		if follow, err = strconv.ParseBool(v); err != nil {
			return api.Errorf(http.StatusBadRequest, "follow: want true or false")
		}
	}
	if follow {
		var done func()
		var err error
		if ctx, done, err = s.follows.Admit(w, r, followKey(ctx)); err != nil {
			return err
		}
		defer done()
	}
	live := make(chan T, liveBuffer)
	overflow := make(chan struct{})
	var once sync.Once
	if follow {
		origin := newBusOrigin(s, a)
		unsubscribe, err := s.cfg.Catalog.Subscribe(subject, func(subj string, data []byte) {
			var v T
			if json.Unmarshal(data, &v) != nil || !valid(v) || !origin.ok(subj, machine(v)) {
				return
			}
			select {
			case live <- v:
			default:
				once.Do(func() { close(overflow) })
			}
		})
		if err != nil {
			return err
		}
		defer unsubscribe()
	}
	past, err := history(ctx)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	seen := map[string]bool{}
	for _, v := range past {
		seen[key(v)] = true
		if enc.Encode(v) != nil {
			return nil
		}
	}
	rc.Flush()
	if !follow {
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-overflow:
			s.log.Debug("follower too slow; cut off", "subject", subject)
			return nil
		case v := <-live:
			if k := key(v); k != "" {
				if seen[k] {
					continue
				}
				seen[k] = true
			}
			if enc.Encode(v) != nil {
				return nil
			}
			rc.Flush()
		}
	}
}

// followKey is whose followed streams a request's are: its org's, or, for
// an admin token (which has none), the admins'.
func followKey(ctx context.Context) string {
	if p := caller(ctx); p.Org != "" {
		return "org:" + p.Org
	}
	return "admin"
}

// eachMachine calls fn for every machine of the app, at once, with a client
// for its host; machines whose hosts are down are skipped.
func (s *Server) eachMachine(ctx context.Context, a app, fn func(me machineEntry, c *api.Client)) error {
	es, err := s.entries(ctx, a)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	for _, me := range es {
		c, err := s.hostClient(me.Host)
		if err != nil {
			continue
		}
		wg.Go(func() { fn(me, c) })
	}
	wg.Wait()
	return nil
}
