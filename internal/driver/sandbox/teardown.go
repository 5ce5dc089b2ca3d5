package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Teardown removes what the driver keeps for all its machines — the spare
// cgroup, the cgroup parents, the filter's tables and the bridge — once no
// machine is left: for a
// host that is going away for good (a dev cluster with temporary state). It
// leaves everything in place, and says so, while any machine's cgroup
// remains. Call it after Close.
func (d *Driver) Teardown() error {
	var machines []string
	for _, root := range d.cg.roots {
		entries, err := os.ReadDir(root)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("teardown: %w", err)
		}
		for _, e := range entries {
			if !e.IsDir() {
				continue
			}
			if strings.HasPrefix(e.Name(), sparePrefix) {
				if err := removeCgroupDir(filepath.Join(root, e.Name())); err != nil {
					return fmt.Errorf("teardown: %w", err)
				}
				continue
			}
			machines = append(machines, e.Name())
		}
	}
	if len(machines) > 0 {
		return fmt.Errorf("teardown: machines %v still have cgroups: destroy them first", machines)
	}
	var errs []error
	for _, root := range d.cg.roots {
		if err := unix.Rmdir(root); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("teardown: remove cgroup %s: %w", root, err))
		}
	}
	if d.filter != nil {
		if err := d.filter.close(true); err != nil {
			errs = append(errs, fmt.Errorf("teardown: %w", err))
		}
	}
	if br, err := netlink.LinkByName(d.cfg.Bridge); err == nil {
		if err := netlink.LinkDel(br); err != nil {
			errs = append(errs, fmt.Errorf("teardown: delete bridge %s: %w", d.cfg.Bridge, err))
		}
	}
	return errors.Join(errs...)
}
