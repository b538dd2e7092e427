package integration

// Short lock waits (WithShortLockWait(true)) and the transaction's
// snapshot. A bounded attempt's statements run right after BEGIN, before
// the closure's first statement: they must take no snapshot, or a
// REPEATABLE READ closure that begins with LOCK TABLE reads rows older
// than its lock, and SET TRANSACTION ISOLATION LEVEL / SNAPSHOT fails
// after them (what attack12 found for short deadlock checks; the same
// shapes here, with short lock waits on).

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// swPlain: the plain driver's statements (no bound of either kind);
// swOn: short lock waits.
var (
	swPlain = []sqlretry.Option{sqlretry.WithShortLockWait(false), sqlretry.WithShortDeadlockCheck(false)}
	swOn    = []sqlretry.Option{sqlretry.WithShortLockWait(true)}
)

// A bounded replay sends only utility statements (SHOW, SET LOCAL)
// between its BEGIN and the closure's first statement, and its
// lock_timeout is the bound; a second call's bounded replay sends no more.
func TestShortLockWaitStatementsTakeNoSnapshot(t *testing.T) {
	d := need(t, "pgx")
	tr := &a12Tracer{}
	db := a12Open(t, d, 1, tr, swOn...)
	ctx := a12Ctx(t, 10*time.Second)
	marker := probeQuery("lock_timeout") + " /* the closure's */"
	for call := 1; call <= 2; call++ {
		before := len(tr.seen())
		var lt string
		runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
			return tx.QueryRowContext(ctx, marker).Scan(&lt)
		})
		if err != nil || runs != 2 {
			t.Fatalf("call %d: err %v runs %d", call, err, runs)
		}
		qs := tr.seen()[before:]
		// The replay's statements: after its BEGIN, up to the marker.
		begin, end := -1, -1
		for i, q := range qs {
			switch {
			case strings.HasPrefix(strings.ToLower(q), "begin"):
				begin = i
			case q == marker:
				end = i
			}
		}
		if begin < 0 || end < begin {
			t.Fatalf("call %d: no BEGIN before the closure's statement: %q", call, qs)
		}
		extra := qs[begin+1 : end]
		t.Logf("call %d: bounded replay sent %d statements before the closure's: %q; lock_timeout %s", call, len(extra), extra, lt)
		for _, q := range extra {
			if !strings.HasPrefix(q, "SHOW ") && !strings.HasPrefix(q, "SET LOCAL ") {
				t.Errorf("call %d: %q before the closure's first statement (a SELECT takes the snapshot)", call, q)
			}
		}
		// The bound is four times a recent commit's duration, at least
		// 20ms: on a loaded machine (CI, 2026-12-02: 40ms) a commit of
		// more than 5ms raises it. Below deadlock_timeout (1s) either way.
		if d, err := time.ParseDuration(lt); err != nil || d < 20*time.Millisecond || d >= time.Second {
			t.Errorf("call %d: the replay's lock_timeout %s, want the bound (20ms or more, under 1s)", call, lt)
		}
	}
}

// REPEATABLE READ takes its snapshot at the transaction's first query: a
// row another session commits after BEGIN but before the closure's first
// query is visible to the plain driver's transaction, and must be to a
// bounded replay's.
func TestShortLockWaitSnapshotTakenEarly(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "swsnap")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, tag text NOT NULL)")
	seenWith := func(name string, o ...sqlretry.Option) int {
		db := a12Open(t, d, 1, nil, o...)
		ctx := a12Ctx(t, 10*time.Second)
		runs, seen := 0, -1
		err := sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelRepeatableRead}, func(ctx context.Context, tx *sql.Tx) error {
			if runs++; runs == 1 {
				return a12Fake(ctx, tx, "40001")
			}
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
	plain := seenWith("plain", swPlain...)
	on := seenWith("short lock waits", swOn...)
	t.Logf("rows seen: plain %d, short lock waits %d", plain, on)
	if plain != 1 || on != plain {
		t.Errorf("the bounded replay saw %d rows committed before its first query (plain %d)", on, plain)
	}
}

// PostgreSQL's explicit-locking idiom for REPEATABLE READ: LOCK TABLE as
// the transaction's first statement, so that the snapshot, taken by the
// query after it, sees what the previous lock holder committed. A bounded
// attempt must not take the snapshot before the LOCK (a duplicate
// sequence number committed, attack12's shape).
func TestShortLockWaitLockFirstIdiom(t *testing.T) {
	swLockFirst(t, sql.LevelRepeatableRead)
}

// Under SERIALIZABLE an early snapshot makes SSI abort one of the two;
// the plain idiom commits both in order.
func TestShortLockWaitLockFirstIdiomSerializable(t *testing.T) {
	swLockFirst(t, sql.LevelSerializable)
}

func swLockFirst(t *testing.T, iso sql.IsolationLevel) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "swledger")
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
			if err := rows.Scan(&s); err != nil {
				t.Fatal(err)
			}
			got = append(got, s)
		}
		return got
	}
	for _, after := range []bool{false, true} {
		name := map[bool]string{false: "replay", true: "new call after a deadlock"}[after]
		plain := run(name+" plain", after, swPlain...)
		on := run(name+" short lock waits", after, swOn...)
		t.Logf("%s: plain %v; short lock waits %v", name, plain, on)
		if fmt.Sprint(plain) != "[1:holder 2:sqlretry]" {
			t.Fatalf("the plain idiom: %v", plain)
		}
		if fmt.Sprint(on) != fmt.Sprint(plain) {
			t.Errorf("%s: short lock waits committed %v; the plain driver's statements %v", name, on, plain)
		}
	}
}

// A closure whose nested RunInTx commits an audit row (such an attempt is
// never replayed) and whose outer transaction then starts with SET
// TRANSACTION ISOLATION LEVEL: the plain driver commits once; a bounded
// attempt (a replay, or a new call right after a deadlock) must too.
func TestShortLockWaitNestedCommitThenSetTransaction(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "swaudit")
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
		plainErr, plainRuns, plainRows := run(name+" plain", replay, swPlain...)
		onErr, onRuns, onRows := run(name+" on", replay, swOn...)
		t.Logf("%s: plain: err %q runs %d audit rows %d; short lock waits: err %q runs %d audit rows %d", name, plainErr, plainRuns, plainRows, onErr, onRuns, onRows)
		if plainErr != "" || plainRows != 1 {
			t.Fatalf("the plain shape failed")
		}
		if onErr != "" || onRows != 1 {
			t.Errorf("%s: short lock waits: err %q, audit rows %d; want no error and 1 row as the plain driver", name, onErr, onRows)
		}
	}
}

// A replay whose closure begins with SET TRANSACTION ISOLATION LEVEL, or
// SET TRANSACTION SNAPSHOT (a snapshot another session exported), runs
// once, under its bound: the statement that must come first still is the
// first to take a snapshot. (With a SELECT as the bound's statement it
// failed with 25001 and sqlretry ran the attempt again without a bound.)
func TestShortLockWaitSetTransactionFirstKeepsTheBound(t *testing.T) {
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "swsettx")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY)")
	t.Run("isolation level", func(t *testing.T) {
		db := a12Open(t, d, 1, nil, swOn...)
		ctx := a12Ctx(t, 10*time.Second)
		var lt, iso string
		runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"); err != nil {
				return err
			}
			if err := tx.QueryRowContext(ctx, "SHOW transaction_isolation").Scan(&iso); err != nil {
				return err
			}
			return tx.QueryRowContext(ctx, probeQuery("lock_timeout")).Scan(&lt)
		})
		t.Logf("err %v runs %d isolation %s lock_timeout %s", err, runs, iso, lt)
		if err != nil || runs != 2 || iso != "serializable" || !isShortBound(lt) {
			t.Errorf("err %v, runs %d, isolation %s, lock_timeout %s; want nil, 2, serializable, the bound (20ms or more)", err, runs, iso, lt)
		}
	})
	t.Run("snapshot", func(t *testing.T) {
		ctx := a12Ctx(t, 10*time.Second)
		exporter, err := setup.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
		if err != nil {
			t.Fatal(err)
		}
		defer exporter.Rollback()
		var snap string
		if err := exporter.QueryRowContext(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
			t.Fatal(err)
		}
		mustExec(t, setup, "INSERT INTO "+tbl+" DEFAULT VALUES") // after the export: not in the snapshot
		db := a12Open(t, d, 1, nil, swOn...)
		var lt string
		seen := -1
		runs := 0
		err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelRepeatableRead}, func(ctx context.Context, tx *sql.Tx) error {
			if runs++; runs == 1 {
				return a12Fake(ctx, tx, "40001")
			}
			if _, err := tx.ExecContext(ctx, "SET TRANSACTION SNAPSHOT '"+snap+"'"); err != nil {
				return err
			}
			if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl).Scan(&seen); err != nil {
				return err
			}
			return tx.QueryRowContext(ctx, probeQuery("lock_timeout")).Scan(&lt)
		})
		t.Logf("err %v runs %d rows seen %d lock_timeout %s", err, runs, seen, lt)
		if err != nil || runs != 2 || seen != 0 || !isShortBound(lt) {
			t.Errorf("err %v, runs %d, rows seen %d, lock_timeout %s; want nil, 2, 0 (the exported snapshot's), the bound (20ms or more)", err, runs, seen, lt)
		}
	})
}
