package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/host"
)

func newDevCmd() *cobra.Command {
	var (
		apiAddr, dataDir, token, region, logLevel string
	)
	c := &cobra.Command{
		Use:   "dev",
		Short: "Run the Flame platform on this machine, for development",
		Long: `Run the Flame platform on this machine: a host agent with its Machines API.
With no flags it keeps its state in a temporary directory removed on exit and
makes up an API token, which it prints. Ctrl-C stops every machine and exits.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			out := c.OutOrStdout()
			log, err := newLogger(c.ErrOrStderr(), logLevel)
			if err != nil {
				return err
			}
			if token == "" {
				token = randomToken()
			}
			if dataDir == "" {
				dir, err := os.MkdirTemp("", "flame-dev-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(dir)
				dataDir = dir
			}
			images, err := host.ExecImages()
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", apiAddr)
			if err != nil {
				return fmt.Errorf("listen on %s: %w (is another flame dev running? pick another --api-addr)", apiAddr, err)
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
			printDevBanner(out, h.Addr(), token, region, dataDir)
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
	f := c.Flags()
	f.StringVar(&apiAddr, "api-addr", "127.0.0.1:4280", "address of the Machines API")
	f.StringVar(&dataDir, "data-dir", "", "directory for state (default: a temporary directory removed on exit)")
	f.StringVar(&token, "token", "", "API token (default: a random one, printed)")
	f.StringVar(&region, "region", "ams", "region of the dev host")
	f.StringVar(&logLevel, "log-level", "warn", "debug, info, warn or error")
	return c
}

func randomToken() string {
	var b [16]byte
	rand.Read(b[:])
	return "fdev_" + hex.EncodeToString(b[:])
}

func printDevBanner(w interface{ Write([]byte) (int, error) }, addr, token, region, dataDir string) {
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
