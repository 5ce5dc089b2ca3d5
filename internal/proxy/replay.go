package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/proxy/route"
)

// fly-replay: a machine's answer that asks the edge to send the request
// again, elsewhere. The edge never passes such an answer to the client.
const (
	hdrReplay    = "Fly-Replay"
	hdrReplaySrc = "Fly-Replay-Src"
	// replayJSONType is the content type of the body form of a replay.
	replayJSONType = "application/vnd.fly.replay+json"
	// MaxReplays is the most replays of one request; the answer after the
	// last that asks for one more is 508 (a loop A→B→A ends here).
	MaxReplays = 10
	// Limits on what a machine may ask for.
	maxReplayLen     = 4 << 10 // header value or JSON body
	maxReplayRegions = 16
	maxReplayState   = 1 << 10
	maxReplayName    = 64 // region, machine or instance id, app
)

// replay is a parsed fly-replay: where the request goes next.
type replay struct {
	Regions        []string // in order of preference
	Instance       string   // that machine (id or instance id), else an error
	PreferInstance string   // that machine if it can, else normal routing
	App            string   // another app
	State          string   // passed on in fly-replay-src
	Elsewhere      bool     // any machine but the one that answered
}

// parseReplay parses a fly-replay header value:
// `key=value` pairs separated by ';' (region is a comma list).
func parseReplay(v string) (replay, error) {
	var rp replay
	if len(v) > maxReplayLen {
		return rp, fmt.Errorf("fly-replay: %d bytes, more than %d", len(v), maxReplayLen)
	}
	seen := map[string]bool{}
	for part := range strings.SplitSeq(v, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		k, val, ok := strings.Cut(part, "=")
		if !ok {
			return rp, fmt.Errorf("fly-replay: %q is not key=value", clip(part))
		}
		k, val = strings.ToLower(strings.TrimSpace(k)), strings.TrimSpace(val)
		if seen[k] {
			return rp, fmt.Errorf("fly-replay: %q given twice", clip(k))
		}
		seen[k] = true
		if err := rp.set(k, val); err != nil {
			return rp, err
		}
	}
	return rp, rp.check()
}

// parseReplayJSON parses the body form of a fly-replay.
func parseReplayJSON(b []byte) (replay, error) {
	var rp replay
	if len(b) > maxReplayLen {
		return rp, fmt.Errorf("fly-replay body: more than %d bytes", maxReplayLen)
	}
	var raw struct {
		Region         *string `json:"region"`
		Instance       *string `json:"instance"`
		PreferInstance *string `json:"prefer_instance"`
		App            *string `json:"app"`
		State          *string `json:"state"`
		Elsewhere      *bool   `json:"elsewhere"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return rp, fmt.Errorf("fly-replay body: %w", err)
	}
	for _, f := range []struct {
		k string
		v *string
	}{{"region", raw.Region}, {"instance", raw.Instance}, {"prefer_instance", raw.PreferInstance}, {"app", raw.App}, {"state", raw.State}} {
		if f.v != nil {
			if err := rp.set(f.k, *f.v); err != nil {
				return rp, err
			}
		}
	}
	if raw.Elsewhere != nil {
		rp.Elsewhere = *raw.Elsewhere
	}
	return rp, rp.check()
}

func (rp *replay) set(k, v string) error {
	switch k {
	case "region":
		for r := range strings.SplitSeq(v, ",") {
			r = strings.ToLower(strings.TrimSpace(r))
			if !api.ValidWord(r, maxReplayName, "") {
				return fmt.Errorf("fly-replay: region %q is not a region code", clip(r))
			}
			if len(rp.Regions) == maxReplayRegions {
				return fmt.Errorf("fly-replay: more than %d regions", maxReplayRegions)
			}
			rp.Regions = append(rp.Regions, r)
		}
	case "instance", "prefer_instance":
		if !api.ValidWord(v, maxReplayName, "") {
			return fmt.Errorf("fly-replay: %s %q is not a machine or instance id", k, clip(v))
		}
		if k == "instance" {
			rp.Instance = v
		} else {
			rp.PreferInstance = v
		}
	case "app":
		if !validLabel(v) {
			return fmt.Errorf("fly-replay: app %q is not an app name", clip(v))
		}
		rp.App = v
	case "state":
		if len(v) > maxReplayState {
			return fmt.Errorf("fly-replay: state of %d bytes, more than %d", len(v), maxReplayState)
		}
		for i := 0; i < len(v); i++ {
			if c := v[i]; c < 0x20 || c > 0x7e || c == ';' {
				return fmt.Errorf("fly-replay: state holds %q (printable ASCII without ';' only)", rune(c))
			}
		}
		rp.State = v
	case "elsewhere":
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("fly-replay: elsewhere %q is not true or false", clip(v))
		}
		rp.Elsewhere = b
	default:
		return fmt.Errorf("fly-replay: unknown field %q", clip(k))
	}
	return nil
}

// check: a replay must say where to.
func (rp *replay) check() error {
	if len(rp.Regions) == 0 && rp.Instance == "" && rp.PreferInstance == "" && rp.App == "" && !rp.Elsewhere {
		return errors.New("fly-replay: names no target (region, instance, prefer_instance, app or elsewhere)")
	}
	if rp.Instance != "" && (len(rp.Regions) > 0 || rp.PreferInstance != "") {
		return errors.New("fly-replay: instance excludes region and prefer_instance")
	}
	return nil
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// replayOf reports whether a machine's response asks for a replay, and
// which. The response's body is closed when it does (or says so badly).
func replayOf(resp *http.Response) (rp replay, ok bool, err error) {
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return rp, false, nil
	}
	if v := resp.Header.Values(hdrReplay); len(v) > 0 {
		resp.Body.Close()
		rp, err = parseReplay(strings.Join(v, ";"))
		return rp, true, err
	}
	ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if ct != replayJSONType {
		return rp, false, nil
	}
	b, rerr := io.ReadAll(io.LimitReader(resp.Body, maxReplayLen+1))
	resp.Body.Close()
	if rerr != nil {
		return rp, true, fmt.Errorf("fly-replay body: %w", rerr)
	}
	rp, err = parseReplayJSON(b)
	return rp, true, err
}

// replaySrc is the fly-replay-src header of a replayed request: the
// machine that asked for it, its region, when (microseconds since the
// epoch), and its state.
func replaySrc(machineID, region string, now time.Time, state string) string {
	s := "instance=" + machineID + ";region=" + region + ";t=" + strconv.FormatInt(now.UnixMicro(), 10)
	if state != "" {
		s += ";state=" + state
	}
	return s
}

// String is the replay as a fly-replay header says it.
func (rp replay) String() string {
	var parts []string
	if len(rp.Regions) > 0 {
		parts = append(parts, "region="+strings.Join(rp.Regions, ","))
	}
	for _, f := range [][2]string{{"instance", rp.Instance}, {"prefer_instance", rp.PreferInstance}, {"app", rp.App}, {"state", rp.State}} {
		if f[1] != "" {
			parts = append(parts, f[0]+"="+f[1])
		}
	}
	if rp.Elsewhere {
		parts = append(parts, "elsewhere=true")
	}
	return strings.Join(parts, ";")
}

// replayTargets chooses the candidates of a replay, best first, into out:
// the machines of the regions named, in their order (each region's nearest
// and least loaded first); the instance named, alone; the preferred
// instance first, then the usual order. The client's routing headers no
// longer count: the machine decided. Elsewhere leaves out the machine that
// asked.
func (p *Proxy) replayTargets(st *state, appName string, port int, rp replay, from *route.Target, out []*route.Target) []*route.Target {
	q := route.Query{Port: port, ForceInstance: rp.Instance, PreferInstance: rp.PreferInstance}
	regions := rp.Regions
	if len(regions) == 0 {
		regions = []string{""}
	}
	var buf [route.MaxCandidates]*route.Target
	for _, region := range regions {
		q.ForceRegion = region
		q.Rand = p.seq.Add(0x9e3779b97f4a7c15)
		for _, tg := range st.table.Select(appName, q, routeInput{p}, buf[:0]) {
			if len(out) == cap(out) && cap(out) >= route.MaxCandidates {
				return out
			}
			if rp.Elsewhere && tg.MachineID == from.MachineID || slices.Contains(out, tg) {
				continue
			}
			out = append(out, tg)
		}
	}
	return out
}
