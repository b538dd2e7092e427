package integration

// Hostile tests of short deadlock checks for replays (attack12), written
// from the README and go doc only.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// a12Tracer records every statement text the driver sends.
type a12Tracer struct {
	mu      sync.Mutex
	queries []string
	onStart func(ctx context.Context, sql string)
	onEnd   func(sql string)
	last    string
}

func (tr *a12Tracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	tr.mu.Lock()
	tr.queries = append(tr.queries, d.SQL)
	tr.last = d.SQL
	f := tr.onStart
	tr.mu.Unlock()
	if f != nil {
		f(ctx, d.SQL)
	}
	return ctx
}

func (tr *a12Tracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {
	tr.mu.Lock()
	f, q := tr.onEnd, tr.last
	tr.mu.Unlock()
	if f != nil {
		f(q)
	}
}

func (tr *a12Tracer) seen() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.queries...)
}

// a12Open opens a sqlretry db on d with a tracer, conns connections.
func a12Open(t *testing.T, d string, conns int, tr *a12Tracer, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	ensureProbe(t, d)
	cfg, err := pgx.ParseConfig(d)
	if err != nil {
		t.Fatal(err)
	}
	if tr != nil {
		cfg.Tracer = tr
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), opts...)
	if conns > 0 {
		db.SetMaxOpenConns(conns)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func a12Fake(ctx context.Context, tx *sql.Tx, code string) error {
	_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack12 fake conflict' USING ERRCODE = '`+code+`'; END$$`)
	return err
}

func a12Ctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// The mechanism the other attacks rely on: a replay's extra statement,
// right after BEGIN, and its 20ms.
func TestAttack12Probe(t *testing.T) {
	d := need(t, "pgx")
	tr := &a12Tracer{}
	db := a12Open(t, d, 1, tr)
	probe := a12ProbeView(t, d)
	ctx := a12Ctx(t, 10*time.Second)
	var n atomic.Int32
	var dt string
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if n.Add(1) == 1 {
			return a12Fake(ctx, tx, "40001")
		}
		return tx.QueryRowContext(ctx, probe).Scan(&dt)
	})
	t.Logf("err %v runs %d dt %s", err, n.Load(), dt)
	for _, q := range tr.seen() {
		t.Logf("Q: %s", strings.ReplaceAll(q, "\n", " "))
	}
	if err != nil || n.Load() != 2 || !isShortBound(dt) || a12Count(tr.seen(), "SET LOCAL deadlock_timeout") != 1 {
		t.Errorf("err %v runs %d deadlock_timeout %s", err, n.Load(), dt)
	}
}

// a12Plain opens a plain pgx db.
func a12Plain(t *testing.T, d string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// REPEATABLE READ takes its snapshot at the transaction's first query. A
// replay's extra statement takes it before the closure's first statement:
// a row another session committed after BEGIN but before the closure's
// first query is visible with the plain driver and not with the defaults.
func TestAttack12SnapshotTakenEarly(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12snap")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, tag text NOT NULL)")
	seenWith := func(name string, o ...sqlretry.Option) int {
		db := a12Open(t, d, 1, nil, o...)
		ctx := a12Ctx(t, 10*time.Second)
		runs, seen := 0, -1
		err := sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelRepeatableRead}, func(ctx context.Context, tx *sql.Tx) error {
			if runs++; runs == 1 {
				return a12Fake(ctx, tx, "40001")
			}
			// Before its first query, the closure has another service write
			// a row it then reads.
			if _, err := setup.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ($1)", name); err != nil {
				return err
			}
			return tx.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl+" WHERE tag = $1", name).Scan(&seen)
		}, o...)
		if err != nil || runs != 2 {
			t.Fatalf("%s: err %v runs %d", name, err, runs)
		}
		return seen
	}
	off := seenWith("off", sqlretry.WithShortDeadlockCheck(false))
	on := seenWith("defaults")
	t.Logf("rows seen: without short deadlock checks %d, with the defaults %d", off, on)
	if off != 1 || on != off {
		t.Errorf("the replay saw %d rows committed before its first query (without short deadlock checks %d)", on, off)
	}
}

// A closure whose first statement must come first (SET TRANSACTION ...)
// fails with 25001 after the replay's extra statement; the README says
// that attempt runs again at once without it. The edges of that: a cap
// on attempts, a closure that hides the server error behind its own, a
// new call's first attempt right after a deadlock.
func TestAttack12SetTransactionFirstEdges(t *testing.T) {
	d := need(t, "pgx")
	type outcome struct {
		err  string
		runs int
	}
	run := func(t *testing.T, hide bool, firstFails string, o ...sqlretry.Option) outcome {
		db := a12Open(t, d, 1, nil, o...)
		ctx := a12Ctx(t, 10*time.Second)
		if firstFails == "40P01 before" {
			n := 0
			if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if n++; n == 1 {
					return a12Fake(ctx, tx, "40P01")
				}
				return nil
			}, sqlretry.WithMaxAttempts(5)); err != nil {
				t.Fatal(err)
			}
		}
		runs := 0
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			if _, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"); err != nil {
				if hide {
					return fmt.Errorf("could not start our serializable transaction: %v", err)
				}
				return err
			}
			if runs == 1 && firstFails == "40001 first" {
				return a12Fake(ctx, tx, "40001")
			}
			var lvl string
			if err := tx.QueryRowContext(ctx, "SHOW transaction_isolation").Scan(&lvl); err != nil {
				return err
			}
			if lvl != "serializable" {
				return fmt.Errorf("isolation %s", lvl)
			}
			return nil
		}, o...)
		o2 := outcome{runs: runs}
		if err != nil {
			o2.err = err.Error()
		}
		return o2
	}
	for _, tc := range []struct {
		name       string
		hide       bool
		firstFails string
		o          []sqlretry.Option
	}{
		{"replay", false, "40001 first", nil},
		{"replay, closure hides the error", true, "40001 first", nil},
		{"replay, at most 2 attempts", false, "40001 first", []sqlretry.Option{sqlretry.WithMaxAttempts(2)}},
		{"replay, at most 2 attempts, closure hides the error", true, "40001 first", []sqlretry.Option{sqlretry.WithMaxAttempts(2)}},
		{"new call after a deadlock", false, "40P01 before", nil},
		{"new call after a deadlock, closure hides the error", true, "40P01 before", nil},
		{"new call after a deadlock, at most 1 attempt", true, "40P01 before", []sqlretry.Option{sqlretry.WithMaxAttempts(1)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			off := run(t, tc.hide, tc.firstFails, append([]sqlretry.Option{sqlretry.WithShortDeadlockCheck(false)}, tc.o...)...)
			on := run(t, tc.hide, tc.firstFails, tc.o...)
			t.Logf("without short deadlock checks %+v, defaults %+v", off, on)
			if on.err != off.err {
				t.Errorf("defaults: err %q; without short deadlock checks %q", on.err, off.err)
			}
		})
	}
}

// a12WaitLocked waits until the backend pid waits for a lock.
func a12WaitLocked(ctx context.Context, mon *sql.DB, pid int) error {
	for {
		var waiting bool
		if err := mon.QueryRowContext(ctx, "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1", pid).Scan(&waiting); err != nil {
			return err
		}
		if waiting {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// a12Victim runs one deadlock between a plain session A (another
// application, not sqlretry) and a replay of sqlretry's B. B holds row 2;
// A holds row 1 and then waits for row 2 (A waits first); then B calls a
// PL/pgSQL function that updates row 1 and catches deadlock_detected. With
// equal deadlock_timeouts A, which waited first, finds the cycle first and
// is its victim; B's function does its work. It returns what B's function
// returned in B's committed attempt, B's runs, and A's error.
//
//lint:ignore ST1008 A's error is one of the results, not the call's
func a12Victim(t *testing.T, d, tbl, fn string, savepoint bool, o ...sqlretry.Option) (said string, runs int, aErr error, n1 int) {
	return a12VictimOf(t, d, tbl, fn, savepoint, false, o...)
}

// a12VictimOf is a12Victim; with afterDeadlock, B's call is a new one
// whose first attempt runs right after another call of the db met a
// deadlock (no replay of its own).
//
//lint:ignore ST1008 A's error is one of the results, not the call's
func a12VictimOf(t *testing.T, d, tbl, fn string, savepoint, afterDeadlock bool, o ...sqlretry.Option) (said string, runs int, aErr error, n1 int) {
	t.Helper()
	ctx := a12Ctx(t, 15*time.Second)
	plain := a12Plain(t, d)
	mon := a12Plain(t, d)
	db := a12Open(t, d, 1, nil, o...)
	work := 2
	if afterDeadlock {
		work = 1
		k := 0
		if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if k++; k == 1 {
				return a12Fake(ctx, tx, "40P01")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, plain, "UPDATE "+tbl+" SET n = 0")
	aConn, err := plain.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer aConn.Close()
	var aPid int
	if err := aConn.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&aPid); err != nil {
		t.Fatal(err)
	}
	aTx, err := aConn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer aTx.Rollback()
	aDone := make(chan error, 1)
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs < work {
			return a12Fake(ctx, tx, "40001") // makes the next attempt a replay
		}
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2"); err != nil {
			return err
		}
		if runs == work {
			if _, err := aTx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
				return err
			}
			go func() {
				_, err := aTx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2")
				if err == nil {
					err = aTx.Commit() // A is done: its locks go
				} else {
					aTx.Rollback()
				}
				aDone <- err
			}()
			if err := a12WaitLocked(ctx, mon, aPid); err != nil {
				return err
			}
		}
		if savepoint {
			// No handler on the server: the closure itself treats a
			// deadlock on row 1 as "busy" and keeps its row-2 work.
			if _, err := tx.ExecContext(ctx, "SAVEPOINT a12"); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
				if sqlretry.ErrorCode(err) != "40P01" {
					return err
				}
				said = "busy"
				_, err = tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT a12")
				return err
			}
			said = "done"
			return nil
		}
		return tx.QueryRowContext(ctx, "SELECT "+fn+"()").Scan(&said)
	}, o...)
	if err != nil {
		t.Fatalf("B: %v (runs %d)", err, runs)
	}
	select {
	case aErr = <-aDone:
	case <-ctx.Done():
		t.Fatal("A never ended")
	}
	if err := plain.QueryRowContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n1); err != nil {
		t.Fatal(err)
	}
	return said, runs, aErr, n1
}

// Short deadlock checks change which transaction of a cycle is the
// victim: the replay, which waited last, finds the cycle after 20 ms and
// aborts itself where, with the plain driver's timing, the other session
// (which waited first) found it after 1 s and was aborted. Server-side code
// of the replay that catches deadlock_detected (PL/pgSQL EXCEPTION WHEN
// deadlock_detected, or WHEN OTHERS) takes its "busy" branch and the
// transaction commits it; sqlretry cannot see that: the same shape as
// attack8's lock_timeout case.
func TestAttack12PlpgsqlDeadlockHandlerBecomesTheVictim(t *testing.T) {
	if os.Getenv("ATTACK12_DEFECTS") == "" {
		t.Skip("defect (set ATTACK12_DEFECTS=1): the replay becomes the deadlock's victim and its server-side handler commits its busy branch")
	}
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12victim")
	fn := tbl + "_fn"
	t.Cleanup(func() { setup.Exec("DROP FUNCTION IF EXISTS " + fn + "()") })
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
		`CREATE FUNCTION `+fn+`() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	BEGIN
		UPDATE `+tbl+` SET n = n + 1 WHERE id = 1;
		RETURN 'done';
	EXCEPTION WHEN deadlock_detected THEN
		RETURN 'busy';
	END;
END$$`)
	said, runs, aErr, n1 := a12Victim(t, d, tbl, fn, false, sqlretry.WithShortDeadlockCheck(false))
	t.Logf("without short deadlock checks: B's function said %q, B ran %d times, A: %v, row 1 n=%d", said, runs, aErr, n1)
	if said != "done" || sqlretry.ErrorCode(aErr) != "40P01" {
		t.Fatalf("the plain timing: want B's function done and A the victim")
	}
	said, runs, aErr, n1 = a12Victim(t, d, tbl, fn, false)
	t.Logf("defaults: B's function said %q, B ran %d times, A: %v, row 1 n=%d", said, runs, aErr, n1)
	if said != "done" {
		t.Errorf("defaults: B's committed function said %q (row 1 n=%d), want \"done\" as without short deadlock checks", said, n1)
	}
	// Not only replays: a new call's first attempt right after another
	// call of the db met a deadlock.
	said, runs, aErr, _ = a12VictimOf(t, d, tbl, fn, false, true, sqlretry.WithShortDeadlockCheck(false))
	t.Logf("after a deadlock, without short deadlock checks: B's function said %q, B ran %d times, A: %v", said, runs, aErr)
	if said != "done" || sqlretry.ErrorCode(aErr) != "40P01" {
		t.Fatalf("the plain timing: want B's function done and A the victim")
	}
	said, runs, aErr, _ = a12VictimOf(t, d, tbl, fn, false, true)
	t.Logf("after a deadlock, defaults: B's function said %q, B ran %d times, A: %v", said, runs, aErr)
	if said != "done" {
		t.Errorf("defaults, a new call after a deadlock: B's committed function said %q, want \"done\"", said)
	}
}

// The same cycle without server-side handler: the closure itself catches
// the deadlock on row 1 (SAVEPOINT / ROLLBACK TO SAVEPOINT) and commits
// its row-2 work as "busy". sqlretry sees that 40P01 pass: is it treated
// like the bound's own lock timeout (never final, replayed)?
func TestAttack12ClosureCatchesItsDeadlockWithSavepoint(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12victimsp")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
	said, runs, aErr, n1 := a12Victim(t, d, tbl, "", true, sqlretry.WithShortDeadlockCheck(false))
	t.Logf("without short deadlock checks: B's closure said %q, B ran %d times, A: %v, row 1 n=%d", said, runs, aErr, n1)
	if said != "done" || sqlretry.ErrorCode(aErr) != "40P01" {
		t.Fatalf("the plain timing: want B's closure done and A the victim")
	}
	said, runs, aErr, n1 = a12Victim(t, d, tbl, "", true)
	t.Logf("defaults: B's closure said %q, B ran %d times, A: %v, row 1 n=%d", said, runs, aErr, n1)
	if said != "done" {
		t.Errorf("defaults: B's committed attempt said %q (row 1 n=%d), want \"done\" as without short deadlock checks", said, n1)
	}
}

// a12Replay runs one RunInTx whose first attempt fails with a fake
// serialization failure; the replay runs body.
func a12Replay(ctx context.Context, db *sql.DB, body func(ctx context.Context, tx *sql.Tx) error, o ...sqlretry.Option) (int, error) {
	runs := 0
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if runs++; runs == 1 {
			return a12Fake(ctx, tx, "40001")
		}
		return body(ctx, tx)
	}, o...)
	return runs, err
}

func a12Count(qs []string, sub string) int {
	n := 0
	for _, q := range qs {
		if strings.Contains(q, sub) {
			n++
		}
	}
	return n
}

// The session's and the role's own deadlock_timeout, lower or higher than
// the bound, the closure's own SET [LOCAL], a role that may not set it, a
// grant revoked while the db runs: what the replay sees, what the session
// keeps after it, errors and attempts.
func TestAttack12Settings(t *testing.T) {
	srv := ownServer(t, "pgx")
	admin := a12Plain(t, srv.DSN)
	mustExec(t, admin,
		"CREATE TABLE a12s (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO a12s VALUES (1, 0)",
		"CREATE ROLE a12low LOGIN", "CREATE ROLE a12high LOGIN", "CREATE ROLE a12plain LOGIN", "CREATE ROLE a12rev LOGIN",
		"GRANT SELECT, UPDATE ON a12s TO a12low, a12high, a12plain, a12rev",
		"GRANT SET ON PARAMETER deadlock_timeout TO a12low, a12high, a12rev",
		"ALTER ROLE a12low SET deadlock_timeout = '5ms'",
		"ALTER ROLE a12high SET deadlock_timeout = '10s'")
	probe := a12ProbeView(t, srv.DSN)
	cfg, err := pgx.ParseConfig(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	open := func(t *testing.T, user string, tr *a12Tracer, o ...sqlretry.Option) *sql.DB {
		c := cfg.Copy()
		if user != "" {
			c.User = user
		}
		if tr != nil {
			c.Tracer = tr
		}
		db := sqlretry.OpenDB(stdlib.GetConnector(*c), o...)
		db.SetMaxOpenConns(1)
		t.Cleanup(func() { db.Close() })
		return db
	}
	show := func(ctx context.Context, q interface {
		QueryRowContext(context.Context, string, ...any) *sql.Row
	}) string {
		var s string
		if err := q.QueryRowContext(ctx, probe).Scan(&s); err != nil {
			return "error: " + err.Error()
		}
		return s
	}
	for _, tc := range []struct {
		name, user, session, closure string
		wantIn, wantAfter            string // with the defaults
	}{
		{"superuser, session 5ms is kept", "", "SET deadlock_timeout = '5ms'", "", "5ms", "5ms"},
		{"superuser, session 19ms is kept", "", "SET deadlock_timeout = '19ms'", "", "19ms", "19ms"},
		{"superuser, session 10s lowered for the transaction", "", "SET deadlock_timeout = '10s'", "", "20ms", "10s"},
		{"role's own 5ms is kept", "a12low", "", "", "5ms", "5ms"},
		{"role's own 10s lowered for the transaction", "a12high", "", "", "20ms", "10s"},
		{"the closure's SET LOCAL wins", "", "", "SET LOCAL deadlock_timeout = '3s'", "3s", "1s"},
		{"the closure's session SET outlives the transaction as with the plain driver", "", "", "SET deadlock_timeout = '3s'", "3s", "3s"},
		{"the closure's RESET", "a12high", "SET deadlock_timeout = '2s'", "RESET deadlock_timeout", "10s", "10s"},
		{"the closure's set_config(false)", "", "", "SELECT set_config('deadlock_timeout', '4s', false)", "4s", "4s"},
		{"a role that may not", "a12plain", "", "", "1s", "1s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := a12Ctx(t, 15*time.Second)
			type seen struct {
				in, after, err string
				runs           int
			}
			run := func(o ...sqlretry.Option) seen {
				db := open(t, tc.user, nil, o...)
				if tc.session != "" {
					if _, err := db.ExecContext(ctx, tc.session); err != nil {
						t.Fatal(err)
					}
				}
				var s seen
				runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
					if tc.closure != "" {
						if _, err := tx.ExecContext(ctx, tc.closure); err != nil {
							return err
						}
					}
					s.in = show(ctx, tx)
					_, err := tx.ExecContext(ctx, "UPDATE a12s SET n = n + 1 WHERE id = 1")
					return err
				})
				s.runs = runs
				if err != nil {
					s.err = err.Error()
				}
				s.after = show(ctx, db)
				return s
			}
			off := run(sqlretry.WithShortDeadlockCheck(false))
			on := run()
			t.Logf("without short deadlock checks %+v; defaults %+v", off, on)
			// A closure that sets the setting in the bounded replay runs
			// once more, unbounded (touchedRedo).
			wantRuns := 2
			if tc.closure != "" {
				wantRuns = 3
			}
			if on.err != "" || off.err != "" || on.runs != wantRuns || off.runs != 2 {
				t.Errorf("errors or attempts differ")
			}
			if on.in != tc.wantIn || on.after != tc.wantAfter || on.after != off.after {
				t.Errorf("defaults: in the replay %q (want %q), after %q (want %q; without short deadlock checks %q)", on.in, tc.wantIn, on.after, tc.wantAfter, off.after)
			}
		})
	}
	t.Run("a role that may not: no error, no extra attempt, the db stops asking", func(t *testing.T) {
		ctx := a12Ctx(t, 15*time.Second)
		tr := &a12Tracer{}
		db := open(t, "a12plain", tr)
		for i := range 4 {
			var dt string
			runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
				dt = show(ctx, tx)
				return nil
			})
			if err != nil || runs != 2 || dt != "1s" {
				t.Fatalf("call %d: err %v runs %d deadlock_timeout %s", i, err, runs, dt)
			}
		}
		if n := a12Count(tr.seen(), "deadlock_timeout'"); n > 1 {
			t.Errorf("the check ran %d times in 4 replays; want at most 1", n)
		}
	})
	t.Run("a grant revoked while the db runs", func(t *testing.T) {
		ctx := a12Ctx(t, 15*time.Second)
		db := open(t, "a12rev", nil)
		var got []string
		for i := range 4 {
			if i == 2 {
				mustExec(t, admin, "REVOKE SET ON PARAMETER deadlock_timeout FROM a12rev")
			}
			var dt string
			runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
				dt = show(ctx, tx)
				_, err := tx.ExecContext(ctx, "UPDATE a12s SET n = n + 1 WHERE id = 1")
				return err
			})
			if err != nil || runs != 2 {
				t.Fatalf("call %d: err %v runs %d", i, err, runs)
			}
			got = append(got, dt)
			if a := show(ctx, db); a != "1s" {
				t.Errorf("call %d: after %q", i, a)
			}
		}
		t.Logf("the replays' deadlock_timeout: %v", got)
		if !isShortBound(got[0]) || got[2] != "1s" || got[3] != "1s" {
			t.Errorf("replays saw %v; want the bound (20ms or more) before the revoke and 1s after", got)
		}
	})
}

// The caller's context ends exactly while the replay's extra statement
// runs (or right after it, before the closure): RunInTx returns the
// context's error, the closure does not run again, nothing is committed,
// and the pool's session keeps its deadlock_timeout.
func TestAttack12CancelDuringTheExtraStatement(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12cancel")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	probe := a12ProbeView(t, d)
	for _, when := range []string{"start", "end"} {
		t.Run(when, func(t *testing.T) {
			tr := &a12Tracer{}
			db := a12Open(t, d, 1, tr)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var fired atomic.Bool
			hook := func(q string) {
				if strings.HasPrefix(q, "SET LOCAL deadlock_timeout") && fired.CompareAndSwap(false, true) {
					cancel()
				}
			}
			if when == "start" {
				tr.onStart = func(_ context.Context, q string) { hook(q) }
			} else {
				tr.onEnd = hook
			}
			runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
				return err
			})
			t.Logf("fired %v runs %d err %v", fired.Load(), runs, err)
			if !fired.Load() {
				t.Fatal("the extra statement never ran")
			}
			if !errors.Is(err, context.Canceled) {
				t.Errorf("err %v, want context.Canceled", err)
			}
			// Ended during the statement: the closure does not run again;
			// right after it: the replay's closure runs, as after a BEGIN
			// whose context then ended, and its statements fail.
			if want := map[string]int{"start": 1, "end": 2}[when]; runs != want {
				t.Errorf("the closure ran %d times, want %d", runs, want)
			}
			c2 := a12Ctx(t, 5*time.Second)
			var n int
			if err := setup.QueryRowContext(c2, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n); err != nil || n != 0 {
				t.Errorf("n = %d (%v), want 0", n, err)
			}
			var dt string
			if err := db.QueryRowContext(c2, "SHOW deadlock_timeout").Scan(&dt); err != nil || dt != "1s" {
				t.Errorf("the pool's session after: %q (%v)", dt, err)
			}
			// The db keeps asking: one ended statement is no refusal.
			var again string
			if _, err := a12Replay(c2, db, func(ctx context.Context, tx *sql.Tx) error {
				return tx.QueryRowContext(ctx, probe).Scan(&again)
			}); err != nil || !isShortBound(again) {
				t.Errorf("the next replay: deadlock_timeout %q (%v), want the bound (20ms or more)", again, err)
			}
		})
	}
}

// A closure that panics in its replay: the panic reaches the caller
// unchanged, nothing is committed, the session keeps its setting.
func TestAttack12PanicInTheReplay(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	probe := a12ProbeView(t, d)
	tbl := table(t, setup, "a12panic")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	db := a12Open(t, d, 1, nil)
	ctx := a12Ctx(t, 10*time.Second)
	var got any
	var dtIn string
	func() {
		defer func() { got = recover() }()
		a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
			if err := tx.QueryRowContext(ctx, probe).Scan(&dtIn); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
				return err
			}
			panic("attack12 boom")
		})
	}()
	if got != "attack12 boom" {
		t.Fatalf("recovered %v", got)
	}
	var n int
	var dt string
	if err := setup.QueryRowContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n); err != nil || n != 0 {
		t.Errorf("n = %d (%v), want 0", n, err)
	}
	if err := db.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&dt); err != nil || dt != "1s" {
		t.Errorf("after the panic the session's deadlock_timeout %q (%v), want 1s", dt, err)
	}
	t.Logf("in the replay %s, after %s", dtIn, dt)
}

// Behind PgBouncer in transaction mode: sqlretry replays set their
// deadlock_timeout on shared server sessions while a plain client keeps
// asking SHOW deadlock_timeout through the same pooler; it must always see
// the server's 1s, and no call may fail.
func TestAttack12PgBouncerNoLeak(t *testing.T) {
	if dbserver.PgBouncerBinary() == "" {
		unavailable(t, "no pgbouncer binary")
	}
	srv := ownServer(t, "pgx")
	bouncer, err := dbserver.StartPgBouncer(dsnPort(t, srv.DSN))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bouncer.Stop)
	admin := a12Plain(t, srv.DSN)
	probe := a12ProbeView(t, srv.DSN)
	mustExec(t, admin, "CREATE TABLE a12b (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO a12b SELECT g, 0 FROM generate_series(1, 10) g")
	for _, mode := range []string{"exec", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			through := bouncer.DSN + "&default_query_exec_mode=" + mode
			db := a12Open(t, through, 6, nil)
			other := a12Plain(t, through)
			other.SetMaxOpenConns(6)
			ctx := a12Ctx(t, 20*time.Second)
			stop := time.Now().Add(2 * time.Second)
			var wg sync.WaitGroup
			var short, calls, leaks, checks atomic.Int64
			var firstErr atomic.Value
			fail := func(err error) { firstErr.CompareAndSwap(nil, err.Error()) }
			for range 6 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Now().Before(stop) {
						runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
							var s string
							if err := tx.QueryRowContext(ctx, probe).Scan(&s); err != nil {
								return err
							}
							if s != "1s" {
								short.Add(1)
							}
							_, err := tx.ExecContext(ctx, "UPDATE a12b SET n = n + 1 WHERE id = 5")
							return err
						})
						if err != nil {
							fail(fmt.Errorf("runs %d: %w", runs, err))
							return
						}
						calls.Add(1)
					}
				}()
			}
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Now().Before(stop) {
						var s string
						if err := other.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&s); err != nil {
							fail(err)
							return
						}
						checks.Add(1)
						if s != "1s" {
							leaks.Add(1)
						}
					}
				}()
			}
			wg.Wait()
			t.Logf("%d calls, %d replays with a short check, %d checks by the plain client, %d saw a short deadlock_timeout", calls.Load(), short.Load(), checks.Load(), leaks.Load())
			if e := firstErr.Load(); e != nil {
				t.Fatalf("error: %v", e)
			}
			if leaks.Load() != 0 {
				t.Errorf("the plain client saw a short deadlock_timeout %d times", leaks.Load())
			}
			if short.Load() == 0 {
				t.Errorf("no replay had a short check: the test proved nothing")
			}
		})
	}
}

// A schema ahead of pg_catalog with functions named like the ones the
// extra statement calls: none of them may run.
func TestAttack12SearchPathShadows(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	probe := a12ProbeView(t, d)
	schema := fmt.Sprintf("a12evil_%d", time.Now().UnixNano()%1000000)
	t.Cleanup(func() { setup.Exec("DROP SCHEMA IF EXISTS " + schema + " CASCADE") })
	mustExec(t, setup, "CREATE SCHEMA "+schema, "CREATE TABLE "+schema+".calls (f text)")
	for _, f := range []string{
		"set_config(a text, b text, c boolean) RETURNS text",
		"has_parameter_privilege(a text, b text) RETURNS boolean",
		"current_setting(a text) RETURNS text",
		"extract(a text, b interval) RETURNS numeric",
		"date_part(a text, b interval) RETURNS double precision",
	} {
		name := f[:strings.Index(f, "(")]
		mustExec(t, setup, "CREATE FUNCTION "+schema+"."+f+" LANGUAGE plpgsql AS $$BEGIN INSERT INTO "+schema+".calls VALUES ('"+name+"'); RAISE EXCEPTION 'attack12: shadow % called', '"+name+"'; END$$")
	}
	db := a12Open(t, d, 1, nil)
	ctx := a12Ctx(t, 10*time.Second)
	mustExec(t, db, "SET search_path = "+schema+", pg_catalog, public")
	var dt string
	runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
		return tx.QueryRowContext(ctx, probe).Scan(&dt)
	})
	var calls int
	if err := setup.QueryRowContext(ctx, "SELECT count(*) FROM "+schema+".calls").Scan(&calls); err != nil {
		t.Fatal(err)
	}
	t.Logf("runs %d err %v deadlock_timeout %s shadow calls %d", runs, err, dt, calls)
	if err != nil || runs != 2 || !isShortBound(dt) {
		t.Errorf("err %v runs %d deadlock_timeout %s", err, runs, dt)
	}
}

// Many callers on three *sql.DB "replicas" transfer between 6 hot accounts
// in random order (deadlock-prone: both rows updated in the order drawn)
// for 3 s on the defaults: no call fails, money is conserved, every caller
// commits, and the replays do get short checks.
func TestAttack12ReplicasHotSpotConserves(t *testing.T) {
	a12HotSpot(t)
}

func a12HotSpot(t *testing.T, o ...sqlretry.Option) (total int) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12hot")
	const accounts, start = 6, 1000
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, balance int NOT NULL)",
		fmt.Sprintf("INSERT INTO %s SELECT g, %d FROM generate_series(1, %d) g", tbl, start, accounts))
	var dbs [3]*sql.DB
	for i := range dbs {
		dbs[i] = a12Open(t, d, 4, nil, o...)
	}
	ctx := a12Ctx(t, 20*time.Second)
	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	var commits [3][4]int
	var short, attempts atomic.Int64
	var firstErr atomic.Value
	for r := range dbs {
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				seed := uint64(r*7 + w + 1)
				for time.Now().Before(stop) {
					seed = seed*6364136223846793005 + 1442695040888963407
					a := int(seed>>33)%accounts + 1
					b := int(seed>>40)%(accounts-1) + 1
					if b >= a {
						b++
					}
					amt := int(seed>>50)%10 + 1
					callStart := time.Now()
					k := 0
					err := sqlretry.RunInTx(ctx, dbs[r], nil, func(ctx context.Context, tx *sql.Tx) error {
						attempts.Add(1)
						k++
						at := time.Now()
						var dt string
						var aerr error
						defer func() {
							if os.Getenv("ATTACK12_VARIANTS") != "" {
								t.Logf("r%d w%d attempt %d at +%v took %v dt %s %v->%v: %s", r, w, k, at.Sub(callStart).Round(time.Millisecond), time.Since(at).Round(time.Millisecond), dt, a, b, sqlretry.ErrorCode(aerr))
							}
						}()
						// Through the test's function: a SHOW is a touch,
						// which would run the attempt again unbounded.
						if err := tx.QueryRowContext(ctx, probeQuery("deadlock_timeout")).Scan(&dt); err != nil {
							return err
						}
						if dt != "1s" {
							short.Add(1)
						}
						if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET balance = balance - $1 WHERE id = $2", amt, a); err != nil {
							aerr = err
							return err
						}
						_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET balance = balance + $1 WHERE id = $2", amt, b)
						aerr = err
						return err
					})
					if err != nil {
						firstErr.CompareAndSwap(nil, err.Error())
						return
					}
					commits[r][w]++
				}
			}()
		}
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		t.Fatalf("a call failed: %v", e)
	}
	var sum int
	if err := setup.QueryRowContext(ctx, "SELECT sum(balance) FROM "+tbl).Scan(&sum); err != nil {
		t.Fatal(err)
	}
	least := -1
	for r := range commits {
		for w := range commits[r] {
			total += commits[r][w]
			if least < 0 || commits[r][w] < least {
				least = commits[r][w]
			}
		}
	}
	t.Logf("commits %v (total %d, least %d), attempts %d, with a short check %d, sum %d", commits, total, least, attempts.Load(), short.Load(), sum)
	if sum != accounts*start {
		t.Errorf("money not conserved: %d, want %d", sum, accounts*start)
	}
	if least == 0 {
		t.Logf("a caller never committed (3 s on a random-order hot spot: logged, not failed)")
	}
	return total
}

// Server-side code that reads deadlock_timeout sees the bound in a
// replay (20ms) where the plain driver shows it the server's 1s. The
// README's own test asserts this value, so it is documented; it is still
// something server-side code can tell.
func TestAttack12ServerSideSeesTheSetting(t *testing.T) {
	if os.Getenv("ATTACK12_DEFECTS") == "" {
		t.Skip("documented visibility (set ATTACK12_DEFECTS=1): current_setting('deadlock_timeout') in a replay differs from the plain driver's")
	}
	d := need(t, "pgx")
	seen := func(o ...sqlretry.Option) string {
		db := a12Open(t, d, 1, nil, o...)
		var s string
		if _, err := a12Replay(a12Ctx(t, 10*time.Second), db, func(ctx context.Context, tx *sql.Tx) error {
			return tx.QueryRowContext(ctx, "SELECT current_setting('deadlock_timeout')").Scan(&s)
		}); err != nil {
			t.Fatal(err)
		}
		return s
	}
	off, on := seen(sqlretry.WithShortDeadlockCheck(false)), seen()
	t.Logf("without short deadlock checks %s, defaults %s", off, on)
	if on != off {
		t.Errorf("server-side code saw deadlock_timeout %s, with the plain driver %s", on, off)
	}
}

func TestAttack12HotSpotVariants(t *testing.T) {
	if os.Getenv("ATTACK12_VARIANTS") == "" {
		t.Skip("measurement")
	}
	for _, v := range []struct {
		name string
		o    []sqlretry.Option
	}{
		{"defaults", nil},
		{"no short deadlock checks", []sqlretry.Option{sqlretry.WithShortDeadlockCheck(false)}},
		{"short lock waits", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
		{"no contention control", []sqlretry.Option{sqlretry.WithContentionControl(false)}},
	} {
		t.Run(v.name, func(t *testing.T) { a12HotSpot(t, v.o...) })
	}
}

// Read-only transactions: on the primary with sql.TxOptions{ReadOnly} (and
// SERIALIZABLE), and on a hot standby, a replay gets its short check and
// no error; the standby session keeps its setting after.
func TestAttack12ReadOnlyAndStandby(t *testing.T) {
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(pair.Stop)
	probe := a12ProbeView(t, pair.Primary.DSN)
	for _, tc := range []struct {
		name, dsn string
		opts      *sql.TxOptions
	}{
		{"primary, read only", pair.Primary.DSN, &sql.TxOptions{ReadOnly: true}},
		{"primary, serializable read only", pair.Primary.DSN, &sql.TxOptions{ReadOnly: true, Isolation: sql.LevelSerializable}},
		{"standby, read only", pair.StandbyDSN, &sql.TxOptions{ReadOnly: true}},
		{"standby, default options", pair.StandbyDSN, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := a12Ctx(t, 15*time.Second)
			db := a12Open(t, tc.dsn, 1, nil)
			runs := 0
			var dt, ro string
			err := sqlretry.RunInTx(ctx, db, tc.opts, func(ctx context.Context, tx *sql.Tx) error {
				if runs++; runs == 1 {
					return a12Fake(ctx, tx, "40001")
				}
				if err := tx.QueryRowContext(ctx, "SHOW transaction_read_only").Scan(&ro); err != nil {
					return err
				}
				return tx.QueryRowContext(ctx, probe).Scan(&dt)
			})
			var after string
			if err2 := db.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&after); err2 != nil {
				t.Fatal(err2)
			}
			t.Logf("err %v runs %d read only %s deadlock_timeout %s after %s", err, runs, ro, dt, after)
			if err != nil || runs != 2 || ro != "on" || !isShortBound(dt) || after != "1s" {
				t.Errorf("err %v runs %d read only %s deadlock_timeout %s after %s", err, runs, ro, dt, after)
			}
		})
	}
}

// A replay with its short check waits for a row another session holds for
// 300 ms (no cycle) inside a PL/pgSQL function that catches everything
// (WHEN OTHERS): the wait is not ended, the function does its work, the
// call commits in one replay; under a session statement_timeout of 150 ms
// the wait ends with the same 57014 the plain driver gets.
func TestAttack12LongWaitIsNotEnded(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12wait")
	fn := tbl + "_fn"
	t.Cleanup(func() { setup.Exec("DROP FUNCTION IF EXISTS " + fn + "()") })
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)",
		`CREATE FUNCTION `+fn+`() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	BEGIN
		UPDATE `+tbl+` SET n = n + 1 WHERE id = 1;
		RETURN 'done:' || current_setting('deadlock_timeout');
	EXCEPTION WHEN OTHERS THEN
		RETURN 'caught ' || SQLSTATE;
	END;
END$$`)
	type res struct {
		said, code string
		runs       int
		took       time.Duration
	}
	run := func(session string, o ...sqlretry.Option) res {
		db := a12Open(t, d, 1, nil, o...)
		ctx := a12Ctx(t, 10*time.Second)
		if session != "" {
			mustExec(t, db, session)
		}
		holder := a12Plain(t, d)
		htx, err := holder.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer htx.Rollback()
		if _, err := htx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 100 WHERE id = 1"); err != nil {
			t.Fatal(err)
		}
		var r res
		var start time.Time
		r.runs, err = a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
			start = time.Now()
			time.AfterFunc(300*time.Millisecond, func() { htx.Rollback() })
			return tx.QueryRowContext(ctx, "SELECT "+fn+"()").Scan(&r.said)
		})
		r.took = time.Since(start).Round(10 * time.Millisecond)
		r.code = sqlretry.ErrorCode(err)
		if err != nil && r.code == "" {
			r.code = err.Error()
		}
		return r
	}
	for _, session := range []string{"", "SET statement_timeout = '150ms'"} {
		off := run(session, sqlretry.WithShortDeadlockCheck(false))
		on := run(session)
		t.Logf("%q: without short deadlock checks %+v, defaults %+v", session, off, on)
		if session == "" && on.said != "done:20ms" {
			t.Errorf("the replay had no short check (%q): the test proves nothing", on.said)
		}
		if strings.SplitN(on.said, ":", 2)[0] != strings.SplitN(off.said, ":", 2)[0] || on.code != off.code || on.runs != off.runs {
			t.Errorf("%q: defaults %+v differ from %+v", session, on, off)
		}
	}
}

// A closure whose nested RunInTx commits an audit row on another pooled
// connection (the README: such an attempt is never replayed) and whose
// outer transaction then starts with SET TRANSACTION ISOLATION LEVEL. With
// the plain driver's statements (short deadlock checks off) the SET is
// first and the call commits once. With the defaults, a new call right
// after another call met a deadlock gets the extra statement first, the
// SET fails with 25001, and the README's "runs again at once without it"
// either runs the nested audit again (a doubled write) or, refusing to,
// returns an error the plain driver would not have raised.
func TestAttack12NestedCommitThenSetTransaction(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12audit")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, tag text NOT NULL)")
	run := func(name string, replay bool, o ...sqlretry.Option) (string, int, int) {
		db := a12Open(t, d, 3, nil, o...)
		ctx := a12Ctx(t, 10*time.Second)
		k := 0
		if !replay {
			k = 1 // the warm-up call's first attempt meets the deadlock
		}
		if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if k++; k == 2 {
				return a12Fake(ctx, tx, "40P01")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		runs := 0
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			if replay && runs == 1 {
				return a12Fake(ctx, tx, "40001") // nothing committed yet: replayed
			}
			if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, atx *sql.Tx) error {
				_, err := atx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ($1)", name)
				return err
			}); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"); err != nil {
				return err
			}
			var one int
			return tx.QueryRowContext(ctx, "SELECT 1").Scan(&one)
		})
		var n int
		if err := setup.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl+" WHERE tag = $1", name).Scan(&n); err != nil {
			t.Fatal(err)
		}
		e := ""
		if err != nil {
			e = err.Error()
		}
		return e, runs, n
	}
	for _, replay := range []bool{false, true} {
		name := map[bool]string{false: "new call after a deadlock", true: "replay"}[replay]
		offErr, offRuns, offRows := run(name+" off", replay, sqlretry.WithShortDeadlockCheck(false))
		onErr, onRuns, onRows := run(name+" on", replay)
		t.Logf("%s: without short deadlock checks: err %q runs %d audit rows %d; defaults: err %q runs %d audit rows %d", name, offErr, offRuns, offRows, onErr, onRuns, onRows)
		if offErr != "" || offRows != 1 {
			t.Fatalf("the plain shape failed")
		}
		if onErr != "" || onRows != 1 {
			t.Errorf("%s: defaults: err %q, audit rows %d; want no error and 1 row as without short deadlock checks", name, onErr, onRows)
		}
	}
}

// PostgreSQL's explicit-locking idiom for REPEATABLE READ / SERIALIZABLE:
// take the table lock as the transaction's first statement (LOCK takes no
// snapshot), so that the snapshot, taken by the first query after it, sees
// everything the previous lock holder committed. A replay's extra
// statement takes the snapshot before the LOCK: the transaction that waits
// for the lock then reads the state from before the holder's commit and,
// under the lock, writes a duplicate sequence number (a doubled write the
// plain driver serializes away).
func TestAttack12LockFirstIdiomSeesStaleSnapshot(t *testing.T) {
	a12LockFirst(t, sql.LevelRepeatableRead)
}

// Under SERIALIZABLE the same shape holds: SSI sees the two transactions
// overlap (the replay's snapshot predates the holder's commit) and aborts
// one; its replay then commits the next number.
func TestAttack12LockFirstIdiomSerializable(t *testing.T) {
	a12LockFirst(t, sql.LevelSerializable)
}

func a12LockFirst(t *testing.T, iso sql.IsolationLevel) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a12ledger")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (seq int NOT NULL, who text NOT NULL)")
	next := func(ctx context.Context, tx *sql.Tx, who string) error {
		if _, err := tx.ExecContext(ctx, "LOCK TABLE "+tbl+" IN EXCLUSIVE MODE"); err != nil {
			return err
		}
		var max int
		if err := tx.QueryRowContext(ctx, "SELECT coalesce(max(seq), 0) FROM "+tbl).Scan(&max); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (seq, who) VALUES ($1, $2)", max+1, who)
		return err
	}
	run := func(name string, afterDeadlock bool, o ...sqlretry.Option) []string {
		mustExec(t, setup, "DELETE FROM "+tbl)
		ctx := a12Ctx(t, 10*time.Second)
		db := a12Open(t, d, 1, nil, o...)
		work := 2
		if afterDeadlock {
			work = 1
			k := 0
			if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a12Fake(ctx, tx, "40P01")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		holder := a12Plain(t, d)
		mon := a12Plain(t, d)
		htx, err := holder.BeginTx(ctx, &sql.TxOptions{Isolation: iso})
		if err != nil {
			t.Fatal(err)
		}
		defer htx.Rollback()
		if err := next(ctx, htx, "holder"); err != nil {
			t.Fatal(err)
		}
		runs := 0
		err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: iso}, func(ctx context.Context, tx *sql.Tx) error {
			if runs++; runs < work {
				return a12Fake(ctx, tx, "40001")
			}
			if runs == work {
				go func() { // the holder commits once we wait for its lock
					for ctx.Err() == nil {
						var waiting int
						if mon.QueryRowContext(ctx, "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted", tbl).Scan(&waiting); waiting > 0 {
							break
						}
						time.Sleep(5 * time.Millisecond)
					}
					htx.Commit()
				}()
			}
			return next(ctx, tx, "sqlretry")
		}, o...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		rows, err := setup.QueryContext(ctx, "SELECT seq || ':' || who FROM "+tbl+" ORDER BY seq, who")
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var got []string
		for rows.Next() {
			var s string
			rows.Scan(&s)
			got = append(got, s)
		}
		return got
	}
	for _, after := range []bool{false, true} {
		name := map[bool]string{false: "replay", true: "new call after a deadlock"}[after]
		off := run(name+" off", after, sqlretry.WithShortDeadlockCheck(false))
		on := run(name+" defaults", after)
		t.Logf("%s: without short deadlock checks %v; defaults %v", name, off, on)
		if fmt.Sprint(off) != "[1:holder 2:sqlretry]" {
			t.Fatalf("the plain idiom: %v", off)
		}
		if fmt.Sprint(on) != fmt.Sprint(off) {
			t.Errorf("%s: defaults committed %v; the plain driver's statements %v", name, on, off)
		}
	}
}

// a12ProbeView creates a view on the server at dsn that reads
// deadlock_timeout, and returns the statement that reads it: a closure's
// SHOW of the setting is a touch, and sqlretry runs that attempt again
// unbounded (touchedRedo), where these tests want to see the bound.
func a12ProbeView(t *testing.T, dsn string) string {
	t.Helper()
	admin := a12Plain(t, dsn)
	name := fmt.Sprintf("a12probe_%d", rand.Uint32())
	mustExec(t, admin, "CREATE VIEW "+name+" AS SELECT pg_catalog.current_setting('deadlock_timeout') AS dt",
		"GRANT SELECT ON "+name+" TO PUBLIC")
	t.Cleanup(func() { admin.Exec("DROP VIEW IF EXISTS " + name) })
	return "SELECT dt FROM " + name
}
