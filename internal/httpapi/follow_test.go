package httpapi

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

func TestFollowsCount(t *testing.T) {
	f := NewFollows(FollowLimits{PerKey: 2, Total: 3, MaxDuration: time.Hour})
	ctx := context.Background()
	is429 := func(err error) bool {
		var ae *api.Error
		return errors.As(err, &ae) && ae.Status == http.StatusTooManyRequests
	}
	_, a1, err := f.Begin(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	_, a2, _ := f.Begin(ctx, "a")
	if _, _, err := f.Begin(ctx, "a"); !is429(err) {
		t.Fatalf("third of a key: %v", err)
	}
	_, anon, err := f.Begin(ctx, "")
	if err != nil {
		t.Fatalf("unkeyed: %v", err)
	}
	if _, _, err := f.Begin(ctx, "b"); !is429(err) {
		t.Fatalf("beyond the total: %v", err)
	}
	a1()
	a1() // twice is once
	if k, n := f.Active("a"); k != 1 || n != 2 {
		t.Fatalf("active %d/%d, want 1/2", k, n)
	}
	_, b1, err := f.Begin(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	a2()
	anon()
	b1()
	if k, n := f.Active("a"); k != 0 || n != 0 || len(f.by) != 0 {
		t.Fatalf("after all ended: %d/%d, %v", k, n, f.by)
	}
}

func TestFollowMaxDuration(t *testing.T) {
	f := NewFollows(FollowLimits{MaxDuration: time.Minute})
	ctx, done, err := f.Begin(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	dl, ok := ctx.Deadline()
	if !ok || time.Until(dl) > time.Minute {
		t.Fatalf("deadline %v %v", dl, ok)
	}
}
