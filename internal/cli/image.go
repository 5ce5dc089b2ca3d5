package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/image"
)

// defaultRegistry is where `flame dev` serves its registry.
const defaultRegistry = "127.0.0.1:4280"

// registryFlags are the flags of every command that talks to a registry.
type registryFlags struct {
	registry, tokenFile string
	insecure            bool
}

func (f *registryFlags) register(c *cobra.Command) {
	fs := c.Flags()
	fs.StringVar(&f.registry, "registry", defaultRegistry, "registry address, host:port")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the registry token (default: $FLY_API_TOKEN)")
	fs.BoolVar(&f.insecure, "insecure", false, "use plain HTTP (always used for loopback registries)")
}

func (f *registryFlags) remote(c *cobra.Command) (image.Remote, error) {
	token, err := readSecret("token-file", f.tokenFile, "FLY_API_TOKEN")
	if err != nil {
		return image.Remote{}, err
	}
	return image.Remote{Token: token, Insecure: f.insecure, Progress: c.ErrOrStderr()}, nil
}

// target joins --registry and --name (repository[:tag], tag "latest" by
// default) into the reference to push to.
func (f *registryFlags) target(nameFlag string) (string, error) {
	if nameFlag == "" {
		return "", usageError{errors.New("--name repository[:tag] is required")}
	}
	if f.registry == "" || strings.ContainsAny(f.registry, "/ ") {
		return "", usageError{fmt.Errorf("--registry %q is not host:port", f.registry)}
	}
	if strings.ContainsAny(nameFlag, "@ ") || strings.Contains(strings.Split(nameFlag, "/")[0], ":") && strings.Contains(nameFlag, "/") {
		return "", usageError{fmt.Errorf("--name %q is not repository[:tag] (the registry goes in --registry)", nameFlag)}
	}
	repo, tag, ok := strings.Cut(nameFlag, ":")
	if !ok {
		tag = "latest"
	}
	return f.registry + "/" + repo + ":" + tag, nil
}

func newImageCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "image",
		Short: "Build, import and list images in a Flame registry, without Docker",
		Args:  noArgs,
		RunE:  func(c *cobra.Command, _ []string) error { return c.Help() },
	}
	c.AddCommand(newImageImportCmd(), newImageBuildCmd(), newImageLsCmd())
	return c
}

func exactlyOneArg(what string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != 1 {
			return usageError{fmt.Errorf("%s takes one argument, the %s; got %d", c.CommandPath(), what, len(args))}
		}
		return nil
	}
}

func newImageImportCmd() *cobra.Command {
	var f registryFlags
	var nameFlag string
	c := &cobra.Command{
		Use:   "import <file|dir> --name repository[:tag]",
		Short: "Push an image from a docker save tarball or an OCI layout to a registry",
		Long: `Push an image from a 'docker save' tarball (plain or gzipped), an OCI image
layout directory, or a tarball of one, to a registry. Progress goes to stderr;
the pushed reference, with its digest, to stdout.`,
		Args: exactlyOneArg("file or directory to import"),
		RunE: func(c *cobra.Command, args []string) error {
			ref, err := f.target(nameFlag)
			if err != nil {
				return err
			}
			r, err := f.remote(c)
			if err != nil {
				return err
			}
			img, err := image.Import(args[0], "")
			if err != nil {
				return err
			}
			defer img.Close()
			return pushAndPrint(c, img, ref, r)
		},
	}
	f.register(c)
	c.Flags().StringVar(&nameFlag, "name", "", "repository[:tag] to push as (tag defaults to latest)")
	return c
}

func newImageBuildCmd() *cobra.Command {
	var f registryFlags
	var nameFlag, entrypoint, cmd string
	var spec image.BuildSpec
	c := &cobra.Command{
		Use:   "build <dir> --name repository[:tag] --entrypoint …",
		Short: "Pack a directory as an image layer and push it",
		Long: `Pack a directory as one image layer, placed at the image's root, on top of
--base (or alone: a scratch image), and push it. Files are owned by root and
dated 1970, so the same directory always gives the same digest.

--entrypoint and --cmd take a JSON array ('["/app", "serve"]') or words
separated by spaces ('/app serve').`,
		Args: exactlyOneArg("directory to pack"),
		RunE: func(c *cobra.Command, args []string) error {
			ref, err := f.target(nameFlag)
			if err != nil {
				return err
			}
			if spec.Entrypoint, err = parseCommand("--entrypoint", entrypoint); err != nil {
				return err
			}
			if spec.Cmd, err = parseCommand("--cmd", cmd); err != nil {
				return err
			}
			if spec.Base == "" && len(spec.Entrypoint) == 0 && len(spec.Cmd) == 0 {
				return usageError{errors.New("an image from scratch needs --entrypoint or --cmd")}
			}
			for _, kv := range spec.Env {
				if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
					return usageError{fmt.Errorf("--env %q is not KEY=VALUE", kv)}
				}
			}
			spec.Dir = args[0]
			if spec.Remote, err = f.remote(c); err != nil {
				return err
			}
			img, err := image.Build(c.Context(), spec)
			if err != nil {
				return err
			}
			defer img.Close()
			return pushAndPrint(c, img, ref, spec.Remote)
		},
	}
	f.register(c)
	fs := c.Flags()
	fs.StringVar(&nameFlag, "name", "", "repository[:tag] to push as (tag defaults to latest)")
	fs.StringVar(&entrypoint, "entrypoint", "", "the image's entrypoint")
	fs.StringVar(&cmd, "cmd", "", "the image's default arguments")
	fs.StringArrayVar(&spec.Env, "env", nil, "KEY=VALUE to add to the image's environment (repeatable)")
	fs.StringVar(&spec.WorkingDir, "workdir", "", "the image's working directory")
	fs.StringVar(&spec.User, "user", "", "the user the image runs as")
	fs.StringVar(&spec.Base, "base", "", "base image reference (default: none, a scratch image)")
	return c
}

// parseCommand reads an exec-form JSON array or space-separated words.
func parseCommand(flag, s string) ([]string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	if strings.HasPrefix(s, "[") {
		var out []string
		if err := json.Unmarshal([]byte(s), &out); err != nil {
			return nil, usageError{fmt.Errorf("%s: not a JSON array of strings: %w", flag, err)}
		}
		return out, nil
	}
	return strings.Fields(s), nil
}

func pushAndPrint(c *cobra.Command, img *image.LocalImage, ref string, r image.Remote) error {
	digest, err := image.Push(c.Context(), img, ref, r)
	if err != nil {
		return tokenHint(err, r)
	}
	// ref always ends in :tag (see target).
	fmt.Fprintf(c.OutOrStdout(), "%s@%s\n", ref[:strings.LastIndex(ref, ":")], digest)
	return nil
}

// tokenHint says how to pass a token when a registry wants one.
func tokenHint(err error, r image.Remote) error {
	if errors.Is(err, image.ErrUnauthorized) && r.Token == "" {
		return fmt.Errorf("%w\n(the registry needs a token: set FLY_API_TOKEN or pass --token-file)", err)
	}
	return err
}

func newImageLsCmd() *cobra.Command {
	var f registryFlags
	var asJSON bool
	c := &cobra.Command{
		Use:   "ls",
		Short: "List the repositories, tags, digests and sizes in a registry",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			r, err := f.remote(c)
			if err != nil {
				return err
			}
			list, err := image.List(c.Context(), f.registry, r)
			if err != nil {
				return tokenHint(err, r)
			}
			out := c.OutOrStdout()
			if asJSON {
				if list == nil {
					list = []image.Listing{}
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(list)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REPOSITORY\tTAG\tDIGEST\tLAYERS\tSIZE")
			for _, l := range list {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", l.Repository, l.Tag, l.Digest, l.Layers, sizeString(l.Size))
			}
			return tw.Flush()
		},
	}
	f.register(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
