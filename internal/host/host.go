// Package host builds and runs one Flame host: the agent with its driver and
// the Machines API server in front of it. `flame agent`, `flame dev` and the
// tests all build hosts here, the same way.
package host

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/agent"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/machine"
)

// Config describes a host.
type Config struct {
	DataDir string
	Region  string
	// Listener is where the Machines API is served.
	Listener net.Listener
	// Token is the bearer token the API requires.
	Token string
	// Driver runs the workloads.
	Driver driver.Driver
	// Backoff spaces automatic restarts (zero: the agent's default).
	Backoff machine.Backoff
	Logger  *slog.Logger
}

// Validate reports what is missing.
func (c *Config) Validate() error {
	switch {
	case c.Listener == nil:
		return errors.New("host: listener is required")
	case c.Token == "":
		return errors.New("host: token is required")
	}
	return nil
}

// Host is a running host.
type Host struct {
	Agent *agent.Agent
	cfg   Config
	log   *slog.Logger
	srv   *http.Server
	wg    sync.WaitGroup
}

// New builds the host's parts; nothing runs until Start.
func New(cfg Config) (*Host, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ag, err := agent.New(agent.Config{
		DataDir: cfg.DataDir,
		Region:  cfg.Region,
		Driver:  cfg.Driver,
		Logger:  cfg.Logger,
		Backoff: cfg.Backoff,
	})
	if err != nil {
		return nil, err
	}
	api, err := httpapi.New(httpapi.Config{
		Backend:      ag,
		Authenticate: httpapi.TokenAuth(cfg.Token),
		Logger:       cfg.Logger,
	})
	if err != nil {
		ag.Close()
		return nil, err
	}
	return &Host{
		Agent: ag,
		cfg:   cfg,
		log:   cfg.Logger.With("component", "host"),
		srv:   &http.Server{Handler: api.Handler(), ReadHeaderTimeout: 10 * time.Second},
	}, nil
}

// Start resumes the agent's machines and serves the API.
func (h *Host) Start(ctx context.Context) error {
	if err := h.Agent.Start(ctx); err != nil {
		return err
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		if err := h.srv.Serve(h.cfg.Listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			h.log.Error("machines api stopped", "err", err)
		}
	}()
	return nil
}

// Addr is where the API listens.
func (h *Host) Addr() string { return h.cfg.Listener.Addr().String() }

// Close stops serving and closes the agent. Workloads keep running unless
// StopMachines ran first.
func (h *Host) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := h.srv.Shutdown(ctx)
	if err != nil {
		h.srv.Close()
	}
	h.wg.Wait()
	err = errors.Join(err, h.Agent.Close())
	if c, ok := h.cfg.Driver.(io.Closer); ok {
		err = errors.Join(err, c.Close())
	}
	return err
}

// StopMachines stops every running machine.
func (h *Host) StopMachines(ctx context.Context) { h.Agent.StopAll(ctx) }

// ExecImages maps the images the exec driver knows by name to host programs:
// the built-in demo app runs as `<this binary> demo-app`.
func ExecImages() (map[string][]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own binary: %w", err)
	}
	return map[string][]string{DemoImage: {self, "demo-app"}}, nil
}

// DemoImage is the image name of the built-in demo app.
const DemoImage = "flame/demo-app"
