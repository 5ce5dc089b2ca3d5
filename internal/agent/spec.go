package agent

import (
	"maps"
	"path/filepath"
	"strconv"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
)

// defaultPath is the PATH a workload gets when its config sets none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// spec builds what the driver needs to run r's current instance.
func (a *Agent) spec(r *record) driver.Spec {
	cfg := r.Config
	if cfg == nil {
		cfg = &api.MachineConfig{}
	}
	dir := a.machineDir(r.ID)
	s := driver.Spec{
		MachineID:  r.ID,
		InstanceID: r.Instance,
		App:        r.App,
		Org:        r.OrgNet,
		Region:     r.Region,
		Dir:        dir,
		LogPath:    filepath.Join(dir, "log"),
		Image:      cfg.Image,
		Entrypoint: cfg.Init.Entrypoint,
		Cmd:        cfg.Init.Cmd,
		Env:        workloadEnv(r, cfg),
	}
	s.CPUs, s.MemoryMB = cfg.Size()
	s.RootfsSizeMB = cfg.RootfsSizeMB()
	s.Ports = machinePorts(cfg)
	if len(cfg.Processes) > 0 {
		p := cfg.Processes[0]
		if len(p.Entrypoint) > 0 {
			s.Entrypoint = p.Entrypoint
		}
		if len(p.Cmd) > 0 {
			s.Cmd = p.Cmd
		}
		if len(p.Exec) > 0 {
			s.Entrypoint, s.Cmd = p.Exec, nil
		}
	}
	if len(cfg.Init.Exec) > 0 {
		// exec replaces the image's entrypoint and command altogether.
		s.Entrypoint, s.Cmd = cfg.Init.Exec, nil
	}
	return s
}

// workloadEnv is the config's env overlaid with the FLY_* variables a
// machine sees on Fly. The platform's variables win, except PRIMARY_REGION,
// which apps set themselves.
func workloadEnv(r *record, cfg *api.MachineConfig) map[string]string {
	env := map[string]string{"PATH": defaultPath, "PRIMARY_REGION": r.Region}
	maps.Copy(env, cfg.Env)
	maps.Copy(env, r.Secrets)
	if len(cfg.Processes) > 0 {
		maps.Copy(env, cfg.Processes[0].Env)
	}
	group := "app"
	if g := cfg.Metadata[api.MetadataProcessGroup]; g != "" {
		group = g
	}
	maps.Copy(env, map[string]string{
		"FLY_APP_NAME":        r.App,
		"FLY_MACHINE_ID":      r.ID,
		"FLY_ALLOC_ID":        r.ID,
		"FLY_REGION":          r.Region,
		"FLY_PUBLIC_IP":       "",
		"FLY_IMAGE_REF":       cfg.Image,
		"FLY_MACHINE_VERSION": r.Instance,
		"FLY_PRIVATE_IP":      loopbackIP, // drivers with their own addresses put theirs

		"FLY_PROCESS_GROUP": group,
		"FLY_VM_MEMORY_MB":  strconv.Itoa(memoryMB(cfg)),
	})
	return env
}

func memoryMB(cfg *api.MachineConfig) int {
	_, mem := cfg.Size()
	return mem
}

// loopbackIP is the address of machines whose driver gives them none of
// their own: exec workloads share the host's network.
const loopbackIP = "127.0.0.1"

// privateIP is the machine's address: the one its driver gave it, or the
// host's loopback.
func (a *Agent) privateIP(r *record) string {
	if ad, ok := a.cfg.Driver.(Addresser); ok {
		if ip, ok := ad.PrivateIP(a.spec(r)); ok {
			return ip.String()
		}
	}
	return loopbackIP
}
