package cli

import (
	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/driver/sandbox"
)

// newSandboxInitCmd is the init of the sandbox driver's sandboxes: the
// driver runs "flame sandbox-init run" as PID 1 of each sandbox. It is not
// meant to be run by hand.
func newSandboxInitCmd() *cobra.Command {
	return &cobra.Command{
		Use:                sandbox.InitCommand,
		Short:              "Run as the init of a machine's sandbox (started by the sandbox driver)",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(c *cobra.Command, args []string) error {
			if code := sandbox.InitMain(args); code != 0 {
				return exitError{code}
			}
			return nil
		},
	}
}
