package cli

import (
	"fmt"
	"net"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/host"
)

func newAgentCmd() *cobra.Command {
	var (
		apiAddr, dataDir, token, region, logLevel string
	)
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run a host agent: it owns this host's machines and serves their Machines API",
		Long: `Run a host agent. It records every machine's lifecycle in <data-dir>/agent.db
before acting on it; stopping or killing the agent leaves workloads running, and
an agent started again on the same data dir adopts them and finishes any
operation that was cut short.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if dataDir == "" {
				return usageError{fmt.Errorf("--data-dir is required")}
			}
			if token == "" {
				return usageError{fmt.Errorf("--token is required")}
			}
			log, err := newLogger(c.ErrOrStderr(), logLevel)
			if err != nil {
				return err
			}
			images, err := host.ExecImages()
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", apiAddr)
			if err != nil {
				return fmt.Errorf("listen on %s: %w", apiAddr, err)
			}
			h, err := host.New(host.Config{
				DataDir: dataDir, Region: region, Listener: ln, Token: token,
				Driver: exec.New(exec.Config{Images: images}, log), Logger: log,
			})
			if err != nil {
				ln.Close()
				return err
			}
			if err := h.Start(c.Context()); err != nil {
				h.Close()
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "flame agent: region %s, machines API on http://%s\n", region, h.Addr())
			<-c.Context().Done()
			return h.Close()
		},
	}
	f := c.Flags()
	f.StringVar(&apiAddr, "api-addr", "127.0.0.1:4281", "address of the Machines API")
	f.StringVar(&dataDir, "data-dir", "", "directory for the agent's state (required)")
	f.StringVar(&token, "token", "", "bearer token the API requires (required)")
	f.StringVar(&region, "region", "ams", "region of this host")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return c
}
