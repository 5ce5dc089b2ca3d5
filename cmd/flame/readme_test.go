package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	mdns "github.com/miekg/dns"

	"github.com/flamehq/flame/api"
)

// TestReadmeExamples runs every command of README.md's ```sh blocks, as
// written, against `flame dev` on its default driver (as root: sandbox).
// The commands are read from the README itself, so an example that changes
// is tested as changed, and a command this test cannot run fails it. Only
// the addresses differ: flame dev listens on free ports here, so the
// README's 127.0.0.1:4280 (API and registry) and port 5300 (DNS) are
// replaced by the ones it printed. curl and dig are not needed: their
// command lines are parsed and carried out with Go's HTTP and DNS clients.
func TestReadmeExamples(t *testing.T) {
	if testing.Short() {
		t.Skip("runs flame dev and builds flame again (minutes)")
	}
	if os.Geteuid() != 0 {
		t.Skip("the README's default driver is the sandbox, which needs root")
	}
	blocks := readmeShellBlocks(t, "../../README.md")
	if len(blocks) == 0 {
		t.Fatal("README.md has no sh blocks")
	}
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}

	dev := startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0")
	// Stop it as a user would (Ctrl-C): a kill would leave the sandboxes.
	t.Cleanup(func() {
		dev.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-dev.done:
		case <-time.After(60 * time.Second):
			t.Error("flame dev did not exit on SIGINT")
		}
	})
	url := dev.apiURL(t)
	token := dev.token(t)
	adminToken := dev.waitLine(t, regexp.MustCompile(`^\s+Admin token\s+(\S+)`), "its admin token")
	hostRow := regexp.MustCompile(`^\s+[a-z]+-\d+\s+[a-z]+\s+https?://\S+\s+(\S+)$`)
	dnsAddr := dev.waitLine(t, hostRow, "its hosts")
	apiAddr := strings.TrimPrefix(url, "http://")
	_, dnsPort, _ := net.SplitHostPort(dnsAddr)
	if !strings.Contains(readmeText(t, "../../README.md"), "127.0.0.1:4280") {
		t.Fatal("README.md no longer names 127.0.0.1:4280: update the address mapping of this test")
	}
	// The regions' edges, in the order flame dev prints them; the README
	// names the defaults 4380, 4381, 4382 in the same order.
	edgeRow := regexp.MustCompile(`^\s+Edge\s+([a-z]+)\s+http://<app>\.localhost:(\d+)/`)
	edges := map[string]string{}
	for i, def := range []string{"4380", "4381", "4382"} {
		m := dev.waitMatch(t, edgeRow, fmt.Sprintf("the edge of region %d", i+1))
		edges["localhost:"+def] = "localhost:" + m[2]
	}
	// The regions' HTTPS edges (4390, 4391, 4392 in the README) and the
	// CA their certificates chain to.
	httpsRow := regexp.MustCompile(`^\s+HTTPS\s+([a-z]+)\s+https://<app>\.localhost:(\d+)/`)
	for i, def := range []string{"4390", "4391", "4392"} {
		m := dev.waitMatch(t, httpsRow, fmt.Sprintf("the HTTPS edge of region %d", i+1))
		edges["localhost:"+def] = "localhost:" + m[2]
	}
	caPath := dev.waitLine(t, regexp.MustCompile(`^\s+CA\s+(\S+)`), "its CA")
	// The global entry, which the README names at its default 4379.
	globalRow := regexp.MustCompile(`^\s+Global\s+http://<app>\.localhost:(\d+)/\s+\(client in ams\)`)
	global := "localhost:" + dev.waitLine(t, globalRow, "the global entry")
	edges["localhost:4379"] = global

	r := &readmeRunner{t: t, repo: repo, work: t.TempDir(), apiAddr: apiAddr, dnsPort: dnsPort, edges: edges, global: global,
		vars: map[string]string{}, placeholders: map[string]string{"<the token flame dev printed>": token, "<the admin token flame dev printed>": adminToken,
			"<the CA flame dev printed>": caPath}}
	// The demo app is deployed in the background; the README's first
	// commands list it, so let it be there, as it is for a user reading.
	c := api.NewClient(url, token)
	readmeWaitFor(t, 60*time.Second, "the demo app to run in every region, its checks passing", func() bool {
		ms, err := c.List(context.Background(), "demo", api.ListMachinesOptions{})
		started := 0
		for _, m := range ms {
			passing := true
			for _, c := range m.Checks {
				passing = passing && c.Status == "passing"
			}
			if m.State == api.StateStarted && passing {
				started++
			}
		}
		return err == nil && started == 3
	})
	for _, b := range blocks {
		for _, line := range b {
			r.run(line)
		}
	}
	for _, want := range []string{"created", "exec", "lease", "token minted", "tokens listed", "token revoked", "destroyed listed", "demo answered", "dns", "edge answered", "edge forced", "global answered", "global moved", "regions", "global failed over", "revived", "https answered"} {
		if !r.checked[want] {
			t.Errorf("the README's examples never reached the %q check", want)
		}
	}
}

// readmeShellBlocks returns the commands of every ```sh block: lines with
// their continuations joined, comments and blank lines left out.
func readmeShellBlocks(t *testing.T, path string) [][]string {
	t.Helper()
	var blocks [][]string
	var cur []string
	in, pending := false, ""
	for _, line := range strings.Split(readmeText(t, path), "\n") {
		switch {
		case !in && strings.TrimSpace(line) == "```sh":
			in, cur = true, nil
			continue
		case in && strings.TrimSpace(line) == "```":
			in = false
			blocks = append(blocks, cur)
			continue
		case !in:
			continue
		}
		if s, ok := strings.CutSuffix(line, `\`); ok {
			pending += s
			continue
		}
		line, pending = pending+line, ""
		if words := readmeWords(t, line, nil); len(words) > 0 {
			cur = append(cur, line)
		}
	}
	if in {
		t.Fatalf("%s: unterminated sh block", path)
	}
	return blocks
}

func readmeText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func readmeWaitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// readmeWords splits a command line as sh would for the README's commands:
// words separated by blanks, '…' literal, "…" with $VAR expanded (and \" \\
// \$ escaped), $VAR and ${VAR} expanded outside quotes, && as a word of its
// own, and # starting a comment at the beginning of a word. vars nil
// leaves variables unexpanded (for counting words only).
func readmeWords(t *testing.T, line string, vars map[string]string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	inWord := false
	expand := func(rs []rune, i int) int { // at '$'; returns the index after the name
		j := i + 1
		braced := j < len(rs) && rs[j] == '{'
		if braced {
			j++
		}
		k := j
		for k < len(rs) && (rs[k] == '_' || rs[k] >= 'A' && rs[k] <= 'Z' || rs[k] >= 'a' && rs[k] <= 'z' || k > j && rs[k] >= '0' && rs[k] <= '9') {
			k++
		}
		if k == j {
			w.WriteRune('$')
			return i + 1
		}
		name := string(rs[j:k])
		if braced {
			if k >= len(rs) || rs[k] != '}' {
				t.Fatalf("unterminated ${ in %q", line)
			}
			k++
		}
		if vars == nil {
			w.WriteString("$" + name)
		} else if v, ok := vars[name]; ok {
			w.WriteString(v)
		} else {
			t.Fatalf("README command uses $%s, which no earlier example sets: %q", name, line)
		}
		return k
	}
	rs := []rune(line)
	for i := 0; i < len(rs); {
		c := rs[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				words, inWord = append(words, w.String()), false
				w.Reset()
			}
			i++
		case c == '#' && !inWord:
			i = len(rs)
		case c == '&' && !inWord && i+1 < len(rs) && rs[i+1] == '&':
			words = append(words, "&&")
			i += 2
		case c == '\'':
			inWord = true
			j := i + 1
			for j < len(rs) && rs[j] != '\'' {
				j++
			}
			if j >= len(rs) {
				t.Fatalf("unterminated ' in %q", line)
			}
			w.WriteString(string(rs[i+1 : j]))
			i = j + 1
		case c == '"':
			inWord = true
			i++
			for ; i < len(rs) && rs[i] != '"'; i++ {
				switch {
				case rs[i] == '\\' && i+1 < len(rs) && strings.ContainsRune(`"\$`, rs[i+1]):
					w.WriteRune(rs[i+1])
					i++
				case rs[i] == '$':
					i = expand(rs, i) - 1
				default:
					w.WriteRune(rs[i])
				}
			}
			if i >= len(rs) {
				t.Fatalf(`unterminated " in %q`, line)
			}
			i++
		case c == '$':
			inWord = true
			i = expand(rs, i)
		case c == '\\' && i+1 < len(rs):
			inWord = true
			w.WriteRune(rs[i+1])
			i += 2
		case strings.ContainsRune("|;`()", c):
			t.Fatalf("README command uses %q, which this test does not run: %q", c, line)
		default:
			inWord = true
			w.WriteRune(c)
			i++
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// readmeRunner carries out the README's commands in order, keeping the
// shell's variables and what earlier answers said.
type readmeRunner struct {
	t                *testing.T
	repo, work       string
	apiAddr, dnsPort string
	edges            map[string]string // README's "localhost:<default port>" → flame dev's
	global           string            // the global entry, "localhost:<port>"
	vars             map[string]string
	placeholders     map[string]string // "<…>" in the README → its value
	id, destroyed    string
	minted           string // the secret of the token the README mints
	killed           string // the region flame chaos killed, until revived
	checked          map[string]bool
}

var (
	readmeAssignment  = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)=(.*)$`)
	readmePlaceholder = regexp.MustCompile(`<[^<>]*>`)
)

func (r *readmeRunner) run(line string) {
	t := r.t
	t.Helper()
	raw := line
	line = strings.ReplaceAll(line, "127.0.0.1:4280", r.apiAddr)
	for k, v := range r.edges {
		line = strings.ReplaceAll(line, k, v)
	}
	for k, v := range r.placeholders {
		line = strings.ReplaceAll(line, k, v)
	}
	words := readmeWords(t, line, r.vars)
	for _, w := range words {
		if m := readmePlaceholder.FindString(w); m != "" {
			t.Fatalf("README command %q: no value for %s at this point", raw, m)
		}
	}
	for len(words) > 0 {
		cmd := words
		rest := []string(nil)
		for i, w := range words {
			if w == "&&" {
				cmd, rest = words[:i], words[i+1:]
				break
			}
		}
		r.command(raw, cmd)
		words = rest
	}
}

func (r *readmeRunner) command(raw string, words []string) {
	t := r.t
	t.Helper()
	env := map[string]string{}
	for len(words) > 0 {
		m := readmeAssignment.FindStringSubmatch(words[0])
		if m == nil {
			break
		}
		env[m[1]] = m[2]
		words = words[1:]
	}
	if len(words) == 0 { // NAME=value: a shell variable
		for k, v := range env {
			r.vars[k] = v
		}
		return
	}
	t.Logf("README: %s", strings.Join(words, " "))
	switch {
	case words[0] == "export":
		for _, w := range words[1:] {
			m := readmeAssignment.FindStringSubmatch(w)
			if m == nil {
				t.Fatalf("README command %q: export of %q", raw, w)
			}
			r.vars[m[1]] = m[2]
		}
	case words[0] == "curl":
		r.curl(raw, words[1:])
	case words[0] == "dig":
		r.dig(raw, words[1:])
	case words[0] == "mkdir" && len(words) == 2:
		if err := os.Mkdir(filepath.Join(r.work, words[1]), 0o755); err != nil {
			t.Fatalf("README command %q: %v", raw, err)
		}
	case len(words) >= 3 && words[0] == "go" && words[1] == "run" && words[2] == "./cmd/flame":
		r.flame(raw, words[3:])
	case len(words) >= 2 && words[0] == "go" && words[1] == "build":
		// From the repository (./cmd/flame), into the working directory.
		args := append([]string(nil), words[1:]...)
		for i := range args {
			if args[i] == "-o" && i+1 < len(args) && !filepath.IsAbs(args[i+1]) {
				args[i+1] = filepath.Join(r.work, args[i+1])
			}
		}
		r.exec(raw, r.repo, env, "go", args...)
	case strings.Join(words, " ") == "go test ./...":
		// The test suite this test is part of.
	default:
		t.Fatalf("README command %q: this test does not know how to run it", raw)
	}
}

// flame runs `go run ./cmd/flame …` as the flame binary built for these
// tests (the same source).
func (r *readmeRunner) flame(raw string, args []string) {
	t := r.t
	t.Helper()
	switch {
	case len(args) >= 1 && args[0] == "dev":
		return // the flame dev this test started
	case len(args) >= 1 && args[0] == "image":
		args = append(args, "--registry", r.apiAddr)
		for _, a := range args {
			if a == "./nginx.tar" {
				readmeImageTarball(t, filepath.Join(r.work, "nginx.tar"))
			}
		}
		r.exec(raw, r.work, nil, flameBin, args...)
	case len(args) >= 2 && args[0] == "chaos":
		r.exec(raw, r.work, nil, flameBin, append(args, "--api", "http://"+r.apiAddr)...)
		switch {
		case args[1] == "kill-region" && len(args) == 3:
			r.killed = args[2]
		case args[1] == "revive" && len(args) == 3 && args[2] == r.killed:
			r.killed = ""
			r.checked["revived"] = true
		}
	default:
		t.Fatalf("README command %q: this test does not know how to run it", raw)
	}
}

// readmeImageTarball writes a small image as `docker save` would, for the
// README's import of a tarball the reader brings.
func readmeImageTarball(t *testing.T, path string) {
	t.Helper()
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag("nginx:1.27")
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		t.Fatal(err)
	}
}

func (r *readmeRunner) exec(raw, dir string, env map[string]string, prog string, args ...string) {
	t := r.t
	t.Helper()
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	cmd.Env = os.Environ()
	for k, v := range r.vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("README command %q: %v", raw, err)
	}
}

// curl carries out a curl command line: -s, -H, -X, -d and a URL, as curl
// does (-d alone makes a POST with a form content type).
func (r *readmeRunner) curl(raw string, args []string) {
	t := r.t
	t.Helper()
	method, target, data, cacert := "", "", (*string)(nil), ""
	header := http.Header{}
	for i := 0; i < len(args); i++ {
		arg := func() string {
			if i+1 >= len(args) {
				t.Fatalf("README command %q: %s without a value", raw, args[i])
			}
			i++
			return args[i]
		}
		switch a := args[i]; {
		case a == "-s":
		case a == "-H":
			k, v, ok := strings.Cut(arg(), ":")
			if !ok {
				t.Fatalf("README command %q: header %q", raw, args[i])
			}
			header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
		case a == "-X":
			method = arg()
		case a == "-d":
			d := arg()
			data = &d
		case a == "--cacert":
			cacert = arg()
		case strings.HasPrefix(a, "-"):
			t.Fatalf("README command %q: curl option %s is not handled by this test", raw, a)
		case target != "":
			t.Fatalf("README command %q: two URLs", raw)
		default:
			target = a
		}
	}
	var body io.Reader
	if data != nil {
		body = strings.NewReader(*data)
		if method == "" {
			method = "POST"
		}
		if header.Get("Content-Type") == "" {
			header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
	}
	if method == "" {
		method = "GET"
	}
	req, err := http.NewRequest(method, target, body)
	if err != nil {
		t.Fatalf("README command %q: %v", raw, err)
	}
	req.Header = header
	var resp *http.Response
	// The machine's own address answers once its program listens, a
	// moment after it started; nothing else is retried.
	retry := strings.Contains(target, "://[")
	client := readmeHTTP
	if cacert != "" {
		client = readmeHTTPS(t, raw, cacert)
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err = client.Do(req)
		var op *net.OpError
		if err == nil || !retry || !errors.As(err, &op) || time.Now().After(end) {
			break
		}
	}
	if err != nil {
		t.Fatalf("README command %q: %v", raw, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	t.Logf("→ %d %s", resp.StatusCode, bytes.TrimSpace(b))
	if resp.StatusCode/100 != 2 {
		t.Fatalf("README command %q answered %d: %s", raw, resp.StatusCode, b)
	}
	if strings.HasPrefix(target, "https://") {
		// curl speaks HTTP/2 over TLS when the server offers it.
		if resp.TLS == nil || resp.ProtoMajor != 2 {
			t.Fatalf("README command %q: answered over HTTP/%d, TLS %v", raw, resp.ProtoMajor, resp.TLS != nil)
		}
		if r.checked == nil {
			r.checked = map[string]bool{}
		}
		r.checked["https answered"] = true
	}
	r.checkAnswer(raw, method, target, header, b)
}

// readmeHTTP is curl's HTTP: names under localhost are loopback, as curl
// (and browsers) resolve them without asking DNS.
var readmeHTTP = &http.Client{Transport: &http.Transport{
	DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		if host, port, err := net.SplitHostPort(addr); err == nil && strings.HasSuffix(host, ".localhost") {
			addr = net.JoinHostPort("127.0.0.1", port)
		}
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	},
}}

// readmeHTTPS is curl --cacert: readmeHTTP trusting the CA in file.
func readmeHTTPS(t *testing.T, raw, file string) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("README command %q: %v", raw, err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("README command %q: no certificate in %s", raw, file)
	}
	tr := readmeHTTP.Transport.(*http.Transport).Clone()
	tr.TLSClientConfig, tr.ForceAttemptHTTP2 = &tls.Config{RootCAs: roots}, true
	return &http.Client{Transport: tr}
}

// checkAnswer remembers what later commands refer to, and checks what the
// README promises of some answers beyond their status.
func (r *readmeRunner) checkAnswer(raw, method, target string, header http.Header, b []byte) {
	t := r.t
	t.Helper()
	if r.checked == nil {
		r.checked = map[string]bool{}
	}
	machines := r.vars["API"]
	switch {
	case strings.HasSuffix(target, "/v1/tokens") || strings.Contains(target, "/v1/tokens/"):
		r.checkTokens(raw, method, target, header, b)
		return
	case method == "POST" && target == machines && r.id == "":
		var m api.Machine
		if err := json.Unmarshal(b, &m); err != nil || m.ID == "" || m.PrivateIP == "" {
			t.Fatalf("README command %q: the answer is not a machine with an address: %s", raw, b)
		}
		r.id = m.ID
		r.placeholders["<id>"] = m.ID
		r.placeholders["<private_ip from the answer>"] = m.PrivateIP
		r.checked["created"] = true
	case strings.HasSuffix(target, "/exec"):
		var e api.ExecResponse
		if err := json.Unmarshal(b, &e); err != nil || e.ExitCode != 0 {
			t.Fatalf("README command %q: exec answered %s", raw, b)
		}
		r.checked["exec"] = true
	case strings.HasSuffix(target, "/lease") && method == "POST":
		var l api.Lease
		if err := json.Unmarshal(b, &l); err != nil || l.Data == nil || l.Data.Nonce == "" {
			t.Fatalf("README command %q: lease answered %s", raw, b)
		}
		r.placeholders["<nonce from the lease answer>"] = l.Data.Nonce
		r.checked["lease"] = true
	case method == "DELETE" && r.id != "" && strings.HasPrefix(target, machines+"/"+r.id):
		r.destroyed = r.id
	case strings.Contains(target, "include_deleted=true"):
		var ms []*api.Machine
		if err := json.Unmarshal(b, &ms); err != nil {
			t.Fatalf("README command %q: %v", raw, err)
		}
		found := false
		for _, m := range ms {
			found = found || m.ID == r.destroyed && m.State == api.StateDestroyed
		}
		if r.destroyed == "" || !found {
			t.Fatalf("README command %q: the destroyed machine %q is not listed: %s", raw, r.destroyed, b)
		}
		r.checked["destroyed listed"] = true
	case strings.Contains(target, "."+r.global+"/"):
		// Through the global entry: the edge nearest to the client (ams
		// by default, the header's region otherwise) and, the demo app
		// running in every region, a machine of that region answers.
		var who map[string]any
		if err := json.Unmarshal(b, &who); err != nil || flyVar(who, "FLY_APP_NAME") != "demo" {
			t.Fatalf("README command %q: the global entry answered %s", raw, b)
		}
		want, check := "ams", "global answered"
		if h := header.Get("flame-client-region"); h != "" {
			want, check = h, "global moved"
		}
		if want == r.killed {
			// The next nearest edge (iad) takes the request; a machine of
			// any live region answers it.
			req, _ := who["request"].(map[string]any)
			hdr, _ := req["headers"].(map[string]any)
			if edge, _ := hdr["Fly-Region"].(string); edge != "iad" || flyVar(who, "FLY_REGION") == r.killed {
				t.Fatalf("README command %q: with %s killed, answered through the %q edge from %q", raw, r.killed, edge, flyVar(who, "FLY_REGION"))
			}
			r.checked["global failed over"] = true
			return
		}
		if got := flyVar(who, "FLY_REGION"); got != want {
			t.Fatalf("README command %q: answered from %q, want the client's nearest region %q", raw, got, want)
		}
		r.checked[check] = true
	case strings.HasSuffix(target, "/v1/platform/regions"):
		var regs api.RegionsResponse
		if err := json.Unmarshal(b, &regs); err != nil || regs.Global == "" || len(regs.Regions) != 3 {
			t.Fatalf("README command %q: the regions and the global entry are not listed: %s", raw, b)
		}
		for _, reg := range regs.Regions {
			if reg.Edge == "" {
				t.Fatalf("README command %q: region %s lists no edge: %s", raw, reg.Code, b)
			}
		}
		r.checked["regions"] = true
	case strings.Contains(target, ".localhost:"):
		// Through an edge: the demo app answers with where it runs.
		var who map[string]any
		if err := json.Unmarshal(b, &who); err != nil || flyVar(who, "FLY_APP_NAME") != "demo" {
			t.Fatalf("README command %q: the edge answered %s", raw, b)
		}
		if want := header.Get("fly-force-region"); want != "" {
			if got := flyVar(who, "FLY_REGION"); got != want {
				t.Fatalf("README command %q: answered from %q, not the forced %q", raw, got, want)
			}
			r.checked["edge forced"] = true
		} else if got := flyVar(who, "FLY_REGION"); got != "ams" {
			t.Fatalf("README command %q: the ams edge answered from %q, not its own region", raw, got)
		} else {
			r.checked["edge answered"] = true
		}
	case strings.Contains(target, "://["):
		var who map[string]any
		if err := json.Unmarshal(b, &who); err != nil || flyVar(who, "FLY_MACHINE_ID") != r.id {
			t.Fatalf("README command %q: the demo app answered %s", raw, b)
		}
		r.checked["demo answered"] = true
	}
}

// dig carries out `dig @server -p port TYPE name` with Go's DNS client; the
// answer must hold at least one record. Gossip brings a new machine to
// every host within a second or so; a few seconds are allowed.
func (r *readmeRunner) dig(raw string, args []string) {
	t := r.t
	t.Helper()
	server, port, qtype, qname := "", "53", uint16(0), ""
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case strings.HasPrefix(a, "@"):
			server = a[1:]
		case a == "-p" && i+1 < len(args):
			i++
			port = args[i]
			if port == "5300" {
				port = r.dnsPort
			}
		case mdns.StringToType[a] != 0:
			qtype = mdns.StringToType[a]
		case strings.HasPrefix(a, "-") || strings.HasPrefix(a, "+"):
			t.Fatalf("README command %q: dig option %s is not handled by this test", raw, a)
		default:
			qname = a
		}
	}
	if server == "" || qtype == 0 || qname == "" {
		t.Fatalf("README command %q: want @server, a type and a name", raw)
	}
	var answer *mdns.Msg
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		q := new(mdns.Msg)
		q.SetQuestion(mdns.Fqdn(qname), qtype)
		a, _, err := new(mdns.Client).Exchange(q, net.JoinHostPort(server, port))
		if err == nil && a.Rcode == mdns.RcodeSuccess && len(a.Answer) > 0 {
			answer = a
			break
		}
		if time.Now().After(end) {
			t.Fatalf("README command %q: %v %v", raw, err, a)
		}
	}
	for _, rr := range answer.Answer {
		t.Logf("→ %s", rr)
	}
	if r.checked == nil {
		r.checked = map[string]bool{}
	}
	r.checked["dns"] = true
}

// checkTokens follows the README's token examples: the minted token works
// and expires in an hour, the list shows it without a secret, and once
// revoked it is refused.
func (r *readmeRunner) checkTokens(raw, method, target string, header http.Header, b []byte) {
	t := r.t
	t.Helper()
	switch method {
	case "POST":
		var tok api.Token
		if err := json.Unmarshal(b, &tok); err != nil || tok.Token == "" || tok.ID == "" || tok.ExpiresAt == "" {
			t.Fatalf("README command %q: not an expiring token: %s", raw, b)
		}
		if _, err := api.NewClient(strings.TrimSuffix(target, "/v1/tokens"), tok.Token).ListApps(context.Background(), "personal"); err != nil {
			t.Fatalf("README command %q: the minted token does not work: %v", raw, err)
		}
		r.placeholders["<id from the token answer>"] = tok.ID
		r.minted = tok.Token
		r.checked["token minted"] = true
	case "GET":
		var l api.ListTokensResponse
		if err := json.Unmarshal(b, &l); err != nil {
			t.Fatalf("README command %q: %v", raw, err)
		}
		id := r.placeholders["<id from the token answer>"]
		found := false
		for _, ti := range l.Tokens {
			found = found || ti.ID == id && ti.ExpiresAt != ""
		}
		if !found || bytes.Contains(b, []byte(r.minted)) || bytes.Contains(b, []byte(`"token"`)) {
			t.Fatalf("README command %q: the list misses the token %s or shows a secret: %s", raw, id, b)
		}
		r.checked["tokens listed"] = true
	case "DELETE":
		base, _, _ := strings.Cut(target, "/v1/tokens/")
		_, err := api.NewClient(base, r.minted).ListApps(context.Background(), "personal")
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized {
			t.Fatalf("README command %q: the revoked token answered %v, want 401", raw, err)
		}
		r.checked["token revoked"] = true
	}
}
