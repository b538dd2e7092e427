package integration

// Hostile tests (attack6) of contention control while it is engaged:
// callers cancelled while waiting for a slot, a nested RunInTx on a fresh
// context on another goroutine, a caller stuck behind an outside lock.

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// a6Engage runs a hot spot on db (callers goroutines moving money between
// 2 accounts, random order, SERIALIZABLE) until contention control limits,
// and keeps it running until the returned stop is called.
func a6Engage(t *testing.T, db *sql.DB, plain *sql.DB, callers int) (acct string, stop func()) {
	t.Helper()
	acct = table(t, plain, "a6cc")
	mustExec(t, plain, "CREATE TABLE "+acct+" (id int PRIMARY KEY, bal bigint NOT NULL)",
		"INSERT INTO "+acct+" SELECT g, 1000 FROM generate_series(1, 2) g")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				a := rand.IntN(2) + 1
				sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable}, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal - 1 WHERE id = $1", a); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal + 1 WHERE id = $1", 3-a)
					return err
				})
			}
		}()
	}
	stop = func() { cancel(); wg.Wait() }
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		if s, _ := sqlretry.StatsOf(db); s.ContentionLimit > 0 {
			t.Logf("engaged after %v: %+v", 6*time.Second-time.Until(deadline), s.ContentionLimit)
			return acct, stop
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	t.Skip("contention control did not engage: nothing to attack")
	return
}

// Callers whose context is cancelled while they wait for a slot must
// return at once with the cancellation, and must not keep a slot: the
// limiter goes on admitting.
func TestAttack6CancelledWhileWaitingForASlot(t *testing.T) {
	db := a5Open(t, atkPG, 20)
	plain := a5Plain(t, atkPG)
	acct, stop := a6Engage(t, db, plain, 12)
	defer stop()
	before, _ := sqlretry.StatsOf(db)
	const n = 20
	var wg sync.WaitGroup
	errs := make([]error, n)
	ran := make([]atomic.Int32, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(time.Duration(20+rand.IntN(60))*time.Millisecond, cancel)
			errs[i] = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable}, func(ctx context.Context, tx *sql.Tx) error {
				ran[i].Add(1)
				_, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal WHERE id = 1")
				return err
			})
			cancel()
		}()
	}
	start := time.Now()
	wg.Wait()
	took := time.Since(start)
	after, _ := sqlretry.StatsOf(db)
	t.Logf("%d callers cancelled after 20–80 ms returned within %v; contention waits %d → %d, limit %.1f", n, took, before.ContentionWaits, after.ContentionWaits, after.ContentionLimit)
	if took > 1500*time.Millisecond {
		t.Errorf("callers cancelled while waiting for a slot took %v to return; want promptly (< 1.5 s)", took)
	}
	for i, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("caller %d: %v; want success or context.Canceled", i, err)
		}
	}
	// The limiter still admits: a fresh call commits within a few seconds.
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "SELECT 1")
		return err
	}); err != nil {
		t.Errorf("after the cancelled waiters, a call failed after %v: %v (slots leaked?)", time.Since(t0), err)
	}
	stop()
	var sum int64
	plain.QueryRow("SELECT SUM(bal) FROM " + acct).Scan(&sum)
	if sum != 2000 {
		t.Errorf("money %d, want 2000", sum)
	}
}

// While contention control limits, a closure starts a RunInTx on another
// goroutine with a fresh context and waits for it. README: the stall rule
// lets go (1.2–2 s), so the inner call commits before its 5 s deadline.
func TestAttack6NestedOnAnotherGoroutineWhileEngaged(t *testing.T) {
	db := a5Open(t, atkPG, 20)
	plain := a5Plain(t, atkPG)
	acct, stop := a6Engage(t, db, plain, 12)
	defer stop()
	ledger := table(t, plain, "a6nest")
	mustExec(t, plain, "CREATE TABLE "+ledger+" (k int)")
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Second)
	defer cancel()
	t0 := time.Now()
	var innerErr error
	var innerTook []time.Duration
	calls := 0
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		done := make(chan error, 1)
		go func() {
			ictx, icancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer icancel()
			done <- sqlretry.RunInTx(ictx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+ledger+" VALUES (1)")
				return err
			})
		}()
		ti := time.Now()
		innerErr = <-done
		innerTook = append(innerTook, time.Since(ti).Round(time.Millisecond))
		if innerErr != nil {
			return innerErr
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal WHERE id = 1")
		return err
	})
	took := time.Since(t0)
	stop()
	var rows int
	plain.QueryRow("SELECT COUNT(*) FROM " + ledger).Scan(&rows)
	t.Logf("outer err=%v inner err=%v calls=%d took %v inner rows=%d, each inner took %v", err, innerErr, calls, took, rows, innerTook)
	if innerErr != nil {
		t.Errorf("the inner RunInTx on another goroutine failed while contention control was engaged: %v (after %v)", innerErr, took)
	}
	if err == nil && rows < 1 {
		t.Errorf("outer committed but the inner row is missing")
	}
}

// A caller stuck behind a row an outside session holds for 2 s, while the
// db runs a hot spot and contention control is engaged: it must commit
// after the holder lets go, within its deadline, and not be killed by its
// own bounds (55P03 surfaced).
func TestAttack6StuckCallerWhileEngaged(t *testing.T) {
	db := a5Open(t, atkPG, 20)
	plain := a5Plain(t, atkPG)
	_, stop := a6Engage(t, db, plain, 12)
	defer stop()
	other := table(t, plain, "a6stuck")
	mustExec(t, plain, "CREATE TABLE "+other+" (id int PRIMARY KEY, n int)", "INSERT INTO "+other+" VALUES (1, 0)")
	hold, err := plain.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hold.Exec("UPDATE " + other + " SET n = n WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	released := make(chan time.Time, 1)
	time.AfterFunc(2*time.Second, func() { hold.Rollback(); released <- time.Now() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	attempts := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		attempts++
		_, err := tx.ExecContext(ctx, "UPDATE "+other+" SET n = n + 1 WHERE id = 1")
		return err
	})
	end := time.Now()
	rel := <-released
	stop()
	var n int
	plain.QueryRow("SELECT n FROM " + other + " WHERE id = 1").Scan(&n)
	t.Logf("err=%v attempts=%d committed %v after the holder let go, n=%d", err, attempts, end.Sub(rel), n)
	if err != nil || n != 1 {
		t.Errorf("stuck caller while engaged: err=%v n=%d; want success and n=1", err, n)
	}
	if err == nil && end.Sub(rel) > 2*time.Second {
		t.Errorf("committed %v after the holder let go; want soon after", end.Sub(rel))
	}
}
