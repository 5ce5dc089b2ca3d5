package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newAgentCmd() *cobra.Command {
	var f hostFlags
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run a host agent: it owns this host's machines and serves their Machines API",
		Long: `Run a host agent. It records every machine's lifecycle in <data-dir>/agent.db
before acting on it; stopping or killing the agent leaves workloads running, and
an agent started again on the same data dir adopts them and finishes any
operation that was cut short.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if f.dataDir == "" {
				return usageError{fmt.Errorf("--data-dir is required")}
			}
			if f.token == "" {
				return usageError{fmt.Errorf("--token is required")}
			}
			h, err := f.startHost(c)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "flame agent: region %s, machines API on http://%s\n", f.region, h.Addr())
			<-c.Context().Done()
			return h.Close()
		},
	}
	f.register(c, "127.0.0.1:4281", "info", "directory for the agent's state (required)", "bearer token the API requires (required)")
	return c
}
