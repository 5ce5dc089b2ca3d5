// Command flame is Flame's one binary: the dev platform, the host agent, the
// demo app and the command-line client.
package main

import (
	"os"

	"github.com/flamehq/flame/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
