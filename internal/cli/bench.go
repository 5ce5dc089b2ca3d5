package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
)

// Bounds of `flame bench failover`'s load.
const (
	maxBenchRate        = 2000
	maxBenchConcurrency = 1024
	minBenchDuration    = 500 * time.Millisecond
	maxBenchDuration    = 5 * time.Minute // with the rate, bounds the samples kept: 1.2 million
	maxBenchWork        = 10 * time.Second
	maxRestoreTimeout   = 10 * time.Minute
)

type benchFailoverFlags struct {
	chaos                   chaosFlags
	global, app, group      string
	fault, clientRegion     string
	rate, concurrency       int
	duration, work, restore time.Duration
	// standbys, when not -1, is declared for the group before the load.
	standbys int
}

func newBenchCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "bench",
		Short: "Measure a running flame dev",
		Args:  noArgs,
		RunE:  func(c *cobra.Command, _ []string) error { return c.Help() },
	}
	c.AddCommand(newBenchFailoverCmd())
	return c
}

func newBenchFailoverCmd() *cobra.Command {
	var f benchFailoverFlags
	c := &cobra.Command{
		Use:   "failover",
		Short: "Steady load through the global entry, a fault, and how the platform rides it",
		Long: `Send GETs for an app (the demo) through a running flame dev's global entry
at a steady rate, inject a fault through the chaos API halfway (by default:
kill the region that was serving this client, the nearest), and report
what the client saw:

  failed requests, by cause;
  served elsewhere: from the fault to the first request after which every
    request was answered by a live machine (the last request "on the
    fault" failed or was answered by what the fault killed);
  latency p50/p99 of the requests sent in the second before the fault,
    in the second after it (during), and from then on (after);
  the time until the control plane's reconciler had the group's declared
    counts running again in the remaining regions (if the app has one).

--standbys N declares N warm standbys per region for the group first (and
waits until they are ready), so the reconciler restores a lost machine by
starting one: with --fault "kill-host <host>" of a host running one of the
group's machines, the report gives the time until the declared counts were
restored from them.

--fault picks another fault: kill-region <region>, kill-host <host>,
kill-machine <machine-id> (of --app), or kill-control-plane (traffic is
then served from cluster state alone; the target is 0 failed requests).
The fault is left in place: undo it with flame chaos revive (or flame
chaos restart-control-plane). Progress goes to stderr.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runBenchFailover(c, f) },
	}
	fs := c.Flags()
	fs.StringVar(&f.chaos.api, "api", "", "the control plane's API (default: $FLY_FLAPS_BASE_URL, else "+defaultAPI+")")
	fs.StringVar(&f.chaos.tokenFile, "token-file", "", "file holding the admin token flame dev printed (default: $FLAME_ADMIN_TOKEN)")
	fs.BoolVar(&f.chaos.json, "json", false, "print the report as JSON")
	fs.StringVar(&f.global, "global", "http://"+defaultGlobalAddr, "flame dev's global entry")
	fs.StringVar(&f.app, "app", "demo", "the app to send requests to (<app>.localhost); it must be the demo app")
	fs.StringVar(&f.group, "group", "app", "the app's group whose declared counts are watched")
	fs.StringVar(&f.fault, "fault", "kill-region", `the fault: "kill-region [region]" (default: the region serving the client), "kill-host <host>", "kill-machine <machine-id>", "kill-control-plane"`)
	fs.StringVar(&f.clientRegion, "client-region", "", "where the client is, for the global entry (default: flame dev's --client-region)")
	fs.IntVar(&f.rate, "rate", 50, "requests a second, 1 to "+strconv.Itoa(maxBenchRate))
	fs.IntVar(&f.concurrency, "concurrency", 16, "requests in flight at most, 1 to "+strconv.Itoa(maxBenchConcurrency))
	fs.DurationVar(&f.duration, "duration", 5*time.Second, "load before the fault, and again after it ("+minBenchDuration.String()+" to "+maxBenchDuration.String()+")")
	fs.DurationVar(&f.work, "work", 5*time.Millisecond, "each request's work on its machine (the demo's ?delay), 0 to "+maxBenchWork.String())
	fs.DurationVar(&f.restore, "restore-timeout", 30*time.Second, "how long to wait for the declared counts after the load, up to "+maxRestoreTimeout.String())
	fs.IntVar(&f.standbys, "standbys", -1, "declare this many warm standbys per region for the group before the load (default: as declared)")
	return c
}

// benchFault is a parsed --fault.
type benchFault struct{ action, target string }

func parseBenchFault(s string) (benchFault, error) {
	s = strings.TrimSpace(s)
	action, target, _ := strings.Cut(strings.Replace(s, "=", " ", 1), " ")
	target = strings.TrimSpace(target)
	switch action {
	case "kill-region":
	case "kill-control-plane":
		if target != "" {
			return benchFault{}, fmt.Errorf("--fault %q: kill-control-plane takes no target", s)
		}
	case "kill-host", "kill-machine":
		if target == "" {
			return benchFault{}, fmt.Errorf("--fault %q: %s needs a target, as %q", s, action, action+" <id>")
		}
	default:
		return benchFault{}, fmt.Errorf("--fault %q: want kill-region [region], kill-host <host>, kill-machine <machine-id> or kill-control-plane", s)
	}
	if len(target) > 63 || strings.ContainsAny(target, " \t/") {
		return benchFault{}, fmt.Errorf("--fault %q: bad target", s)
	}
	return benchFault{action, target}, nil
}

func (f benchFailoverFlags) validate() (benchFault, error) {
	switch {
	case f.rate < 1 || f.rate > maxBenchRate:
		return benchFault{}, fmt.Errorf("--rate %d: want 1 to %d", f.rate, maxBenchRate)
	case f.concurrency < 1 || f.concurrency > maxBenchConcurrency:
		return benchFault{}, fmt.Errorf("--concurrency %d: want 1 to %d", f.concurrency, maxBenchConcurrency)
	case f.duration < minBenchDuration || f.duration > maxBenchDuration:
		return benchFault{}, fmt.Errorf("--duration %v: want %v to %v", f.duration, minBenchDuration, maxBenchDuration)
	case f.work < 0 || f.work > maxBenchWork:
		return benchFault{}, fmt.Errorf("--work %v: want 0 to %v", f.work, maxBenchWork)
	case f.restore < 0 || f.restore > maxRestoreTimeout:
		return benchFault{}, fmt.Errorf("--restore-timeout %v: want 0 to %v", f.restore, maxRestoreTimeout)
	case f.standbys < -1:
		return benchFault{}, fmt.Errorf("--standbys %d: want 0 or more", f.standbys)
	case !strings.HasPrefix(f.global, "http://"):
		return benchFault{}, fmt.Errorf("--global %q: want http://host:port", f.global)
	case !validLabel(f.app):
		return benchFault{}, fmt.Errorf("--app %q: want an app name", f.app)
	case f.clientRegion != "" && !validLabel(f.clientRegion):
		return benchFault{}, fmt.Errorf("--client-region %q: want a region code", f.clientRegion)
	}
	return parseBenchFault(f.fault)
}

// validLabel: lowercase letters, digits and dashes, 1 to 63 of them.
func validLabel(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// failoverReport is what `flame bench failover` prints (--json: as is).
type failoverReport struct {
	Fault       string  `json:"fault"`
	Rate        int     `json:"rate"`
	Concurrency int     `json:"concurrency"`
	DurationS   float64 `json:"duration_s"` // of the load, before and again after the fault
	Requests    int     `json:"requests"`
	Failed      int     `json:"failed"`
	// FailedByCause counts the failed requests by kind.
	FailedByCause map[string]int `json:"failed_by_cause"`
	// LastOnFaultMS is when the last request that failed or was answered
	// by what the fault killed was sent, after the fault (null: none was).
	LastOnFaultMS *float64 `json:"last_on_fault_ms"`
	// ServedElsewhereMS is when the first request was sent from which on
	// every request was answered by a live machine (null: never, in the run).
	ServedElsewhereMS *float64       `json:"served_elsewhere_ms"`
	Before            latencyFigure  `json:"before"`
	During            latencyFigure  `json:"during"`
	After             latencyFigure  `json:"after"`
	Declared          declaredFigure `json:"declared_counts"`
}

type latencyFigure struct {
	Requests int     `json:"requests"`
	P50MS    float64 `json:"p50_ms"`
	P99MS    float64 `json:"p99_ms"`
}

type declaredFigure struct {
	// Group is app/group; empty when the app declares no counts.
	Group   string         `json:"group,omitempty"`
	Regions map[string]int `json:"regions,omitempty"` // declared, per region
	// Standbys are the warm standbys declared per region.
	Standbys int `json:"standbys"`
	// Remaining are the regions the counts are watched in: all but a killed one.
	Remaining []string `json:"remaining,omitempty"`
	// FellShort is whether the control plane saw fewer running than
	// declared in a remaining region after the fault; RestoredMS when it
	// saw them all running again (null: not within the wait).
	FellShort  bool     `json:"fell_short"`
	RestoredMS *float64 `json:"restored_ms"`
	Note       string   `json:"note"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func runBenchFailover(c *cobra.Command, f benchFailoverFlags) error {
	fault, err := f.validate()
	if err != nil {
		return usageError{err}
	}
	chaos, err := f.chaos.client()
	if err != nil {
		return err
	}
	ctx := c.Context()
	progress := func(format string, args ...any) {
		fmt.Fprintf(c.ErrOrStderr(), "flame bench failover: "+format+"\n", args...)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: f.concurrency * 2}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	load := devcluster.LoadConfig{URL: strings.TrimRight(f.global, "/"), Host: f.app + ".localhost",
		Rate: f.rate, Concurrency: f.concurrency, Work: f.work, Client: client}
	if f.clientRegion != "" {
		load.Header = map[string]string{devcluster.ClientRegionHeader: f.clientRegion}
	}

	// Who serves this client now: the nearest region with the app.
	var serving string
	for end := time.Now().Add(10 * time.Second); ; {
		s := load.Send()
		if !s.Failed() {
			serving = s.Region
			break
		}
		if time.Now().After(end) {
			return fmt.Errorf("the global entry %s does not serve %s: %.200s", f.global, f.app, s.Err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	req := devcluster.ChaosRequest{}
	dead := func(devcluster.Sample) bool { return false }
	killedRegion := ""
	switch fault.action {
	case "kill-region":
		if fault.target == "" {
			fault.target = serving
		}
		req.Region, killedRegion = fault.target, fault.target
		dead = func(s devcluster.Sample) bool { return s.Region == killedRegion }
	case "kill-host":
		req.Host = fault.target
	case "kill-machine":
		req.App, req.Machine = f.app, fault.target
		dead = func(s devcluster.Sample) bool { return s.Machine == fault.target }
	}
	name := strings.TrimSpace(fault.action + " " + fault.target)

	// The declared counts, if the app has the group.
	plane := api.NewClient(chaos.URL, chaos.Token)
	decl := declaredFigure{Note: "no declared counts"}
	group, err := plane.GetGroup(ctx, f.app, f.group)
	switch {
	case errors.Is(err, api.ErrNotFound):
		group = nil
	case err != nil:
		return fmt.Errorf("read group %s/%s: %w", f.app, f.group, err)
	}
	if group != nil && len(group.Regions) == 0 {
		group = nil
	}
	if f.standbys >= 0 {
		if group == nil {
			return fmt.Errorf("--standbys %d: app %s declares no group %q", f.standbys, f.app, f.group)
		}
		if group, err = declareStandbys(ctx, plane, f.app, group, f.standbys, f.restore, progress); err != nil {
			return err
		}
	}
	if fault.action == "kill-control-plane" {
		// Its reconciler is what would restore the counts: nothing to
		// watch while it is down.
		group, decl.Note = nil, "the control plane is down: no reconciler to watch"
	}
	if group != nil {
		decl.Group, decl.Regions, decl.Standbys = f.app+"/"+f.group, group.Regions, group.Standbys
		for _, r := range slices.Sorted(maps.Keys(group.Regions)) {
			if r != killedRegion && group.Regions[r] > 0 {
				decl.Remaining = append(decl.Remaining, r)
			}
		}
	}

	progress("%s served by %s; %d requests a second, %d in flight at most, %v before %s and %v after",
		f.app, serving, f.rate, f.concurrency, f.duration, name, f.duration)
	lg := devcluster.StartLoad(load)
	halted := false
	defer func() {
		if !halted {
			lg.Halt()
		}
	}()
	start := time.Now()
	tick := func(until time.Time) {
		for time.Now().Before(until) {
			select {
			case <-ctx.Done():
				return
			case <-time.After(min(time.Second, time.Until(until))):
			}
			ss := lg.Samples()
			failed, by := 0, map[string]int{}
			for _, s := range ss {
				if s.Failed() {
					failed++
				} else if s.Sent.After(time.Now().Add(-time.Second)) {
					by[s.Region]++
				}
			}
			var served []string
			for _, r := range slices.Sorted(maps.Keys(by)) {
				served = append(served, fmt.Sprintf("%s %d", r, by[r]))
			}
			progress("+%4.1fs  %d sent, %d failed; the last second served by %s", time.Since(start).Seconds(), len(ss), failed, strings.Join(served, ", "))
		}
	}
	tick(start.Add(f.duration))
	if err := ctx.Err(); err != nil {
		return err
	}
	at := time.Now()
	if _, err := chaos.Do(ctx, fault.action, req); err != nil {
		return fmt.Errorf("chaos %s: %w", name, err)
	}
	progress("+%4.1fs  %s (took %v)", time.Since(start).Seconds(), name, time.Since(at).Round(time.Millisecond))

	// The reconciler, watched from the fault on.
	loadOver := make(chan struct{})
	var watch sync.WaitGroup
	if group != nil {
		watch.Add(1)
		go func() {
			defer watch.Done()
			watchDeclared(ctx, plane, f.app, f.group, at, loadOver, f.restore, &decl, progress)
		}()
	}
	tick(at.Add(f.duration))
	lg.Halt()
	halted = true
	end := time.Now()
	close(loadOver)
	progress("+%4.1fs  load over", time.Since(start).Seconds())
	watch.Wait()

	ss := lg.Samples()
	r := failoverReport{Fault: name, Rate: f.rate, Concurrency: f.concurrency, DurationS: f.duration.Seconds(),
		Requests: len(ss), FailedByCause: map[string]int{}, Declared: decl}
	for _, s := range ss {
		if s.Failed() {
			r.Failed++
			r.FailedByCause[s.Cause]++
		}
	}
	last, elsewhere, any, ok := devcluster.ServedElsewhere(ss, at, dead)
	if any {
		v := ms(last)
		r.LastOnFaultMS = &v
	}
	if ok {
		v := ms(elsewhere)
		r.ServedElsewhereMS = &v
	}
	ph := devcluster.LatencyPhases(ss, at, end)
	fig := func(p [2]time.Duration, n int) latencyFigure {
		return latencyFigure{Requests: n, P50MS: ms(p[0]), P99MS: ms(p[1])}
	}
	r.Before, r.During, r.After = fig(ph.Before, ph.NBefore), fig(ph.During, ph.NDuring), fig(ph.After, ph.NAfter)
	return printFailoverReport(c.OutOrStdout(), r, f.chaos.json)
}

// declareStandbys declares n standbys per region for the group (unless it
// has them) and waits, up to wait, until each of its regions runs its
// declared count with n standbys ready.
func declareStandbys(ctx context.Context, plane *api.Client, app string, g *api.Group, n int, wait time.Duration, progress func(string, ...any)) (*api.Group, error) {
	if g.Standbys != n {
		in := api.Group{Name: g.Name, Config: g.Config, Regions: g.Regions, Standbys: n, Spill: g.Spill}
		if _, err := plane.PutGroup(ctx, app, in); err != nil {
			return nil, fmt.Errorf("declare %d standbys for %s/%s: %w", n, app, g.Name, err)
		}
	}
	progress("waiting for %s/%s's machines and %d standbys per region (up to %v)", app, g.Name, n, wait)
	deadline := time.Now().Add(wait)
	for {
		got, err := plane.GetGroup(ctx, app, g.Name)
		if err != nil {
			return nil, fmt.Errorf("read group %s/%s: %w", app, g.Name, err)
		}
		ready := true
		for r, want := range got.Regions {
			if want > 0 && (got.Running[r] < want || got.Ready[r] < n) {
				ready = false
			}
		}
		if ready {
			return got, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("group %s/%s: its machines and %d standbys per region not ready within %v (running %v, ready %v)", app, g.Name, n, wait, got.Running, got.Ready)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// watchPoll is how often the group is read while its counts are watched:
// a host's death is counted out and its machine replaced from a standby
// within a few hundred ms, and a slower poll would miss the gap.
const watchPoll = 20 * time.Millisecond

// watchDeclared polls the group from the fault at on until the control
// plane sees the declared counts running in every remaining region after
// having seen one short; or, if none fell short, until the load is over;
// or the wait after the load runs out. It fills d.
func watchDeclared(ctx context.Context, plane *api.Client, app, name string, at time.Time, loadOver <-chan struct{}, wait time.Duration, d *declaredFigure, progress func(string, ...any)) {
	var deadline <-chan time.Time
	over := loadOver
	for {
		g, err := plane.GetGroup(ctx, app, name)
		if err == nil {
			short := false
			for _, r := range d.Remaining {
				if g.Running[r] < d.Regions[r] {
					short = true
				}
			}
			switch {
			case short:
				d.FellShort = true
			case d.FellShort:
				v := ms(time.Since(at))
				d.RestoredMS = &v
				d.Note = "restored in the remaining regions"
				return
			}
		}
		select {
		case <-ctx.Done():
			d.Note = "interrupted"
			return
		case <-over:
			if !d.FellShort {
				d.Note = "the remaining regions never fell short of their declared counts"
				return
			}
			progress("waiting for the declared counts in %s (up to %v)", strings.Join(d.Remaining, ", "), wait)
			over, deadline = nil, time.After(wait)
		case <-deadline:
			d.Note = fmt.Sprintf("not restored within %v after the load", wait)
			return
		case <-time.After(watchPoll):
		}
	}
}

func printFailoverReport(w io.Writer, r failoverReport, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	opt := func(v *float64, none string) string {
		if v == nil {
			return none
		}
		return strconv.FormatFloat(*v, 'f', 1, 64) + " ms"
	}
	lat := func(l latencyFigure) string {
		if l.Requests == 0 {
			return "no requests"
		}
		return fmt.Sprintf("%.1f / %.1f ms (%d requests)", l.P50MS, l.P99MS, l.Requests)
	}
	fmt.Fprintf(w, "fault             %s\n", r.Fault)
	fmt.Fprintf(w, "load              %d requests a second, %d in flight at most, %gs before the fault and %gs after\n", r.Rate, r.Concurrency, r.DurationS, r.DurationS)
	fmt.Fprintf(w, "requests          %d, %d failed\n", r.Requests, r.Failed)
	for _, cause := range slices.Sorted(maps.Keys(r.FailedByCause)) {
		fmt.Fprintf(w, "  %-15s %d\n", cause, r.FailedByCause[cause])
	}
	fmt.Fprintf(w, "last on the fault %s\n", opt(r.LastOnFaultMS, "none (no request failed or reached what it killed)"))
	fmt.Fprintf(w, "served elsewhere  %s\n", opt(r.ServedElsewhereMS, "not within the run"))
	fmt.Fprintf(w, "p50 / p99 before  %s\n", lat(r.Before))
	fmt.Fprintf(w, "          during  %s\n", lat(r.During))
	fmt.Fprintf(w, "          after   %s\n", lat(r.After))
	d := r.Declared
	if d.Group == "" {
		_, err := fmt.Fprintf(w, "declared counts   %s\n", d.Note)
		return err
	}
	var counts []string
	for _, r := range slices.Sorted(maps.Keys(d.Regions)) {
		counts = append(counts, fmt.Sprintf("%s %d", r, d.Regions[r]))
	}
	if d.Standbys > 0 {
		counts = append(counts, fmt.Sprintf("%d standby per region", d.Standbys))
	}
	_, err := fmt.Fprintf(w, "declared counts   %s (%s), watched in %s: %s%s\n", d.Group, strings.Join(counts, ", "), strings.Join(d.Remaining, ", "), d.Note,
		map[bool]string{true: " after " + opt(d.RestoredMS, ""), false: ""}[d.RestoredMS != nil])
	return err
}
