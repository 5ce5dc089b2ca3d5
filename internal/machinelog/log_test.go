package machinelog

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func start(t *testing.T, cfg Config) *Log {
	t.Helper()
	l, err := New(cfg, slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// appender writes to path as a workload does: through its own O_APPEND fd.
func appender(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func texts(lines []Line) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = l.Text
	}
	return out
}

// follow streams l's lines (from the last n) into a channel.
func follow(t *testing.T, l *Log, n int) <-chan Line {
	ch := make(chan Line, 10000)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Follow(ctx, n, func(line Line) error { ch <- line; return nil })
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ch
}

func receive(t *testing.T, ch <-chan Line, want ...string) {
	t.Helper()
	for _, w := range want {
		select {
		case line := <-ch:
			if line.Text != w {
				t.Fatalf("got line %q, want %q", line.Text, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no line %q", w)
		}
	}
}

// eventually polls cond until it holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestTailLoadsExistingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("one\ntwo\r\nthree\nfour\nfive\nhal"), 0o644); err != nil {
		t.Fatal(err)
	}
	mtime := time.Now().Add(-time.Hour).Truncate(time.Second)
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	l := start(t, Config{Path: path, Lines: 3, Poll: time.Hour})
	got := l.Tail(0)
	if !slices.Equal(texts(got), []string{"three", "four", "five"}) {
		t.Fatalf("tail = %q", texts(got))
	}
	for _, line := range got {
		if !line.Time.Equal(mtime) {
			t.Fatalf("old line time %v, want mtime %v", line.Time, mtime)
		}
	}
	if got := texts(l.Tail(2)); !slices.Equal(got, []string{"four", "five"}) {
		t.Fatalf("tail 2 = %q", got)
	}

	ch := follow(t, l, 0)
	receive(t, ch, "three", "four", "five")
	w := appender(t, path)
	t0 := time.Now()
	fmt.Fprint(w, "f-done\nsix")
	receive(t, ch, "half-done")
	line := l.Tail(1)[0]
	if line.Time.Before(t0) {
		t.Fatalf("new line time %v before it was written", line.Time)
	}
	fmt.Fprint(w, "\n")
	receive(t, ch, "six")
	if got := texts(l.Tail(0)); !slices.Equal(got, []string{"five", "half-done", "six"}) {
		t.Fatalf("tail = %q", got)
	}
}

func TestLoadLongFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	var b strings.Builder
	for i := range 20000 {
		fmt.Fprintf(&b, "line %d %s\n", i, strings.Repeat("x", i%50))
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	l := start(t, Config{Path: path, Lines: 5000, MaxBytes: -1, Poll: time.Hour})
	got := l.Tail(0)
	if len(got) != 5000 || !strings.HasPrefix(got[0].Text, "line 15000 ") || !strings.HasPrefix(got[4999].Text, "line 19999 ") {
		t.Fatalf("tail has %d lines, %q .. %q", len(got), got[0].Text, got[len(got)-1].Text)
	}
}

func TestFollowSeesAppendsFromAnotherWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	// An hour-long poll: only change notices can deliver these in time.
	l := start(t, Config{Path: path, Poll: time.Hour})
	ch := follow(t, l, 0)
	w := appender(t, path)
	var worst time.Duration
	for i := range 20 {
		t0 := time.Now()
		fmt.Fprintf(w, "line %d\n", i)
		receive(t, ch, fmt.Sprintf("line %d", i))
		worst = max(worst, time.Since(t0))
	}
	t.Logf("slowest line took %v to reach a follower", worst)
}

func TestFollowLosesNothingBetweenTailAndStream(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	l := start(t, Config{Path: path, Lines: 10000, Poll: time.Hour})
	w := appender(t, path)
	const n = 2000
	go func() {
		for i := range n {
			fmt.Fprintf(w, "%d\n", i)
		}
	}()
	// Subscribe while the writer is busy.
	eventually(t, "some lines", func() bool { return len(l.Tail(0)) > 0 })
	ch := follow(t, l, 0)
	for i := range n {
		receive(t, ch, fmt.Sprint(i))
	}
}

func TestReopenAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	l1 := start(t, Config{Path: path, Poll: time.Hour})
	w := appender(t, path)
	fmt.Fprint(w, "a\nb\n")
	eventually(t, "two lines", func() bool { return len(l1.Tail(0)) == 2 })
	l1.Close()
	fmt.Fprint(w, "c\n") // written while no Log runs

	l2 := start(t, Config{Path: path, Poll: time.Hour})
	if got := texts(l2.Tail(0)); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("tail after restart = %q", got)
	}
	ch := follow(t, l2, 0)
	fmt.Fprint(w, "d\n")
	receive(t, ch, "a", "b", "c", "d")
}

func TestRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	l := start(t, Config{Path: path, MaxBytes: 1000, Poll: time.Hour})
	ch := follow(t, l, 0)
	w := appender(t, path)
	var want []string
	var batch strings.Builder
	for i := range 200 { // 1800 bytes: one rotation
		s := fmt.Sprintf("line %03d", i) // 9 bytes with its newline
		want = append(want, s)
		fmt.Fprintln(&batch, s)
	}
	// The first 1080 bytes in one write, so that the rotation they cause
	// cannot race with the writer (see the package doc).
	first := strings.Join(want[:120], "\n") + "\n"
	w.WriteString(first)
	receive(t, ch, want[:120]...)
	eventually(t, "rotation", func() bool {
		fi, err := os.Stat(path)
		return err == nil && fi.Size() == 0
	})
	w.WriteString(batch.String()[len(first):])
	receive(t, ch, want[120:]...)
	rotated, err := os.ReadFile(path + ".1")
	if err != nil {
		t.Fatal(err)
	}
	current, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Every byte is in one of the two files, in order.
	got := strings.Split(strings.TrimSuffix(string(rotated)+string(current), "\n"), "\n")
	if !slices.Equal(got, want) {
		t.Fatalf("files hold %d lines %q..., want %d", len(got), got[:min(3, len(got))], len(want))
	}
	// The workload's fd keeps working after the truncation.
	fmt.Fprintln(w, "after")
	receive(t, ch, "after")
	eventually(t, "line after rotation in the file", func() bool {
		b, _ := os.ReadFile(path)
		return strings.HasSuffix(string(b), "after\n") && len(b) < 1000
	})
	if _, err := os.Stat(path + ".1.tmp"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left: %v", err)
	}
}

func TestReplacedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	l := start(t, Config{Path: path, Poll: time.Hour})
	ch := follow(t, l, 0)
	fmt.Fprint(appender(t, path), "old\n")
	receive(t, ch, "old")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(appender(t, path), "new\n")
	receive(t, ch, "new")
}

func TestCloseEndsEverything(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	before := runtime.NumGoroutine()
	l, err := New(Config{Path: path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := l.Start(ctx); err != nil {
		t.Fatal(err)
	}
	followed := make(chan error)
	go func() {
		followed <- l.Follow(context.Background(), 0, func(Line) error { return nil })
	}()
	l.Close()
	l.Close()
	if err := <-followed; err != nil {
		t.Fatalf("follow after close: %v", err)
	}
	eventually(t, "goroutines gone", func() bool { return runtime.NumGoroutine() <= before })

	// A ctx that ends stops the Log too.
	l2, _ := New(Config{Path: path}, nil)
	ctx2, cancel2 := context.WithCancel(context.Background())
	if err := l2.Start(ctx2); err != nil {
		t.Fatal(err)
	}
	cancel2()
	if err := l2.Follow(context.Background(), 0, func(Line) error { return nil }); err != nil {
		t.Fatalf("follow after ctx ended: %v", err)
	}
	l2.Close()
	eventually(t, "goroutines gone", func() bool { return runtime.NumGoroutine() <= before })
	if err := l2.Start(context.Background()); err == nil {
		t.Fatal("restart of a closed log succeeded")
	}
}

func TestFollowOnlyNewLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("a\nb\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l := start(t, Config{Path: path, Poll: time.Hour})
	ch := follow(t, l, -1)
	// The follower subscribes at some point; keep writing until it sees
	// a line, which must be a new one.
	w := appender(t, path)
	for i := 0; ; i++ {
		fmt.Fprintf(w, "new %d\n", i)
		select {
		case line := <-ch:
			if !strings.HasPrefix(line.Text, "new ") {
				t.Fatalf("follower got old line %q", line.Text)
			}
			return
		case <-time.After(10 * time.Millisecond):
		}
		if i > 1000 {
			t.Fatal("follower got nothing")
		}
	}
}

func TestFollowStopsOnEmitError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("a\nb\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l := start(t, Config{Path: path, Poll: time.Hour})
	boom := fmt.Errorf("boom")
	var got []string
	err := l.Follow(context.Background(), 0, func(line Line) error {
		got = append(got, line.Text)
		return boom
	})
	if err != boom || !slices.Equal(got, []string{"a"}) {
		t.Fatalf("follow = %v, %q", err, got)
	}
}

func TestConfig(t *testing.T) {
	for _, cfg := range []Config{{}, {Path: "x", Lines: -1}, {Path: "x", Poll: -1}} {
		if _, err := New(cfg, nil); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		partial, data string
		lines         []string
		rest          string
	}{
		{"", "", nil, ""},
		{"", "a\nb", []string{"a"}, "b"},
		{"ha", "lf\n\nx\r\n", []string{"hal", "f", "", "x"}, ""},
		{"", "abcdefg", []string{"abc", "def"}, "g"},
		{"ab", "cdefg\nh", []string{"abc", "def", "g"}, "h"},
	} {
		lines, rest := split([]byte(tc.partial), []byte(tc.data), 3)
		if !slices.Equal(lines, tc.lines) || string(rest) != tc.rest {
			t.Errorf("split(%q, %q) = %q, %q; want %q, %q", tc.partial, tc.data, lines, rest, tc.lines, tc.rest)
		}
	}
}

func FuzzSplit(f *testing.F) {
	f.Add([]byte("par"), []byte("tial\nline\nrest"))
	f.Fuzz(func(t *testing.T, partial, data []byte) {
		const maxLen = 8
		lines, rest := split(slices.Clone(partial), data, maxLen)
		if len(rest) > maxLen {
			t.Fatalf("rest %q longer than %d", rest, maxLen)
		}
		for _, l := range lines {
			if len(l) > maxLen {
				t.Fatalf("line %q longer than %d", l, maxLen)
			}
		}
	})
}
