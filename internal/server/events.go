package server

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"sync"

	"github.com/flamehq/flame/api"
)

// eventBuffer bounds the live events queued for one slow follower; beyond
// it the follower is cut off (it can reconnect and read history again).
const eventBuffer = 1024

// appEvents is GET /v1/apps/{app}/events: the app's machine events, oldest
// first, as NDJSON (one api.AppEvent a line), gathered from the hosts; with
// ?follow=true it then streams new ones from the event bus until the client
// goes away.
func (s *Server) appEvents(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	a, err := s.appFor(ctx, r.PathValue("app"), false)
	if err != nil {
		return err
	}
	follow := false
	if v := r.URL.Query().Get("follow"); v != "" {
		if follow, err = strconv.ParseBool(v); err != nil {
			return api.Errorf(http.StatusBadRequest, "follow: want true or false")
		}
	}
	// Subscribe before reading history, so nothing falls between the two.
	live := make(chan api.AppEvent, eventBuffer)
	overflow := make(chan struct{})
	var once sync.Once
	if follow {
		unsubscribe, err := s.cfg.Catalog.Subscribe("events."+a.Name+".>", func(_ string, data []byte) {
			var ev api.AppEvent
			if json.Unmarshal(data, &ev) != nil || ev.Event == nil || ev.App != a.Name {
				return
			}
			select {
			case live <- ev:
			default:
				once.Do(func() { close(overflow) })
			}
		})
		if err != nil {
			return err
		}
		defer unsubscribe()
	}
	history, err := s.eventHistory(ctx, a.Name)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	seen := map[string]bool{}
	for _, ev := range history {
		seen[ev.Event.ID] = true
		if err := enc.Encode(ev); err != nil {
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
			s.log.Debug("event follower too slow; cut off", "app", a.Name)
			return nil
		case ev := <-live:
			if seen[ev.Event.ID] {
				continue
			}
			if err := enc.Encode(ev); err != nil {
				return nil
			}
			rc.Flush()
		}
	}
}

// eventHistory asks each machine's host for its events and merges them,
// oldest first. Machines whose hosts are down contribute nothing.
func (s *Server) eventHistory(ctx context.Context, appName string) ([]api.AppEvent, error) {
	es, err := s.entries(ctx, appName)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	var out []api.AppEvent
	var wg sync.WaitGroup
	for _, me := range es {
		wg.Go(func() {
			c, err := s.hostClient(me.Host, "")
			if err != nil {
				return
			}
			evs, err := c.Events(ctx, appName, me.ID)
			if err != nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for _, ev := range evs {
				out = append(out, api.AppEvent{App: appName, MachineID: me.ID, Region: me.Region, Event: ev})
			}
		})
	}
	wg.Wait()
	slices.SortFunc(out, func(a, b api.AppEvent) int {
		if a.Event.Timestamp != b.Event.Timestamp {
			return int(a.Event.Timestamp - b.Event.Timestamp)
		}
		return cmpStrings(a.Event.ID, b.Event.ID)
	})
	return out, nil
}
