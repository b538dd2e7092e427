package sqlretry

import (
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// SetBreaker on a live db: the next calls see the new threshold and the
// new open timeout; an open breaker stays open, and the opening under way
// keeps the open timeout it began with.
func TestSetBreakerOnALiveDB(t *testing.T) {
	srv := newFakeServer()
	refuse := func(on bool) {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		srv.dialErrs = nil
		if on {
			for range 100 {
				srv.dialErrs = append(srv.dialErrs, errRefused)
			}
		}
	}
	db, clock := testDB(t, srv, WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second}), WithoutBudget())
	db.SetMaxIdleConns(0) // every call dials
	if err := SetBreaker(db, Breaker{MinRequests: 2, OpenTimeout: 10 * time.Second}); err != nil {
		t.Fatal(err)
	}
	refuse(true)
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	if srv.dials != 2 {
		t.Errorf("dials before opening = %d, want 2 (MinRequests set to 2)", srv.dials)
	}
	refuse(false)
	clock.Advance(2 * time.Second) // past the old OpenTimeout, not the new one
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("2s into a 10s opening: %v, want ErrCircuitOpen", err)
	}
	clock.Advance(11 * time.Second) // past 10s and its jitter (at most 20%)
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatalf("after the new open timeout: %v", err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Fatalf("breaker %v, want closed", s.Breaker)
	}

	// Open it again (10s), then shorten OpenTimeout: it stays open, and
	// this opening still lasts its 10s; the next opening takes 1s.
	refuse(true)
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	if err := SetBreaker(db, Breaker{MinRequests: 2, OpenTimeout: time.Second}); err != nil {
		t.Fatal(err)
	}
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("after SetBreaker: breaker %v, want it still open", s.Breaker)
	}
	refuse(false)
	clock.Advance(2 * time.Second)
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("2s into the 10s opening under way: %v, want ErrCircuitOpen", err)
	}
	clock.Advance(11 * time.Second)
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatalf("after the opening under way: %v", err)
	}
	refuse(true)
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	refuse(false)
	clock.Advance(2 * time.Second) // past 1s and its jitter
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatalf("2s into a 1s opening: %v", err)
	}
}

func TestSetBreakerRefuses(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	for _, b := range []Breaker{
		{FailureRatio: 2},
		{OpenJitter: -1},
		{Window: 5 * time.Millisecond},
		{OpenTimeout: -time.Second},
		{MinRequests: -1},
	} {
		if err := SetBreaker(db, b); err == nil {
			t.Errorf("SetBreaker took %+v", b)
		}
	}
	if err := SetBreaker(sql.OpenDB(&fakeConnector{srv: srv}), Breaker{}); !errors.Is(err, errNotSqlretry) {
		t.Errorf("SetBreaker on a plain db: %v", err)
	}
	dbNo, _ := testDB(t, srv, WithoutBreaker())
	if err := SetBreaker(dbNo, Breaker{}); err == nil {
		t.Error("SetBreaker on a db opened WithoutBreaker")
	}
}

// A Window change starts the count afresh, whatever the clock's instant:
// kept outcomes depended on where the old buckets fell in the ring under
// the new width (this test failed now and then with the clock's start).
// Neither way does a bucket get stuck in the future or outlive the window.
func TestBreakerWindowChange(t *testing.T) {
	clock := newFakeClock()
	b := newBreaker(Breaker{Window: 100 * time.Millisecond, MinRequests: 4, FailureRatio: 0.5}.withDefaults(), clock, func() float64 { return 0 }, nil)
	fail := func(n int) {
		for range n {
			tk, err := b.allow()
			if err != nil {
				t.Fatal(err)
			}
			b.done(tk, outcomeFailure)
		}
	}
	// Growing: the count starts afresh, then four failures in the 10s
	// window open it.
	fail(2)
	b.set(Breaker{Window: 10 * time.Second, MinRequests: 4, FailureRatio: 0.5}.withDefaults())
	clock.Advance(time.Second)
	fail(2)
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("grown window: %v, want closed (the count started afresh: 2 failures)", s)
	}
	clock.Advance(time.Second)
	fail(2)
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("grown window: %v, want open (4 failures within 10s)", s)
	}

	// Shrinking: failures 1s old fall out of a 100ms window.
	b = newBreaker(Breaker{Window: 10 * time.Second, MinRequests: 4, FailureRatio: 0.5}.withDefaults(), clock, func() float64 { return 0 }, nil)
	fail(2)
	clock.Advance(time.Second)
	b.set(Breaker{Window: 100 * time.Millisecond, MinRequests: 4, FailureRatio: 0.5}.withDefaults())
	fail(2)
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("shrunk window: %v, want closed (2 failures within 100ms)", s)
	}
	fail(2)
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("shrunk window: %v, want open (4 failures within 100ms)", s)
	}
}

// The breaker's settings change while calls run and the breaker opens and
// closes: no data race (-race), and every call ends in success, the
// driver's lost connection, or ErrCircuitOpen.
func TestSetBreakerUnderConcurrentTraffic(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv, WithoutBudget())
	db.SetMaxOpenConns(8)
	const workers, calls = 8, 150
	for range workers * calls {
		srv.script("SELECT", step{err: errLost}, step{})
	}
	stop := make(chan struct{})
	var flips sync.WaitGroup
	flips.Add(1)
	go func() {
		defer flips.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			b := Breaker{MinRequests: 1 + i%2*(1<<20), OpenTimeout: time.Duration(1+i%3) * 10 * time.Millisecond, HalfOpenProbes: 1 + i%2, ConsecutiveDialFailures: 1 + i%5}
			if i%4 == 0 {
				b.Window = time.Duration(1+i%7) * 100 * time.Millisecond
			}
			if err := SetBreaker(db, b); err != nil {
				t.Error(err)
				return
			}
			clock.Advance(5 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	var ok, open, lost atomic.Int64
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range calls {
				var n int
				err := db.QueryRow("SELECT n FROM t").Scan(&n)
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, ErrCircuitOpen):
					open.Add(1)
					clock.Advance(10 * time.Millisecond) // on to the next probe
				case errors.Is(err, errLost):
					lost.Add(1)
				default:
					t.Errorf("unexpected error %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	flips.Wait()
	s := stats(t, db)
	t.Logf("ok %d, circuit open %d, lost %d; breaker transitions %d", ok.Load(), open.Load(), lost.Load(), s.BreakerTransitions)
}
