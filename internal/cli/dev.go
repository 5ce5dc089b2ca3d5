package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/host"
)

func newDevCmd() *cobra.Command {
	var f hostFlags
	c := &cobra.Command{
		Use:   "dev",
		Short: "Run the Flame platform on this machine, for development",
		Long: `Run the Flame platform on this machine: a host agent with its Machines API.
With no flags it keeps its state in a temporary directory removed on exit and
makes up an API token, which it prints. Ctrl-C stops every machine and exits.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			out := c.OutOrStdout()
			if f.token == "" {
				f.token = randomToken()
			}
			if f.dataDir == "" {
				dir, err := os.MkdirTemp("", "flame-dev-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(dir)
				f.dataDir = dir
			}
			h, err := f.startHost(c)
			if err != nil {
				return err
			}
			printDevBanner(out, h.Addr(), f.token, f.region, f.dataDir)
			<-c.Context().Done()
			fmt.Fprintln(out, "\nflame dev: stopping machines…")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			h.StopMachines(ctx)
			err = h.Close()
			fmt.Fprintln(out, "flame dev: stopped")
			return err
		},
	}
	f.register(c, "127.0.0.1:4280", "warn", "directory for state (default: a temporary directory removed on exit)", "API token (default: a random one, printed)")
	return c
}

func randomToken() string {
	var b [16]byte
	rand.Read(b[:])
	return "fdev_" + hex.EncodeToString(b[:])
}

func printDevBanner(w io.Writer, addr, token, region, dataDir string) {
	fmt.Fprintf(w, `flame dev is running (region %s, state in %s)

  Machines API  http://%s
  Token         %s

Try it:

  export FLY_API_TOKEN=%s
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" -X POST http://%s/v1/apps/demo/machines \
    -d '{"config": {"image": "%s", "env": {"PORT": "8080"}}}'
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" http://%s/v1/apps/demo/machines
  curl -s http://127.0.0.1:8080/

Press Ctrl-C to stop every machine and exit.
`, region, dataDir, addr, token, token, addr, host.DemoImage, addr)
}
