package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

// a5Holder holds row id of tbl (or an advisory lock when tbl is "") from
// another session, not through sqlretry, for d; it returns when the lock is
// held and a channel closed at the holder's COMMIT.
func a5Holder(t *testing.T, plain *sql.DB, tbl string, id int, d time.Duration) (released <-chan time.Time) {
	t.Helper()
	tx, err := plain.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if tbl == "" {
		_, err = tx.Exec("SELECT pg_advisory_xact_lock($1)", id)
	} else {
		_, err = tx.Exec("UPDATE "+tbl+" SET n = n + 1000 WHERE id = $1", id)
	}
	if err != nil {
		tx.Rollback()
		t.Fatal(err)
	}
	ch := make(chan time.Time, 1)
	time.AfterFunc(d, func() {
		if err := tx.Commit(); err != nil {
			t.Errorf("holder commit: %v", err)
		}
		ch <- time.Now()
	})
	return ch
}

func a5Table(t *testing.T, plain *sql.DB, rows int) string {
	t.Helper()
	tbl := atkName("a5")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)",
		fmt.Sprintf("INSERT INTO %s SELECT g, 0 FROM generate_series(1, %d) g", tbl, rows))
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	return tbl
}

// a5StuckCaller: a call whose first attempt meets a serialization failure
// (so its replays are bounded) and whose closure then updates a row a batch
// job holds for hold. Plain PostgreSQL (and sqlretry without short waits)
// commits on attempt 2, right after the holder lets go.
func a5StuckCaller(t *testing.T, hold time.Duration, advisory bool, callOpts ...sqlretry.Option) (attempts int, after time.Duration, err error) {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4)
	lockTbl := tbl
	if advisory {
		lockTbl = ""
	}
	key := 424242 + int(time.Now().UnixNano()%1000)
	released := a5Holder(t, plain, lockTbl, map[bool]int{true: key, false: 1}[advisory], hold)
	ctx := a5Ctx(t, hold+20*time.Second)
	var n atomic.Int32
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if n.Add(1) == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		if advisory {
			if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", key); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}, callOpts...)
	done := time.Now()
	select {
	case r := <-released:
		after = done.Sub(r)
	case <-time.After(hold + 5*time.Second):
		t.Fatal("holder never let go")
	}
	if err == nil {
		want := 1001 // the holder's 1000 and one commit
		if advisory {
			want = 1
		}
		if got := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"); got != want {
			t.Errorf("row is %d, want %d: lost or doubled write", got, want)
		}
	}
	return int(n.Load()), after, err
}

func TestAttack5StuckCallerDefaults(t *testing.T) {
	for _, adv := range []bool{false, true} {
		n, after, err := a5StuckCaller(t, 3*time.Second, adv)
		t.Logf("advisory=%v: attempts %d, err %v, returned %v after the holder let go", adv, n, err, after)
		if err != nil {
			t.Errorf("DEFECT: a caller behind a 3 s batch job (advisory=%v) failed: %v", adv, err)
		}
		if after > 500*time.Millisecond {
			t.Errorf("caller committed %v after the holder let go", after)
		}
	}
}

// The same with a smaller attempt count the user chose: without short
// waits it commits on attempt 2 (it simply waits); short waits must not
// turn a legitimate wait into a surfaced lock timeout.
func TestAttack5StuckCallerFewAttempts(t *testing.T) {
	for _, max := range []int{2, 3, 5} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			n0, _, err0 := a5StuckCaller(t, 2*time.Second, false, sqlretry.WithMaxAttempts(max), sqlretry.WithShortLockWait(false))
			n, after, err := a5StuckCaller(t, 2*time.Second, false, sqlretry.WithMaxAttempts(max))
			t.Logf("WithMaxAttempts(%d): without short waits attempts %d err %v; with: attempts %d err %v (%v after the holder let go)", max, n0, err0, n, err, after)
			if err0 != nil {
				t.Fatalf("without short waits: %v", err0)
			}
			if err != nil {
				var pe *pgconn.PgError
				code := ""
				if errors.As(err, &pe) {
					code = pe.Code
				}
				t.Errorf("DEFECT: WithMaxAttempts(%d), caller behind a 2 s batch job after one serialization failure: short lock waits made it fail after %d attempts with %q (%v); without them it waited and committed on attempt %d", max, n, code, err, n0)
			}
		})
	}
}

// A deadline on the backoff (MaxElapsed) the user chose.
func TestAttack5StuckCallerMaxElapsed(t *testing.T) {
	b := sqlretry.WithBackoff(sqlretry.Backoff{MaxElapsed: 300 * time.Millisecond})
	n0, _, err0 := a5StuckCaller(t, 2*time.Second, false, b, sqlretry.WithShortLockWait(false))
	n, after, err := a5StuckCaller(t, 2*time.Second, false, b)
	t.Logf("MaxElapsed 300ms: without short waits attempts %d err %v; with: attempts %d err %v (%v after release)", n0, err0, n, err, after)
	if err0 != nil {
		t.Fatalf("without short waits: %v", err0)
	}
	if err != nil {
		t.Errorf("DEFECT: Backoff.MaxElapsed 300ms, caller behind a 2 s batch job after one serialization failure: short lock waits made it fail after %d attempts (%v); without them it committed on attempt %d", n, err, n0)
	}
}

// The caller's deadline runs out while it waits behind the batch job: the
// error says so (context.DeadlineExceeded), as without short waits, and
// comes back about at the deadline.
func TestAttack5DeadlineMidWait(t *testing.T) {
	for _, on := range []bool{false, true} {
		plain := atkPlain(t, "pgx")
		tbl := a5Table(t, plain, 1)
		db := a5Open(t, atkPG, 2)
		released := a5Holder(t, plain, tbl, 1, 2*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
		start := time.Now()
		var n atomic.Int32
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if n.Add(1) == 1 {
				return a5FakeConflict(ctx, tx, "40001")
			}
			_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
			return err
		}, sqlretry.WithShortLockWait(on))
		took := time.Since(start)
		cancel()
		<-released
		t.Logf("short waits %v: attempts %d, took %v, err %v", on, n.Load(), took, err)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("DEFECT (short waits %v): deadline ran out mid-wait but errors.Is(err, context.DeadlineExceeded) is false: %v", on, err)
		}
		if took > 1200*time.Millisecond {
			t.Errorf("short waits %v: returned %v after start, deadline 700ms", on, took)
		}
		if got := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"); got != 1000 {
			t.Errorf("row %d, want 1000 (nothing of the caller committed)", got)
		}
	}
}

// One caller stuck in bounded waits behind a batch job, others of the same
// db committing transfers that queue briefly on each other's rows (hot
// pair, lock waits of a few ms; no deadlock possible: same order). They
// must not see errors, and their rate is compared with short waits off.
func TestAttack5StuckCallerOthersSuffer(t *testing.T) {
	run := func(on bool) (commits, replays int64, errs int64) {
		plain := atkPlain(t, "pgx")
		tbl := a5Table(t, plain, 3)
		db := a5Open(t, atkPG, 8, sqlretry.WithShortLockWait(on))
		released := a5Holder(t, plain, tbl, 3, 3*time.Second)
		ctx := a5Ctx(t, 20*time.Second)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			var n atomic.Int32
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if n.Add(1) == 1 {
					return a5FakeConflict(ctx, tx, "40P01") // a "deadlock": bounded mode for the db
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 3")
				return err
			})
			if err != nil {
				atomic.AddInt64(&errs, 1)
				t.Errorf("stuck caller (short waits %v): %v", on, err)
			}
		}()
		stop := time.Now().Add(3 * time.Second)
		for range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					var k int64
					err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						if k++; k > 1 {
							atomic.AddInt64(&replays, 1)
						}
						if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.004)"); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n - 1 WHERE id = 2")
						return err
					})
					if err != nil {
						atomic.AddInt64(&errs, 1)
						t.Errorf("other caller (short waits %v): %v", on, err)
						return
					}
					atomic.AddInt64(&commits, 1)
				}
			}()
		}
		wg.Wait()
		<-released
		if s := atkCount(t, plain, "SELECT sum(n) FROM "+tbl+" WHERE id IN (1, 2)"); s != 0 {
			t.Errorf("money not conserved: %d", s)
		}
		if a := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"); int64(a) != commits {
			t.Errorf("row 1 is %d, commits %d: lost or doubled write", a, commits)
		}
		return
	}
	for i := range 2 {
		c1, r1, e1 := run(true)
		c0, r0, e0 := run(false)
		t.Logf("round %d: others' commits with short waits %d (replays %d, errors %d), without %d (replays %d, errors %d): ratio %.2f", i, c1, r1, e1, c0, r0, e0, float64(c1)/float64(max(c0, 1)))
	}
}

// NOWAIT and SKIP LOCKED in a bounded attempt behave as the user wrote
// them: SKIP LOCKED takes the free row at once.
func TestAttack5SkipLockedInBoundedAttempt(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 2)
	released := a5Holder(t, plain, tbl, 1, 1500*time.Millisecond)
	ctx := a5Ctx(t, 10*time.Second)
	var n atomic.Int32
	var got int
	start := time.Now()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if n.Add(1) == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		return tx.QueryRowContext(ctx, "SELECT id FROM "+tbl+" ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1").Scan(&got)
	})
	took := time.Since(start)
	<-released
	if err != nil || got != 2 || n.Load() != 2 || took > 500*time.Millisecond {
		t.Fatalf("SKIP LOCKED: err %v row %d attempts %d took %v", err, got, n.Load(), took)
	}
}

// A function of the user's that RAISEs 55P03 (a business "locked" signal)
// in every attempt: the call ends with the user's error, and it does not
// put the db in bounded mode for other callers' first attempts for longer
// than the 2 s the README gives.
func TestAttack5UserRaised55P03(t *testing.T) {
	db := a5Open(t, atkPG, 2)
	ctx := a5Ctx(t, 30*time.Second)
	var n atomic.Int32
	start := time.Now()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		n.Add(1)
		_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'account 7 is locked by the auditor' USING ERRCODE = '55P03'; END$$`)
		return err
	}, sqlretry.WithMaxAttempts(4))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "55P03" || pe.Message != "account 7 is locked by the auditor" {
		t.Fatalf("want the user's 55P03 back, got %v", err)
	}
	t.Logf("user 55P03: %d attempts in %v", n.Load(), time.Since(start))
	time.Sleep(2100 * time.Millisecond)
	var first string
	sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		first, _ = a5Setting(ctx, tx, "lock_timeout")
		return nil
	})
	if first != "0" {
		t.Errorf("DEFECT: 2.1 s after the user's 55P03 calls, a new call's first attempt still has lock_timeout %s", first)
	}
}
