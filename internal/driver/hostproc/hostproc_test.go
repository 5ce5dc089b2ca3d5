package hostproc

import (
	"os"
	"testing"
)

func TestParseStat(t *testing.T) {
	line := "4242 (we)ird (name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615\n"
	st, err := ParseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.State != 'S' || st.Pgrp != 4242 || st.Start != 987654 {
		t.Fatalf("parsed %+v", st)
	}
	self, err := ReadStat(os.Getpid())
	if err != nil || self.Start == 0 {
		t.Fatalf("own stat = %+v, %v", self, err)
	}
	if _, err := ParseStat([]byte("1 (x) S 1")); err == nil {
		t.Fatal("short stat parsed")
	}
}

func FuzzParseHandle(f *testing.F) {
	f.Add("123:456:0e29b6a7-020e-42d6-95bb-88d94992265a")
	f.Add("1:2:")
	f.Add("::")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseHandle(s)
		if err != nil {
			return
		}
		h2, err := ParseHandle(h.String())
		if err != nil || h2 != h {
			t.Fatalf("round trip of %q: %+v %v, want %+v", s, h2, err, h)
		}
	})
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte("4242 (sh) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ParseStat(b)
	})
}
