package integration

// Hostile tests (attack6): closures that panic, return their own error, or
// swallow a serialization failure, a deadlock or a lock timeout (also one
// from sqlretry's own short bound), and closures that play with
// lock_timeout themselves. Written from the README and go doc only.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

func a6Ledger(t *testing.T, db *sql.DB) string {
	t.Helper()
	tbl := table(t, db, "a6ledger")
	mustExec(t, db, "CREATE TABLE "+tbl+" (op text, attempt int)")
	return tbl
}

func a6Count(t *testing.T, db *sql.DB, tbl, op string) int {
	t.Helper()
	var n int
	if err := db.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestAttack6ClosurePanics(t *testing.T) {
	db := a5Open(t, atkPG, 2)
	tbl := a6Ledger(t, db)
	calls := 0
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Error("the closure's panic did not reach the caller")
			}
		}()
		sqlretry.RunInTx(a5Ctx(t, 5*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('panic', 1)"); err != nil {
				return err
			}
			panic("attack6 boom")
		})
	}()
	if n := a6Count(t, db, tbl, "panic"); n != 0 || calls != 1 {
		t.Errorf("after a panic: rows=%d calls=%d; want nothing committed, 1 run", n, calls)
	}
	time.Sleep(50 * time.Millisecond)
	if s := db.Stats(); s.InUse != 0 {
		t.Errorf("a connection stays in use after the panic: %+v", s)
	}
	// The db still works, and the panicking connection's transaction is gone.
	if err := sqlretry.RunInTx(a5Ctx(t, 5*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('after', 1)")
		return err
	}); err != nil || a6Count(t, db, tbl, "after") != 1 {
		t.Errorf("after the panic: %v", err)
	}
}

var errA6Own = errors.New("attack6: my own error")

func TestAttack6ClosureOwnErrorAfterWrites(t *testing.T) {
	db := a5Open(t, atkPG, 2)
	tbl := a6Ledger(t, db)
	calls := 0
	err := sqlretry.RunInTx(a5Ctx(t, 5*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('own', 1)"); err != nil {
			return err
		}
		return fmt.Errorf("wrapped: %w", errA6Own)
	})
	if !errors.Is(err, errA6Own) || calls != 1 || a6Count(t, db, tbl, "own") != 0 {
		t.Errorf("own error: err=%v calls=%d rows=%d; want errA6Own, 1 run, nothing committed", err, calls, a6Count(t, db, tbl, "own"))
	}
}

// The closure swallows a retryable error and returns nil. README: later
// statements and COMMIT fail with the original error, nothing commits, and
// RunInTx replays.
func TestAttack6ClosureSwallowsConflict(t *testing.T) {
	for _, code := range []string{"40001", "40P01", "55P03"} {
		t.Run(code, func(t *testing.T) {
			db := a5Open(t, atkPG, 2)
			tbl := a6Ledger(t, db)
			calls := 0
			err := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('sw', $1)", calls); err != nil {
					return err
				}
				if calls == 1 {
					_ = a5FakeConflict(ctx, tx, code) // swallowed
				}
				return nil
			})
			var rows []int
			r, qerr := db.Query("SELECT attempt FROM " + tbl + " WHERE op = 'sw' ORDER BY attempt")
			if qerr != nil {
				t.Fatal(qerr)
			}
			for r.Next() {
				var a int
				r.Scan(&a)
				rows = append(rows, a)
			}
			r.Close()
			if err != nil || calls != 2 || len(rows) != 1 || rows[0] != 2 {
				t.Errorf("swallowed %s: err=%v calls=%d committed attempts=%v; want success after 1 replay, only attempt 2's row", code, err, calls, rows)
			}
		})
	}
}

// The closure swallows a real 55P03 from a bound of sqlretry's own (a replay
// after a serialization failure carries a short lock_timeout) by rolling
// back to a savepoint, then finishes its work. The plain driver would have
// waited for the row the outside session holds (for 700 ms) and updated
// it: so must sqlretry (attack8: committing the attempt that swallowed the
// bound's 55P03 committed the handler's branch instead). The attempt is
// replayed unbounded: one commit, the replay's rows only, the held row
// updated.
func TestAttack6ClosureSwallowsOwnBoundWithSavepoint(t *testing.T) {
	db := a5Open(t, atkPG, 2)
	plain := a5Plain(t, atkPG)
	tbl := a6Ledger(t, db)
	hold := a6HoldRow(t, db, plain, tbl)
	defer hold.Rollback()
	go func() {
		time.Sleep(700 * time.Millisecond)
		hold.Rollback()
	}()
	calls := 0
	var sawTimeout atomic.Bool
	ctx := a5Ctx(t, 10*time.Second)
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('sp', $1)", calls); err != nil {
			return err
		}
		if calls == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		if _, err := tx.ExecContext(ctx, "SAVEPOINT a6"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET attempt = -1 WHERE op = 'held'")
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "55P03" {
			sawTimeout.Store(true)
			if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT a6"); err != nil {
				return err
			}
			return nil
		}
		return err
	})
	hold.Rollback()
	t.Logf("err=%v calls=%d own-bound timeout swallowed=%v", err, calls, sawTimeout.Load())
	if !sawTimeout.Load() {
		t.Skip("the replay was not bounded; nothing to swallow")
	}
	if err != nil || calls != 3 || a6Count(t, db, tbl, "sp") != 1 {
		t.Errorf("err=%v calls=%d rows=%d; want success, 3 runs (the conflict, the swallowed bound, the unbounded wait), 1 row", err, calls, a6Count(t, db, tbl, "sp"))
	}
	var held int
	db.QueryRow("SELECT attempt FROM " + tbl + " WHERE op = 'held'").Scan(&held)
	if held != -1 {
		t.Errorf("held row is %d, want -1: the unbounded attempt waited for it and updated it, as the plain driver would", held)
	}
}

// The closure plays with lock_timeout: values it sets must be the user's
// (a SET LOCAL wins), a bad value is the closure's own error (one run), and
// a session-level SET or RESET must not break later replays.
func TestAttack6ClosureLockTimeoutSettings(t *testing.T) {
	db := a5Open(t, atkPG, 1)
	cases := []struct {
		name, stmt string
		wantErr    bool
	}{
		{"set-local-0", "SET LOCAL lock_timeout = '0'", false},
		{"set-local-1ms", "SET LOCAL lock_timeout = '1ms'", false},
		{"set-local-minus1", "SET LOCAL lock_timeout = '-1'", true},
		{"reset", "RESET lock_timeout", false},
		{"set-session-0", "SET lock_timeout = 0", false},
		{"set-session-5s", "SET lock_timeout = '5s'", false},
		{"characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", false},
		{"search-path", "SET search_path = pg_temp, public", false},
		{"set-local-default", "SET LOCAL lock_timeout TO DEFAULT", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			calls := 0
			var seen []string
			err := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, c.stmt); err != nil {
					return err
				}
				s, err := a5Setting(ctx, tx, "lock_timeout")
				if err != nil {
					return err
				}
				seen = append(seen, s)
				if calls == 1 {
					return a5FakeConflict(ctx, tx, "40001")
				}
				return nil
			})
			t.Logf("err=%v calls=%d lock_timeout seen %v", err, calls, seen)
			if c.wantErr {
				var pe *pgconn.PgError
				if !errors.As(err, &pe) || calls != 1 {
					t.Errorf("%s: err=%v calls=%d; want the server's error after 1 run", c.stmt, err, calls)
				}
				return
			}
			// 3: the replay touched lock_timeout (a SET of it, RESET) and ran
			// again unbounded (touchedRedo).
			want := 2
			if strings.Contains(c.stmt, "lock_timeout") {
				want = 3
			}
			if err != nil || calls != want {
				t.Errorf("%s: err=%v calls=%d; want success after %d runs", c.stmt, err, calls, want)
			}
			if strings.HasPrefix(c.name, "set-local-") && len(seen) >= 2 && seen[len(seen)-1] != seen[0] {
				t.Errorf("%s: the replay saw lock_timeout %q, the first run %q: the closure's SET LOCAL must win", c.stmt, seen[1], seen[0])
			}
		})
	}
	// Nothing the closures did at session level may stay on the pooled
	// connection to bound an unrelated later transaction with no conflict.
	mustExec(t, db, "RESET ALL")
}

// A DSN with options=-c lock_timeout=1ms: every attempt of a caller behind
// a row held for 1.5 s ends in the user's own 55P03. It is a lock timeout,
// not one of the timeouts that stop when repeated: the call must commit
// after the holder lets go.
func TestAttack6DSNOptionsLockTimeout1msStuckCaller(t *testing.T) {
	db := a5Open(t, a5WithParam(atkPG, "options=-c%20lock_timeout%3D1ms"), 2)
	plain := a5Plain(t, atkPG)
	ctx := a5Ctx(t, 15*time.Second)
	if s, err := a5Setting(ctx, db, "lock_timeout"); err != nil || s != "1ms" {
		t.Fatalf("the DSN's options did not apply: %q %v", s, err)
	}
	tbl := a6Ledger(t, plain)
	mustExec(t, plain, "INSERT INTO "+tbl+" VALUES ('row', 0)")
	hold, err := plain.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hold.Exec("UPDATE " + tbl + " SET attempt = attempt WHERE op = 'row'"); err != nil {
		t.Fatal(err)
	}
	rel := make(chan time.Time, 1)
	time.AfterFunc(1500*time.Millisecond, func() { hold.Rollback(); rel <- time.Now() })
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET attempt = attempt + 1 WHERE op = 'row'")
		return err
	})
	end := time.Now()
	released := <-rel
	var n int
	plain.QueryRow("SELECT attempt FROM " + tbl + " WHERE op = 'row'").Scan(&n)
	t.Logf("err=%v attempts=%d n=%d, ended %v after the holder let go", err, calls, n, end.Sub(released))
	if err != nil || n != 1 {
		t.Errorf("user's own lock_timeout=1ms behind a 1.5 s hold: err=%v attempts=%d n=%d; want success, n=1", err, calls, n)
	}
}

// The same swallow without a savepoint: the replay's own bound ends the
// UPDATE with 55P03, the closure ignores it and returns nil. The aborted
// transaction must not commit; RunInTx replays, and only the attempt that
// really finished has its row.
func TestAttack6ClosureSwallowsOwnBoundNoSavepoint(t *testing.T) {
	db := a5Open(t, atkPG, 2)
	plain := a5Plain(t, atkPG)
	tbl := a6Ledger(t, db)
	hold := a6HoldRow(t, db, plain, tbl)
	time.AfterFunc(400*time.Millisecond, func() { hold.Rollback() })
	calls := 0
	swallowed := 0
	err := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('ns', $1)", calls); err != nil {
			return err
		}
		if calls == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET attempt = attempt + 1 WHERE op = 'held'")
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "55P03" {
			swallowed++
			return nil
		}
		return err
	})
	var rows, held int
	db.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE op = 'ns'").Scan(&rows)
	db.QueryRow("SELECT attempt FROM " + tbl + " WHERE op = 'held'").Scan(&held)
	t.Logf("err=%v calls=%d swallowed 55P03 %d times, rows=%d held=%d", err, calls, swallowed, rows, held)
	if swallowed == 0 {
		t.Skip("no bound ran out: nothing swallowed")
	}
	if err != nil || rows != 1 || held != 1 || calls != swallowed+2 {
		t.Errorf("swallowed own-bound 55P03 without savepoint: err=%v calls=%d swallowed=%d rows=%d held=%d; want success, exactly one attempt's row and update", err, calls, swallowed, rows, held)
	}
}

// a6HoldRow adds the row 'held' to tbl and holds it locked in a
// transaction of plain's, which the caller ends.
func a6HoldRow(t *testing.T, db, plain *sql.DB, tbl string) *sql.Tx {
	t.Helper()
	mustExec(t, db, "INSERT INTO "+tbl+" VALUES ('held', 0)")
	hold, err := plain.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hold.Exec("UPDATE " + tbl + " SET attempt = attempt WHERE op = 'held'"); err != nil {
		t.Fatal(err)
	}
	return hold
}
