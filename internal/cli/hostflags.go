package cli

import (
	"fmt"
	"net"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/host"
)

// hostFlags are the flags of the commands that run a host.
type hostFlags struct {
	apiAddr, dataDir, token, region, logLevel string
}

func (f *hostFlags) register(c *cobra.Command, defaultAddr, defaultLevel, dataDirHelp, tokenHelp string) {
	fs := c.Flags()
	fs.StringVar(&f.apiAddr, "api-addr", defaultAddr, "address of the Machines API")
	fs.StringVar(&f.dataDir, "data-dir", "", dataDirHelp)
	fs.StringVar(&f.token, "token", "", tokenHelp)
	fs.StringVar(&f.region, "region", "ams", "region of this host")
	fs.StringVar(&f.logLevel, "log-level", defaultLevel, "debug, info, warn or error")
}

// startHost builds a host with the exec driver from the flags and starts it.
func (f *hostFlags) startHost(c *cobra.Command) (*host.Host, error) {
	log, err := newLogger(c.ErrOrStderr(), f.logLevel)
	if err != nil {
		return nil, err
	}
	images, err := host.ExecImages()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", f.apiAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", f.apiAddr, err)
	}
	h, err := host.New(host.Config{
		DataDir: f.dataDir, Region: f.region, Listener: ln, Token: f.token,
		Driver: exec.New(exec.Config{Images: images}, log), Logger: log,
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	if err := h.Start(c.Context()); err != nil {
		h.Close()
		return nil, err
	}
	return h, nil
}
