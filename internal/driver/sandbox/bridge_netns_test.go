package sandbox

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestTuneBridgeInNetnsOfItsOwn tunes a bridge from a thread in a network
// namespace of its own whose mounts are the machine's — as a `flame agent`
// started in a namespace without a mount namespace of its own runs: /sys
// shows the machine's links, not the namespace's, and the bridge is tuned
// all the same (no spanning tree, no forward delay).
func TestTuneBridgeInNetnsOfItsOwn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: network namespaces and bridges")
	}
	var b [3]byte
	rand.Read(b[:])
	name := "flt" + hex.EncodeToString(b[:])
	errc := make(chan error, 1)
	go func() {
		// The thread is left in the namespace and ends with the
		// goroutine, the namespace (and the bridge) with it.
		runtime.LockOSThread()
		errc <- func() error {
			ns, err := netns.New()
			if err != nil {
				return err
			}
			defer ns.Close()
			if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
				return err
			}
			br, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if _, err := os.Stat("/sys/class/net/" + name); err == nil {
				return fmt.Errorf("/sys/class/net/%s exists: /sys is this namespace's, the test proves nothing", name)
			}
			if err := (&Driver{}).tuneBridge(br); err != nil {
				return fmt.Errorf("tune: %w", err)
			}
			stp, delay, err := bridgeState(br.Attrs().Index)
			if err != nil {
				return err
			}
			if stp != 0 || delay != 0 {
				return fmt.Errorf("stp_state %d, forward_delay %d; want 0 and 0", stp, delay)
			}
			return nil
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// bridgeState reads a bridge's spanning tree state and forward delay by
// netlink.
func bridgeState(index int) (stp, delay uint32, err error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(index)
	req.AddData(msg)
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
	if err != nil || len(msgs) != 1 {
		return 0, 0, fmt.Errorf("get link %d: %v (%d answers)", index, err, len(msgs))
	}
	attrs, err := nl.ParseRouteAttr(msgs[0][unix.SizeofIfInfomsg:])
	if err != nil {
		return 0, 0, err
	}
	found := 0
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.IFLA_LINKINFO:
			info, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				return 0, 0, err
			}
			for _, i := range info {
				if i.Attr.Type != nl.IFLA_INFO_DATA {
					continue
				}
				data, err := nl.ParseRouteAttr(i.Value)
				if err != nil {
					return 0, 0, err
				}
				for _, d := range data {
					switch d.Attr.Type {
					case nl.IFLA_BR_STP_STATE:
						stp = binary.NativeEndian.Uint32(d.Value)
						found++
					case nl.IFLA_BR_FORWARD_DELAY:
						delay = binary.NativeEndian.Uint32(d.Value)
						found++
					}
				}
			}
		}
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("link %d: %d of the 2 attributes", index, found)
	}
	return stp, delay, nil
}
