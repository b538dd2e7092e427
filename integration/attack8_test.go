package integration

// Hostile tests (attack8) of short lock waits after today's change (a 55P03
// of sqlretry's own bound never reaches the caller; a user's lock_timeout
// stays theirs). Written from the README and the public API only.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

func a8Defects(t *testing.T) {
	t.Helper()
	if os.Getenv("ATTACK8_DEFECTS") != "1" {
		t.Skip("known defect; run with ATTACK8_DEFECTS=1")
	}
}

func a8Code(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// a8Engage makes one RunInTx of db meet a (raised) deadlock and commit on
// its replay: the db then bounds every attempt for 2 s.
func a8Engage(t *testing.T, ctx context.Context, db *sql.DB) {
	t.Helper()
	k := 0
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if k++; k == 1 {
			return a5FakeConflict(ctx, tx, "40P01")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// a8Stuck runs one RunInTx on a fresh db (shortWait on or off) whose first
// attempt meets a serialization failure, and whose closure then runs body
// against row 1 of a table a batch job holds for hold.
func a8Stuck(t *testing.T, on bool, hold, ctxd time.Duration, body func(ctx context.Context, tx *sql.Tx, tbl string) error, opts ...sqlretry.Option) (attempts int, n int, err error, took time.Duration) {
	t.Helper()
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4, append([]sqlretry.Option{sqlretry.WithShortLockWait(on)}, opts...)...)
	released := a5Holder(t, plain, tbl, 1, hold)
	ctx, cancel := context.WithTimeout(context.Background(), ctxd)
	defer cancel()
	var k atomic.Int32
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if k.Add(1) == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		return body(ctx, tx, tbl)
	})
	took = time.Since(start)
	<-released
	n = atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	return int(k.Load()), n, err, took
}

// A user who wants lock timeouts reported, not replayed (their own
// lock_timeout is how they bound waits), says so with WithClassifier:
// 55P03 is Permanent. sqlretry's own bound on a replay then ends in a
// 55P03 that this rule hands to the caller: a lock timeout nobody
// configured, after ~20-50 ms of waiting, where the same call without
// short waits (and the plain driver) waits 500 ms and commits.
func TestAttack8ClassifierPermanentLockTimeoutGetsOwnBound(t *testing.T) {
	perm := sqlretry.WithClassifier(func(err error) (sqlretry.Class, bool) {
		if a8Code(err) == "55P03" {
			return sqlretry.Permanent, true
		}
		return 0, false
	})
	upd := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	a0, n0, err0, _ := a8Stuck(t, false, 500*time.Millisecond, 10*time.Second, upd, perm)
	if err0 != nil || n0 != 1001 {
		t.Fatalf("without short waits: attempts %d n %d err %v", a0, n0, err0)
	}
	a, n, err, took := a8Stuck(t, true, 500*time.Millisecond, 10*time.Second, upd, perm)
	t.Logf("without short waits: committed on attempt %d; with: attempts %d n %d took %v ErrorCode %q err %v", a0, a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
	if err != nil || n != 1001 {
		a8Defects(t)
		t.Errorf("DEFECT: a classifier that makes 55P03 permanent got sqlretry's own short bound's 55P03 (nobody set lock_timeout): attempts %d, row %d (want 1001), after %v: %v", a, n, took.Round(time.Millisecond), err)
	}
}

// The same rule given to the db (WithClassifier on OpenDB) with the user's
// own lock_timeout of 2 s in the DSN: a 500 ms wait is within the user's
// bound, yet the call fails with a lock timeout after sqlretry's ~20 ms.
func TestAttack8ClassifierPermanentUsersHigherLockTimeoutIgnored(t *testing.T) {
	perm := sqlretry.WithClassifier(func(err error) (sqlretry.Class, bool) {
		if a8Code(err) == "55P03" {
			return sqlretry.Permanent, true
		}
		return 0, false
	})
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, a5WithParam(atkPG, "options=-c%20lock_timeout%3D2s"), 4, perm)
	ctx := a5Ctx(t, 15*time.Second)
	a8Engage(t, ctx, db) // another caller met a deadlock: the db bounds attempts for 2 s
	released := a5Holder(t, plain, tbl, 1, 500*time.Millisecond)
	var seen []string
	start := time.Now()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		s, _ := a5Setting(ctx, tx, "lock_timeout")
		seen = append(seen, s)
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	})
	took := time.Since(start)
	<-released
	n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	t.Logf("lock_timeout seen by attempts %v, row %d, took %v, ErrorCode %q, err %v", seen, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
	if err != nil || n != 1001 {
		a8Defects(t)
		t.Errorf("DEFECT: user's lock_timeout 2s (DSN), classifier: 55P03 permanent; a 500 ms row lock: got %v after %v (attempts saw lock_timeout %v), row %d; the plain driver waits and commits", err, took.Round(time.Millisecond), seen, n)
	}
}

// A closure that turns database errors into its own (fmt.Errorf with %v)
// meets sqlretry's own bound: RunInTx must still replay (the transaction's
// first error was the database's), and commit once after the holder lets
// go, as without short waits. Holds.
func TestAttack8ClosureOpaqueErrorOnOwnBound(t *testing.T) {
	opaque := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			return fmt.Errorf("update: %v", err)
		}
		return nil
	}
	for _, on := range []bool{false, true} {
		a, n, err, took := a8Stuck(t, on, 500*time.Millisecond, 10*time.Second, opaque)
		t.Logf("short waits %v: attempts %d row %d took %v err %v", on, a, n, took.Round(time.Millisecond), err)
		if err != nil || n != 1001 {
			t.Errorf("short waits %v: err %v row %d; want success, row 1001", on, err, n)
		}
	}
}

// The closure sets its own lock_timeout (SET LOCAL, 150 ms: above
// sqlretry's first bounds) and waits behind a row held for 3 s; the caller
// gives it 1 s. Every attempt after the first ends in the user's own
// 55P03, which must be what the give-up reports (as it is without short
// waits). It reports the serialization failure of attempt 1 instead: the
// user's lock timeouts were taken for sqlretry's own and dropped.
func TestAttack8ClosureSetLocalLockTimeoutHiddenAtDeadline(t *testing.T) {
	body := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '150ms'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	a0, _, err0, _ := a8Stuck(t, false, 3*time.Second, time.Second, body)
	t.Logf("without short waits: attempts %d ErrorCode %q err %v", a0, sqlretry.ErrorCode(err0), err0)
	if a8Code(err0) != "55P03" {
		t.Fatalf("without short waits the user's 55P03 was not reported: %v", err0)
	}
	a, n, err, took := a8Stuck(t, true, 3*time.Second, time.Second, body)
	t.Logf("with short waits: attempts %d row %d took %v ErrorCode %q err %v", a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
	if n != 1000 {
		t.Errorf("row %d: a write went through a held lock?", n)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("not the deadline: %v", err)
	}
	if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" {
		a8Defects(t)
		t.Errorf("DEFECT: the closure's own SET LOCAL lock_timeout=150ms ended %d attempts in 55P03, but the give-up reports errors.As code %q / ErrorCode %q: %v", a-1, a8Code(err), sqlretry.ErrorCode(err), err)
	}
}

// The user's own 55P03 must surface at a give-up in the other shapes too:
// a lower SET LOCAL (10 ms, below every bound), FOR UPDATE NOWAIT, a DSN
// lock_timeout above the first bounds, and stops by MaxAttempts,
// MaxElapsed and the caller's deadline. Holds.
func TestAttack8UsersOwn55P03Reported(t *testing.T) {
	setLocal := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '10ms'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	nowait := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1 FOR UPDATE NOWAIT"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	upd := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	type stop struct {
		ctxd time.Duration
		opts []sqlretry.Option
	}
	stops := map[string]stop{
		"deadline1s": {time.Second, nil},
		"maxatt3":    {10 * time.Second, []sqlretry.Option{sqlretry.WithMaxAttempts(3)}},
		"maxel300ms": {10 * time.Second, []sqlretry.Option{sqlretry.WithBackoff(sqlretry.Backoff{MaxElapsed: 300 * time.Millisecond})}},
	}
	bodies := map[string]func(context.Context, *sql.Tx, string) error{"setlocal10ms": setLocal, "nowait": nowait}
	for bn, b := range bodies {
		for sn, s := range stops {
			t.Run(bn+"/"+sn, func(t *testing.T) {
				a, n, err, took := a8Stuck(t, true, 2500*time.Millisecond, s.ctxd, b, s.opts...)
				t.Logf("attempts %d row %d took %v ErrorCode %q err %v", a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
				if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" || n != 1000 {
					t.Errorf("the user's own 55P03 not reported: row %d, %v", n, err)
				}
			})
		}
	}
	dsn := a5WithParam(atkPG, "options=-c%20lock_timeout%3D150ms")
	for sn, s := range stops {
		t.Run("dsn150ms/"+sn, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, dsn, 4)
			released := a5Holder(t, plain, tbl, 1, 2500*time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), s.ctxd)
			defer cancel()
			k := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a5FakeConflict(ctx, tx, "40001")
				}
				return upd(ctx, tx, tbl)
			}, s.opts...)
			<-released
			t.Logf("attempts %d ErrorCode %q err %v", k, sqlretry.ErrorCode(err), err)
			if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" {
				t.Errorf("the user's own DSN lock_timeout's 55P03 not reported: %v", err)
			}
		})
	}
}
