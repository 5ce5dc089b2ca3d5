package server

import (
	"context"
	"net/http"
	"slices"
	"strconv"
	"sync"

	"github.com/flamehq/flame/api"
)

// appEvents is GET /v1/apps/{app}/events: the app's machine events, oldest
// first, as NDJSON (one api.AppEvent a line), gathered from the hosts; with
// ?follow=true it then streams new ones from the event bus until the client
// goes away.
func (s *Server) appEvents(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	return streamApp(s, w, r, a, api.AppEventsSubject(a.Name),
		func(ctx context.Context) ([]api.AppEvent, error) { return s.eventHistory(ctx, a) },
		func(ev api.AppEvent) bool { return ev.Event != nil && ev.App == a.Name },
		func(ev api.AppEvent) string { return ev.MachineID },
		func(ev api.AppEvent) string { return ev.Event.ID })
}

// eventHistory asks each machine's host for its events and merges them,
// oldest first.
func (s *Server) eventHistory(ctx context.Context, a app) ([]api.AppEvent, error) {
	var mu sync.Mutex
	var out []api.AppEvent
	err := s.eachMachine(ctx, a, func(me machineEntry, c *api.Client) {
		evs, err := c.Events(ctx, a.Name, me.ID)
		if err != nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		for _, ev := range evs {
			out = append(out, api.AppEvent{App: a.Name, MachineID: me.ID, Region: me.Region, Event: ev})
		}
	})
	slices.SortFunc(out, func(a, b api.AppEvent) int {
		if a.Event.Timestamp != b.Event.Timestamp {
			return int(a.Event.Timestamp - b.Event.Timestamp)
		}
		return cmpStrings(a.Event.ID, b.Event.ID)
	})
	return out, err
}

// appLogs is GET /v1/apps/{app}/logs: the last ?tail= lines (default 100)
// of each machine of the app, merged by time, as NDJSON (api.LogEntry, with
// the machine in "instance"); with ?follow=true it then streams new lines of
// every machine from the event bus — what `fly logs` shows.
func (s *Server) appLogs(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	tail := 100
	if v := r.URL.Query().Get("tail"); v != "" {
		if tail, err = strconv.Atoi(v); err != nil || tail < 0 {
			return api.Errorf(http.StatusBadRequest, "tail: want a number of lines")
		}
	}
	return streamApp(s, w, r, a, api.AppLogsSubject(a.Name),
		func(ctx context.Context) ([]api.LogEntry, error) {
			var mu sync.Mutex
			var out []api.LogEntry
			err := s.eachMachine(ctx, a, func(me machineEntry, c *api.Client) {
				if tail == 0 {
					return
				}
				lines, err := c.Logs(ctx, a.Name, me.ID, tail)
				if err != nil {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				out = append(out, lines...)
			})
			slices.SortStableFunc(out, func(a, b api.LogEntry) int { return a.Timestamp.Compare(b.Timestamp) })
			return out, err
		},
		func(l api.LogEntry) bool { return l.MachineID != "" },
		func(l api.LogEntry) string { return l.MachineID },
		func(api.LogEntry) string { return "" })
}
