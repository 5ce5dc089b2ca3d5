package sandbox

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/image"
)

// rootlessInit is what the init of a rootless sandbox needs besides
// initConfig: the flattened image, the size of the machine's writable
// layer, and its address (the host loopback's, which the sandbox's loopback
// answers too), where forwarded connections go. The image is a path the
// init opens itself: overlayfs in a user namespace takes no layer from
// another mount namespace (the driver's descriptor).
type rootlessInit struct {
	Lower     string `json:"lower"`
	DiskBytes int64  `json:"disk_bytes"`
	Addr      string `json:"addr"`
}

// inRootless is set, in an init, when its sandbox is rootless: one id is
// mapped and setgroups is denied, so the workload and the commands it runs
// keep the (empty) groups they have. dialAddr is then the machine's address.
var (
	inRootless bool
	dialAddr   string
)

// credential is how the init runs l's program: as l's user, with its groups
// unless the sandbox is rootless.
func credential(l launch) *syscall.Credential {
	if inRootless {
		return &syscall.Credential{Uid: l.UID, Gid: l.GID, NoSetGroups: true}
	}
	return &syscall.Credential{Uid: l.UID, Gid: l.GID, Groups: l.Groups}
}

// setupRootless runs in a rootless sandbox's init before setupRoot: it
// brings the loopback up and makes the machine's root filesystem from the
// flattened image, returned as a detached mount. The driver's descriptor of
// the image, sent, closes.
func setupRootless(ri *rootlessInit, sent int) (int, error) {
	unix.Close(sent)
	inRootless, dialAddr = true, ri.Addr
	if err := loopbackUp(); err != nil {
		return -1, err
	}
	if linkFd < 0 {
		if linkErr == nil {
			linkFd, linkErr = linkUp()
		}
		if linkErr != nil {
			fmt.Fprintf(os.Stderr, "flame sandbox-init: no outbound traffic: %v\n", linkErr)
		}
	}
	lower, err := unix.Open(ri.Lower, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("image root filesystem: %w", err)
	}
	return rootlessTree(lower, ri.DiskBytes)
}

// rootlessTree makes, in the init's own user and mount namespaces, a tmpfs
// of size bytes for the machine's writes and an overlay of it over lower
// (userxattr: overlayfs keeps its own attributes as user.* ones, all a user
// namespace may set), and returns the overlay as a detached mount, nodev.
func rootlessTree(lower int, size int64) (tree int, err error) {
	defer unix.Close(lower)
	if size <= 0 {
		return -1, errors.New("rootless root filesystem: no size")
	}
	disk, err := fsMount("tmpfs", 0, [][2]string{
		{"size", strconv.FormatInt(size, 10)},
		{"nr_inodes", strconv.FormatInt(size/4096, 10)},
		{"mode", "0755"},
	}, nil, unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return -1, fmt.Errorf("writable layer: %w", err)
	}
	defer unix.Close(disk)
	var dirs [2]int
	for i, name := range []string{mountUpper, mountWork} {
		if err := unix.Mkdirat(disk, name, 0o755); err != nil {
			return -1, fmt.Errorf("writable layer: %w", err)
		}
		fd, err := unix.Openat(disk, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("writable layer: %w", err)
		}
		defer unix.Close(fd)
		dirs[i] = fd
	}
	tree, err = fsMount("overlay", lower, nil, [][2]string{
		{"upperdir", strconv.Itoa(dirs[0])}, {"workdir", strconv.Itoa(dirs[1])},
	}, unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return -1, fmt.Errorf("root filesystem overlay (needs Linux 6.13 or later): %w", err)
	}
	return tree, nil
}

// The directories of a rootless sandbox's writable layer.
const (
	mountUpper = "upper"
	mountWork  = "work"
)

// fsMount makes a detached mount of fstype (fsopen, fsconfig, fsmount)
// with the string options opts and the descriptor options fds (decimal
// descriptors), and for overlay the lower layer lower (lowerdir+);
// userxattr is set for overlay.
func fsMount(fstype string, lower int, opts, fds [][2]string, attrs int) (int, error) {
	fsfd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", fstype, err)
	}
	defer unix.Close(fsfd)
	for _, o := range opts {
		if err := unix.FsconfigSetString(fsfd, o[0], o[1]); err != nil {
			return -1, fmt.Errorf("%s %s: %w", fstype, o[0], err)
		}
	}
	if fstype == "overlay" {
		if err := unix.FsconfigSetFd(fsfd, "lowerdir+", lower); err != nil {
			return -1, fmt.Errorf("overlay lowerdir: %w", err)
		}
		for _, o := range fds {
			fd, _ := strconv.Atoi(o[1])
			if err := unix.FsconfigSetFd(fsfd, o[0], fd); err != nil {
				return -1, fmt.Errorf("overlay %s: %w", o[0], err)
			}
		}
		if err := unix.FsconfigSetFlag(fsfd, "userxattr"); err != nil {
			return -1, fmt.Errorf("overlay userxattr: %w", err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("create %s: %w%s", fstype, err, image.FSLog(fsfd))
	}
	fd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return -1, fmt.Errorf("mount %s: %w", fstype, err)
	}
	return fd, nil
}

// loopbackUp brings up the network namespace's loopback.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring up loopback: %w", err)
	}
	return nil
}

// serveDial answers a "dial" request on conn, in a rootless sandbox's init:
// it connects to port inside the sandbox (the machine's address first,
// which listeners on it, on 0.0.0.0 and on [::] take; then 127.0.0.1 and
// [::1]) and sends
// the connected socket back, or an "error" message.
func serveDial(conn *net.UnixConn, port int) {
	if !inRootless {
		_ = writeMessage(conn, message{Op: "error", Err: "dial: not a rootless sandbox"})
		return
	}
	if port < 1 || port > 65535 {
		_ = writeMessage(conn, message{Op: "error", Err: fmt.Sprintf("dial: port %d", port)})
		return
	}
	var c net.Conn
	var err error
	for _, host := range []string{dialAddr, "127.0.0.1", "::1"} {
		c, err = net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), forwardDialTimeout)
		if err == nil {
			break
		}
	}
	if err != nil {
		_ = writeMessage(conn, message{Op: "error", Err: err.Error()})
		return
	}
	defer c.Close()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		_ = writeMessage(conn, message{Op: "error", Err: err.Error()})
		return
	}
	defer f.Close()
	_ = sendFiles(conn, []int{int(f.Fd())})
}

// probeArg is the init's argument for ProbeRootless's child.
const probeArg = "probe-rootless"

// ProbeRootless reports whether this kernel lets this user run rootless
// sandboxes: it starts initPath ("" for this program) as
// "sandbox-init probe-rootless <dir>" in new user (the caller mapped to
// root), mount, PID and network namespaces, where it mounts a tmpfs and an
// overlay over a directory made under dir, and brings up the loopback. The
// error says what failed.
func ProbeRootless(initPath, dir string) error {
	if initPath == "" {
		p, err := os.Executable()
		if err != nil {
			return fmt.Errorf("rootless probe: %w", err)
		}
		initPath = p
	}
	tmp, err := os.MkdirTemp(dir, "probe-")
	if err != nil {
		return fmt.Errorf("rootless probe: %w", err)
	}
	defer os.RemoveAll(tmp)
	lower := filepath.Join(tmp, "lower")
	if err := os.Mkdir(lower, 0o755); err != nil {
		return fmt.Errorf("rootless probe: %w", err)
	}
	if err := os.WriteFile(filepath.Join(lower, "probe"), []byte("ok"), 0o644); err != nil {
		return fmt.Errorf("rootless probe: %w", err)
	}
	var out bytes.Buffer
	cmd := exec.Command(initPath, InitCommand, probeArg, lower)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = []string{"GOMAXPROCS=1"}
	cmd.WaitDelay = time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  cloneFlags,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
		Pdeathsig:   unix.SIGKILL,
	}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if len(msg) > 512 {
			msg = msg[:512]
		}
		return fmt.Errorf("rootless sandboxes unavailable: %w: %s", err, msg)
	}
	return nil
}

// probeRootlessMain is the child of ProbeRootless.
func probeRootlessMain(lower string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fail(fmt.Errorf("make mounts private: %w", err))
	}
	fd, err := unix.Open(lower, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	tree, err := rootlessTree(fd, 1<<20)
	if err != nil {
		return fail(err)
	}
	defer unix.Close(tree)
	f, err := unix.Openat(tree, "probe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("read through the overlay: %w", err))
	}
	unix.Close(f)
	if err := loopbackUp(); err != nil {
		return fail(err)
	}
	return 0
}
