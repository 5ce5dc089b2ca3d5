package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/image"
)

// defaultPath is the PATH of a workload whose image and config set none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// launch is how the workload is run inside its sandbox, resolved against the
// image's root filesystem. It is kept with the sandbox so that Exec runs
// commands the same way.
type launch struct {
	Path   string   `json:"path"` // the program: an absolute path in the root
	Argv   []string `json:"argv"`
	Env    []string `json:"env"`
	Dir    string   `json:"dir"`
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
}

// mergeArgv is the argv of spec's workload on img, as a container runtime
// builds it: the config's entrypoint replaces the image's, and its cmd the
// image's cmd; a config that replaces the entrypoint without giving a cmd
// drops the image's cmd too, which was written for the old entrypoint.
func mergeArgv(img image.Config, spec driver.Spec) []string {
	entry, cmd := img.Entrypoint, img.Cmd
	if len(spec.Entrypoint) > 0 {
		entry, cmd = spec.Entrypoint, nil
	}
	if len(spec.Cmd) > 0 {
		cmd = spec.Cmd
	}
	return append(slices.Clone(entry), cmd...)
}

// mergeEnv is the image's environment overlaid with spec's (spec wins), with
// FLY_PRIVATE_IP set to the machine's real address and a default PATH.
func mergeEnv(img image.Config, spec driver.Spec, privateIP string) map[string]string {
	env := make(map[string]string, len(img.Env)+len(spec.Env)+2)
	for _, kv := range img.Env {
		k, v, _ := strings.Cut(kv, "=")
		if k != "" {
			env[k] = v
		}
	}
	maps.Copy(env, spec.Env)
	if privateIP != "" {
		env["FLY_PRIVATE_IP"] = privateIP
	}
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = defaultPath
	}
	return env
}

// envList renders env as sorted KEY=VALUE pairs.
func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out
}

// account is a user resolved from the image's /etc/passwd and /etc/group.
type account struct {
	uid, gid uint32
	groups   []uint32
	home     string
}

// fileReader reads a file of the image's root filesystem.
type fileReader func(name string) ([]byte, error)

// resolveUser turns an image's USER ("", "name", "uid", "name:group",
// "uid:gid") into ids. Names are looked up in the image's /etc/passwd and
// /etc/group; a user named by name also gets the groups that list it.
func resolveUser(user string, read fileReader) (account, error) {
	acct := account{home: "/"}
	if user == "" {
		user = "0"
	}
	u, g, hasGroup := strings.Cut(user, ":")
	passwd, perr := read("/etc/passwd")
	if n, err := strconv.ParseUint(u, 10, 32); err == nil {
		acct.uid = uint32(n)
		if e, ok := findPasswd(passwd, func(e passwdEntry) bool { return e.uid == acct.uid }); ok {
			acct.gid, acct.home = e.gid, e.home
		}
	} else {
		e, ok := findPasswd(passwd, func(e passwdEntry) bool { return e.name == u })
		if !ok {
			if perr != nil {
				return account{}, fmt.Errorf("user %q: read /etc/passwd: %w", u, perr)
			}
			return account{}, fmt.Errorf("user %q: not in /etc/passwd", u)
		}
		acct.uid, acct.gid, acct.home = e.uid, e.gid, e.home
		groupFile, _ := read("/etc/group")
		acct.groups = memberGroups(groupFile, u)
	}
	if hasGroup {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			acct.gid = uint32(n)
		} else {
			groupFile, _ := read("/etc/group")
			gid, ok := findGroup(groupFile, g)
			if !ok {
				return account{}, fmt.Errorf("group %q: not in /etc/group", g)
			}
			acct.gid = gid
		}
	}
	return acct, nil
}

type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// findPasswd returns the first well-formed /etc/passwd entry match accepts.
func findPasswd(b []byte, match func(passwdEntry) bool) (passwdEntry, bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 6 || strings.HasPrefix(f[0], "#") {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		e := passwdEntry{name: f[0], uid: uint32(uid), gid: uint32(gid), home: f[5]}
		if match(e) {
			return e, true
		}
	}
	return passwdEntry{}, false
}

// findGroup looks up a group's id by name in /etc/group.
func findGroup(b []byte, name string) (uint32, bool) {
	var gid uint32
	found := false
	eachGroup(b, func(n string, id uint32, _ []string) bool {
		if n == name {
			gid, found = id, true
			return false
		}
		return true
	})
	return gid, found
}

// memberGroups lists the ids of the groups that name user as a member.
func memberGroups(b []byte, user string) []uint32 {
	var out []uint32
	eachGroup(b, func(_ string, id uint32, members []string) bool {
		if slices.Contains(members, user) && !slices.Contains(out, id) {
			out = append(out, id)
		}
		return true
	})
	return out
}

func eachGroup(b []byte, f func(name string, gid uint32, members []string) bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		p := strings.Split(sc.Text(), ":")
		if len(p) < 4 || strings.HasPrefix(p[0], "#") {
			continue
		}
		gid, err := strconv.ParseUint(p[2], 10, 32)
		if err != nil {
			continue
		}
		var members []string
		if p[3] != "" {
			members = strings.Split(p[3], ",")
		}
		if !f(p[0], uint32(gid), members) {
			return
		}
	}
}

// errNotFound is a program that is not in the root filesystem.
var errNotFound = errors.New("not found")

// lookProgram finds the program name stands for in the root filesystem:
// a name with a slash is taken as is (relative to dir), a bare name is
// searched in pathEnv. isExec reports whether a path in the root names an
// executable regular file.
func lookProgram(name, dir, pathEnv string, isExec func(string) error) (string, error) {
	if name == "" {
		return "", errors.New("empty program name")
	}
	if strings.Contains(name, "/") {
		p := name
		if !path.IsAbs(p) {
			p = path.Join(dir, p)
		}
		if err := isExec(p); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
		return p, nil
	}
	for d := range strings.SplitSeq(pathEnv, ":") {
		if !path.IsAbs(d) {
			continue
		}
		p := path.Join(d, name)
		if isExec(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w in PATH %s", name, errNotFound, pathEnv)
}
