package cli

import (
	"errors"
	"os"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/demoapp"
)

func newDemoAppCmd() *cobra.Command {
	var addr string
	c := &cobra.Command{
		Use:   "demo-app",
		Short: "Run the built-in demo app: an HTTP server that answers with its machine identity",
		Long: `Run the built-in demo app (image "flame/demo-app" in flame dev). It listens on
$PORT (default 8080) and answers GET / with its FLY_* identity. It can be told
to fail (POST /fail, GET /health turns 500), slow down (?delay=250ms, POST
/slow?delay=…) or exit (POST /exit?code=N).`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if addr == "" {
				addr = ":8080"
				if p := os.Getenv("PORT"); p != "" {
					addr = ":" + p
				}
			}
			err := demoapp.Run(c.Context(), addr, os.Getenv, c.OutOrStdout())
			var ee demoapp.ExitError
			if errors.As(err, &ee) {
				return exitError{ee.Code}
			}
			return err
		},
	}
	c.Flags().StringVar(&addr, "addr", "", "listen address (default :$PORT, or :8080)")
	return c
}
