package sqlretrytest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry/sqlretrytest"
)

func TestClockSleepWaitsForAdvance(t *testing.T) {
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c := sqlretrytest.NewClock(start)
	done := make(chan error, 1)
	go func() { done <- c.Sleep(context.Background(), time.Second) }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitForSleepers(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c.Advance(999 * time.Millisecond)
	select {
	case <-done:
		t.Fatal("Sleep returned before its time")
	case <-time.After(20 * time.Millisecond):
	}
	c.Advance(time.Millisecond)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := c.Now(); !got.Equal(start.Add(time.Second)) {
		t.Errorf("now %v", got)
	}
	if c.Sleepers() != 0 {
		t.Error("a sleeper left behind")
	}
}

func TestClockSleepEndsWithContext(t *testing.T) {
	c := sqlretrytest.NewClock(time.Time{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Sleep(ctx, time.Hour) }()
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	if err := c.WaitForSleepers(wctx, 1); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep returned %v", err)
	}
	if c.Sleepers() != 0 {
		t.Error("a cancelled sleeper left behind")
	}
}

func TestClockAutoAdvanceAndWithTimeout(t *testing.T) {
	c := sqlretrytest.NewClock(time.Time{})
	c.SetAutoAdvance(true)
	ctx, cancel := c.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if d, ok := ctx.Deadline(); !ok || !d.Equal(c.Now().Add(3*time.Second)) {
		t.Errorf("deadline %v %v", d, ok)
	}
	if err := c.Sleep(ctx, 2*time.Second); err != nil {
		t.Fatalf("first sleep: %v", err)
	}
	if err := c.Sleep(ctx, 2*time.Second); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("sleep past the deadline returned %v", err)
	}
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Errorf("ctx.Err() = %v", ctx.Err())
	}
	ctx2, cancel2 := c.WithTimeout(context.Background(), time.Second)
	cancel2()
	if !errors.Is(ctx2.Err(), context.Canceled) {
		t.Errorf("cancelled: %v", ctx2.Err())
	}
}

// The clock only moves forward: a negative Advance does nothing (time
// going backwards would make sqlretry's elapsed times negative).
func TestClockAdvanceNeverGoesBack(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := sqlretrytest.NewClock(start)
	c.Advance(-time.Hour)
	if got := c.Now(); !got.Equal(start) {
		t.Errorf("Now = %v after Advance(-1h), want %v", got, start)
	}
}
