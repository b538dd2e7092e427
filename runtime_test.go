package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// SetBackoff on a live db: MaxAttempts 1 turns retries off for the next
// calls, and back on again, without reopening.
func TestSetBackoffOnALiveDB(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	if err := SetBackoff(db, Backoff{MaxAttempts: 1}); err != nil {
		t.Fatal(err)
	}
	srv.script("UPDATE", step{err: errSerialization})
	if _, err := db.Exec("UPDATE t SET v = 1"); err != errSerialization {
		t.Fatalf("MaxAttempts 1: %v, want the driver's error unretried", err)
	}
	if err := SetBackoff(db, Backoff{}); err != nil {
		t.Fatal(err)
	}
	srv.script("UPDATE", step{err: errSerialization})
	if _, err := db.Exec("UPDATE t SET v = 1"); err != nil {
		t.Fatalf("default backoff again: %v", err)
	}
	// RunInTx's own options apply on top of the backoff in force.
	if err := SetBackoff(db, Backoff{MaxAttempts: 1}); err != nil {
		t.Fatal(err)
	}
	srv.script("INSERT", step{err: errDeadlockPG})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	}, WithObserver(ObserverFunc(func(context.Context, Event) {})))
	if runs != 1 || !errors.Is(err, errDeadlockPG) {
		t.Fatalf("RunInTx under MaxAttempts 1: %d runs, %v", runs, err)
	}
	if err := SetBackoff(db, Backoff{Multiplier: -1}); err == nil {
		t.Error("SetBackoff took an invalid backoff")
	}
	if err := SetBackoff(sql.OpenDB(&fakeConnector{srv: srv}), Backoff{}); err == nil {
		t.Error("SetBackoff on a plain db")
	}
}

// SetBudget on a live db: a budget of one token lets one hand-off through
// and refuses the next.
func TestSetBudgetOnALiveDB(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	if err := SetBudget(db, Budget{Max: 1, Ratio: 1e-9, PerSecond: 1e-9}); err != nil {
		t.Fatal(err)
	}
	if s := stats(t, db); s.BudgetTokens != 1 {
		t.Fatalf("tokens %v after SetBudget(Max 1), want 1", s.BudgetTokens)
	}
	srv.script("SELECT", step{err: errLost}, step{err: errLost})
	var n int
	err := db.QueryRow("SELECT n FROM t").Scan(&n)
	if !errors.Is(err, ErrBudgetExhausted) {
		t.Fatalf("second lost read: %v, want ErrBudgetExhausted", err)
	}
	if s := stats(t, db); s.HandOffs != 1 || s.BudgetRejections != 1 {
		t.Errorf("hand-offs %d, budget rejections %d; want 1, 1", s.HandOffs, s.BudgetRejections)
	}
	dbNo, _ := testDB(t, srv, WithoutBudget())
	if err := SetBudget(dbNo, Budget{}); err == nil {
		t.Error("SetBudget on a db without budget")
	}
}

// Backoff, budget and shadow mode change while calls run: no data race
// (-race), and each call ends as one policy says: retried to success, or
// the driver's error after one attempt (MaxAttempts 1, or shadow mode).
func TestPolicyChangesUnderConcurrentTraffic(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithBreaker(Breaker{MinRequests: 1 << 30}))
	db.SetMaxOpenConns(8)
	const workers, calls = 8, 150
	for range workers * calls {
		srv.script("UPDATE", step{err: errSerialization}, step{})
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
			switch i % 3 {
			case 0:
				SetBackoff(db, Backoff{MaxAttempts: 1 + i%2*29})
			case 1:
				SetBudget(db, Budget{Max: float64(1 + i%100)})
			case 2:
				SetShadow(db, i%2 == 0)
			}
		}
	}()
	var wg sync.WaitGroup
	var unretried atomic.Int64
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range calls {
				_, err := db.Exec("UPDATE t SET v = 1")
				switch {
				case err == nil:
				case err == errSerialization:
					unretried.Add(1)
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
	if s.RetriesStatement+unretried.Load() == 0 {
		t.Error("no failure seen")
	}
	t.Logf("retried %d, returned unretried %d (shadow decisions %d)", s.RetriesStatement, unretried.Load(), s.ShadowDecisions)
}

// blockingClock's first Sleep waits until release is closed.
type blockingClock struct {
	*fakeClock
	once    sync.Once
	asleep  chan struct{}
	release chan struct{}
}

func (c *blockingClock) Sleep(ctx context.Context, d time.Duration) error {
	c.once.Do(func() { close(c.asleep); <-c.release })
	return c.fakeClock.Sleep(ctx, d)
}

// A call keeps the backoff it started with: SetBackoff(MaxAttempts 1)
// while a call waits between attempts does not stop its retries.
func TestSetBackoffSparesCallsUnderWay(t *testing.T) {
	srv := newFakeServer()
	clock := &blockingClock{fakeClock: newFakeClock(), asleep: make(chan struct{}), release: make(chan struct{})}
	wc, err := WrapConnector(&fakeConnector{srv: srv}, WithClock(clock), WithDialect(DialectPostgres))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	defer db.Close()
	srv.script("UPDATE", step{err: errSerialization}, step{err: errSerialization})
	done := make(chan error, 1)
	go func() { _, err := db.Exec("UPDATE t SET v = 1"); done <- err }()
	<-clock.asleep
	if err := SetBackoff(db, Backoff{MaxAttempts: 1}); err != nil {
		t.Fatal(err)
	}
	close(clock.release)
	if err := <-done; err != nil {
		t.Fatalf("the call under way: %v, want it retried to success under the backoff it started with", err)
	}
	srv.script("UPDATE", step{err: errSerialization})
	if _, err := db.Exec("UPDATE t SET v = 1"); err != errSerialization {
		t.Fatalf("the next call: %v, want no retry (MaxAttempts 1)", err)
	}
}
