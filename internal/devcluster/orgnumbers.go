package devcluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"

	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// A cluster without a control plane has nobody to number its orgs for the
// private network, and a host numbering the orgs it sees by itself gives
// the first org it sees 1 whatever it is: org a on one host and org b on
// another would share number 1, and their machines one network across the
// mesh. So the dev cluster numbers orgs once for all its hosts: a counter
// and a table kept in its directory (org-numbers.json), an org's number
// never changing and never given to another. A number is a counter's
// value, not a hash of the name, so two orgs can never meet on one.

// orgNumbersFile holds the numbering in the cluster's directory.
const orgNumbersFile = "org-numbers.json"

// orgNumbers is the cluster's org numbering (agent.OrgNumbering).
type orgNumbers struct {
	path string

	mu   sync.Mutex
	orgs map[string]layout.Org
	last layout.Org
}

type orgNumbersState struct {
	Last layout.Org            `json:"last"`
	Orgs map[string]layout.Org `json:"orgs"`
}

// loadOrgNumbers reads the numbering kept in dir, or starts one.
func loadOrgNumbers(dir string) (*orgNumbers, error) {
	n := &orgNumbers{path: filepath.Join(dir, orgNumbersFile), orgs: map[string]layout.Org{}}
	b, err := os.ReadFile(n.path)
	if errors.Is(err, os.ErrNotExist) {
		return n, nil
	}
	if err != nil {
		return nil, fmt.Errorf("org numbers: %w", err)
	}
	var st orgNumbersState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("org numbers: %s: %w", n.path, err)
	}
	seen := map[layout.Org]string{}
	for slug, o := range st.Orgs {
		if o == 0 || o > st.Last {
			return nil, fmt.Errorf("org numbers: %s: org %q has %d, past the last given (%d)", n.path, slug, o, st.Last)
		}
		if other, dup := seen[o]; dup {
			return nil, fmt.Errorf("org numbers: %s: orgs %q and %q share %d", n.path, slug, other, o)
		}
		seen[o] = slug
		n.orgs[slug] = o
	}
	n.last = st.Last
	return n, nil
}

// OrgNumber returns slug's number, giving it the next one, kept on disk
// before it is answered, on first use.
func (n *orgNumbers) OrgNumber(slug string) (layout.Org, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if o, ok := n.orgs[slug]; ok {
		return o, nil
	}
	if n.last == math.MaxUint16 {
		return 0, errors.New("every org number of the cluster is taken")
	}
	o := n.last + 1
	st := orgNumbersState{Last: o, Orgs: make(map[string]layout.Org, len(n.orgs)+1)}
	for k, v := range n.orgs {
		st.Orgs[k] = v
	}
	st.Orgs[slug] = o
	b, err := json.Marshal(st)
	if err != nil {
		return 0, err
	}
	if err := atomicfile.Write(n.path, b, ""); err != nil {
		return 0, fmt.Errorf("keep org numbers: %w", err)
	}
	n.orgs[slug], n.last = o, o
	return o, nil
}
