package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/devcluster"
)

// defaultAPI is where `flame dev` serves the control plane's API.
const defaultAPI = "http://127.0.0.1:4280"

// defaultGlobalAddr is where `flame dev` serves its global entry.
const defaultGlobalAddr = "127.0.0.1:4379"

// chaosFlags are the flags of every chaos command.
type chaosFlags struct {
	api, tokenFile string
	json           bool
}

func (f *chaosFlags) client() (devcluster.ChaosClient, error) {
	url := f.api
	if url == "" {
		url = os.Getenv("FLY_FLAPS_BASE_URL")
	}
	if url == "" {
		url = defaultAPI
	}
	if !strings.HasPrefix(url, "http://") && !strings.HasPrefix(url, "https://") {
		return devcluster.ChaosClient{}, usageError{fmt.Errorf("--api %q: want http://host:port", url)}
	}
	token, err := readSecret("token-file", f.tokenFile, "FLAME_ADMIN_TOKEN")
	if err != nil {
		return devcluster.ChaosClient{}, err
	}
	if token == "" {
		return devcluster.ChaosClient{}, usageError{errors.New("the chaos API needs the admin token flame dev printed: set FLAME_ADMIN_TOKEN or pass --token-file")}
	}
	return devcluster.ChaosClient{URL: url, Token: token}, nil
}

func newChaosCmd() *cobra.Command {
	var f chaosFlags
	c := &cobra.Command{
		Use:   "chaos",
		Short: "Break a running flame dev on purpose: kill hosts and regions, cut and slow links",
		Long: `Inject faults into a running flame dev, through the chaos API it serves
beside the control plane's (admin token only). The faults act on the dev
cluster's simulated network, so every protocol meets them: gossip, the
control plane's calls to the hosts, the edges' backhaul, the global
entry's hops to the edges.

Hosts are named by id (ams-1), sides of a link fault by comma-separated
hosts and regions (ams,iad-2); "control" is the control plane's member.

  flame chaos kill-region ams           every host of ams crashes
  flame chaos revive ams                its hosts start again from their data dirs
  flame chaos partition ams iad,syd     cut every link between the sides
  flame chaos loss ams-1 iad 20         20% of datagrams lost, both ways (0 ends it)
  flame chaos slow-link ams syd 150     150 ms more one way (0 ends it)
  flame chaos stall-host iad-2 10s      iad-2's network stops, then resumes
  flame chaos heal                      end every partition, loss and slow link
  flame chaos kill-control-plane        the control plane crashes; traffic goes on
  flame chaos restart-control-plane     it starts again from its data dir
  flame chaos status                    the active faults and the control plane's state

The chaos API stays up while the control plane is down (the Machines API
then answers 503), and takes the admin token it verified before.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return c.Help() },
	}
	pf := c.PersistentFlags()
	pf.StringVar(&f.api, "api", "", "the control plane's API (default: $FLY_FLAPS_BASE_URL, else "+defaultAPI+")")
	pf.StringVar(&f.tokenFile, "token-file", "", "file holding the admin token flame dev printed (default: $FLAME_ADMIN_TOKEN)")
	pf.BoolVar(&f.json, "json", false, "print the active faults as JSON")

	action := func(use, short string, nargs int, build func(args []string) (devcluster.ChaosRequest, error)) *cobra.Command {
		name, _, _ := strings.Cut(use, " ")
		return &cobra.Command{
			Use: use, Short: short,
			Args: func(c *cobra.Command, args []string) error {
				if len(args) != nargs {
					return usageError{fmt.Errorf("usage: flame chaos %s (got %d arguments)", use, len(args))}
				}
				return nil
			},
			RunE: func(c *cobra.Command, args []string) error {
				req, err := build(args)
				if err != nil {
					return usageError{err}
				}
				cl, err := f.client()
				if err != nil {
					return err
				}
				var st devcluster.FaultStatus
				if name == "status" {
					st, err = cl.Status(c.Context())
				} else {
					st, err = cl.Do(c.Context(), name, req)
				}
				if err != nil {
					return fmt.Errorf("chaos %s: %w", name, err)
				}
				return printFaults(c.OutOrStdout(), st, f.json)
			},
		}
	}
	none := func([]string) (devcluster.ChaosRequest, error) { return devcluster.ChaosRequest{}, nil }
	c.AddCommand(
		action("kill-machine <app> <machine-id>", "Kill a machine's processes (SIGKILL), as a crash would", 2, func(a []string) (devcluster.ChaosRequest, error) {
			return devcluster.ChaosRequest{App: a[0], Machine: a[1]}, nil
		}),
		action("kill-host <host>", "Crash a host: silent at once, its machines' processes gone", 1, func(a []string) (devcluster.ChaosRequest, error) {
			return devcluster.ChaosRequest{Host: a[0]}, nil
		}),
		action("kill-region <region>", "Crash every host of a region at once", 1, func(a []string) (devcluster.ChaosRequest, error) {
			return devcluster.ChaosRequest{Region: a[0]}, nil
		}),
		action("revive <host|region>", "Start killed hosts again from their data dirs, as restarted agents", 1, func(a []string) (devcluster.ChaosRequest, error) {
			return devcluster.ChaosRequest{Host: a[0]}, nil
		}),
		action("partition <hosts|regions> <hosts|regions>", "Cut every link between two sides", 2, func(a []string) (devcluster.ChaosRequest, error) {
			return devcluster.ChaosRequest{A: splitList(a[0]), B: splitList(a[1])}, nil
		}),
		action("heal", "End every partition, loss and slow link", 0, none),
		action("loss <a> <b> <percent>", "Lose a share of the datagrams between two sides, both ways (0 ends it)", 3, func(a []string) (devcluster.ChaosRequest, error) {
			p, err := strconv.ParseFloat(strings.TrimSuffix(a[2], "%"), 64)
			if err != nil || !(p >= 0 && p <= 100) {
				return devcluster.ChaosRequest{}, fmt.Errorf("percent %q: want a number from 0 to 100", a[2])
			}
			return devcluster.ChaosRequest{A: splitList(a[0]), B: splitList(a[1]), Percent: &p}, nil
		}),
		action("slow-link <a> <b> <ms>", "Add latency between two sides, one way, both ways (0 ends it)", 3, func(a []string) (devcluster.ChaosRequest, error) {
			d, err := parseMillis(a[2])
			if err != nil {
				return devcluster.ChaosRequest{}, fmt.Errorf("extra latency %q: %w", a[2], err)
			}
			ms := d.Milliseconds()
			return devcluster.ChaosRequest{A: splitList(a[0]), B: splitList(a[1]), DelayMS: &ms}, nil
		}),
		action("stall-host <host> <duration>", "Stop a host's network for a while (5s, 1m): it runs on, unheard", 2, func(a []string) (devcluster.ChaosRequest, error) {
			d, err := time.ParseDuration(a[1])
			if err != nil || d < time.Millisecond {
				return devcluster.ChaosRequest{}, fmt.Errorf("duration %q: want 1ms or more, as 500ms, 10s or 1m", a[1])
			}
			ms := d.Milliseconds()
			return devcluster.ChaosRequest{Host: a[0], DurationMS: &ms}, nil
		}),
		action("kill-control-plane", "Crash the control plane: its API answers 503, hosts and edges serve on", 0, none),
		action("restart-control-plane", "Start the killed control plane again from its data dir", 0, none),
		action("status", "Show the active faults and the control plane's state", 0, none),
	)
	return c
}

// parseMillis reads a latency: milliseconds ("150") or a duration
// ("150ms", "1s").
func parseMillis(s string) (time.Duration, error) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 0 {
			return 0, errors.New("negative")
		}
		return time.Duration(n) * time.Millisecond, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, errors.New("want milliseconds, as 150 or 150ms")
	}
	return d, nil
}

// printFaults prints the active faults, as a table or JSON.
func printFaults(w io.Writer, st devcluster.FaultStatus, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	if st.ControlPlane != "" {
		fmt.Fprintf(w, "control plane: %s\n", st.ControlPlane)
	}
	if len(st.Killed)+len(st.Stalled)+len(st.Links) == 0 {
		none := "no faults"
		if st.ControlPlane == "killed" {
			none = "no other faults"
		}
		_, err := fmt.Fprintln(w, none)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FAULT\tWHERE\tHOW")
	for _, h := range st.Killed {
		fmt.Fprintf(tw, "killed\t%s\t\n", h)
	}
	for _, s := range st.Stalled {
		fmt.Fprintf(tw, "stalled\t%s\tuntil %s\n", s.Host, s.Until.Local().Format(time.TimeOnly))
	}
	for _, l := range st.Links {
		how := ""
		switch l.Kind {
		case "loss":
			how = strconv.FormatFloat(l.Percent, 'f', -1, 64) + "% lost"
		case "slow-link":
			how = fmt.Sprintf("+%d ms one way", l.DelayMS)
		}
		fmt.Fprintf(tw, "%s\t%s | %s\t%s\n", l.Kind, strings.Join(l.A, ","), strings.Join(l.B, ","), how)
	}
	return tw.Flush()
}
