package integration

// The transaction path against real servers (branch fixtx): a read marked
// NotIdempotent counts as a write at a lost COMMIT; a closure that commits
// part of its work itself is never replayed; a closure that commits itself
// gets its own outcome.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// A transaction whose only write is a SELECT of a function of the user's
// own, marked NotIdempotent, with the COMMIT reply lost (the server
// committed): resolved, never replayed. Private servers (the COMMIT is cut).
func TestFixtxLostCommitOfNotIdempotentSelect(t *testing.T) {
	t.Run("pg", func(t *testing.T) {
		c := &cutter{isCommit: pgCommit}
		db := openCutPostgres(t, c)
		t.Cleanup(func() { db.Close() })
		tbl := table(t, db, "fxfn")
		mustExec(t, db, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, v text)",
			"CREATE OR REPLACE FUNCTION "+tbl+"_f() RETURNS int LANGUAGE sql AS $$ INSERT INTO "+tbl+" (v) VALUES ('x') RETURNING id $$")
		defer db.Exec("DROP FUNCTION IF EXISTS " + tbl + "_f()")
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		calls := 0
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if calls == 1 {
				c.mode.Store(cutAfterSend)
			}
			var s string
			return tx.QueryRowContext(sqlretry.NotIdempotent(ctx), "SELECT "+tbl+"_f()::text").Scan(&s)
		})
		c.mode.Store(0)
		time.Sleep(200 * time.Millisecond)
		var n int
		db.QueryRow("SELECT count(*) FROM " + tbl).Scan(&n)
		t.Logf("fired=%d err=%v calls=%d rows=%d", c.fired.Load(), err, calls, n)
		if c.fired.Load() == 0 {
			t.Fatal("never cut")
		}
		if n != 1 || err != nil || calls != 1 {
			t.Errorf("err=%v calls=%d rows=%d; want the lost COMMIT resolved as committed: nil, one run, one row", err, calls, n)
		}
	})
	for _, marker := range []bool{true, false} {
		t.Run(fmt.Sprintf("mysql marker=%v", marker), func(t *testing.T) {
			opts := []sqlretry.Option{sqlretry.WithMySQLCommitMarker("")}
			if marker {
				opts = []sqlretry.Option{sqlretry.WithMySQLCommitMarker("fixtx_marker")}
			}
			db := openCutMariaDB(t, opts...)
			t.Cleanup(func() { db.Close() })
			tbl := table(t, db, "fxfn")
			mustExec(t, db, "CREATE TABLE "+tbl+" (id int AUTO_INCREMENT PRIMARY KEY, v text) ENGINE=InnoDB",
				"CREATE FUNCTION "+tbl+"_f() RETURNS int MODIFIES SQL DATA BEGIN INSERT INTO "+tbl+" (v) VALUES ('x'); RETURN LAST_INSERT_ID(); END")
			defer db.Exec("DROP FUNCTION IF EXISTS " + tbl + "_f")
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			calls := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if calls == 1 {
					mysqlCutter.mode.Store(cutAfterSend)
				}
				var s string
				return tx.QueryRowContext(sqlretry.NotIdempotent(ctx), "SELECT "+tbl+"_f()").Scan(&s)
			})
			mysqlCutter.mode.Store(0)
			time.Sleep(300 * time.Millisecond)
			var n int
			db.QueryRow("SELECT count(*) FROM " + tbl).Scan(&n)
			fired := mysqlCutter.fired.Swap(0)
			t.Logf("fired=%d err=%v calls=%d rows=%d", fired, err, calls, n)
			if fired == 0 {
				t.Fatal("never cut")
			}
			if n != 1 || calls != 1 {
				t.Fatalf("err=%v calls=%d rows=%d; want one run and one row", err, calls, n)
			}
			if marker && err != nil {
				t.Errorf("err = %v; the marker shows the COMMIT took effect", err)
			}
			if !marker && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
				t.Errorf("err = %v; want ErrAmbiguousCommit without a marker", err)
			}
		})
	}
}

// A closure that commits part of its work itself (COMMIT by hand, COMMIT;
// BEGIN, an implicit commit by DDL on MySQL), then meets a lock timeout:
// no replay, the committed part stays written once, and the error says
// why. Savepoints and MySQL's temporary tables are no escape: replayed.
// Shared servers (row locks and a short lock timeout only).
func TestFixtxNoReplayAfterTheClosureCommittedPart(t *testing.T) {
	type tc struct {
		name, driver string
		middle       []string
		escapes      bool
	}
	cases := []tc{
		{"mysql COMMIT", "mysql", []string{"COMMIT"}, true},
		{"mysql COMMIT; BEGIN", "mysql", []string{"COMMIT", "BEGIN"}, true},
		{"mysql SET autocommit = 1", "mysql", []string{"SET autocommit = 1"}, true},
		{"mysql CREATE TABLE", "mysql", []string{"CREATE TABLE {tbl}_ddl (id int)"}, true},
		{"mysql ALTER TABLE", "mysql", []string{"ALTER TABLE {tbl}_side ADD COLUMN c int"}, true},
		{"mysql TRUNCATE", "mysql", []string{"TRUNCATE TABLE {tbl}_side"}, true},
		{"mysql comment then DROP", "mysql", []string{"/* x */ DROP TABLE IF EXISTS {tbl}_none"}, true},
		{"mysql SAVEPOINT", "mysql", []string{"SAVEPOINT s1", "RELEASE SAVEPOINT s1"}, false},
		{"mysql CREATE TEMPORARY TABLE", "mysql", []string{"CREATE TEMPORARY TABLE {tbl}_tmp (id int)", "DROP TEMPORARY TABLE {tbl}_tmp"}, false},
		{"pg COMMIT", "pgx", []string{"COMMIT"}, true},
		{"pg COMMIT; BEGIN", "pgx", []string{"COMMIT", "BEGIN"}, true},
		{"pg COMMIT AND CHAIN", "pgx", []string{"COMMIT AND CHAIN"}, true},
		{"pg SAVEPOINT", "pgx", []string{"SAVEPOINT s1", "ROLLBACK TO SAVEPOINT s1", "RELEASE SAVEPOINT s1"}, false},
		{"pg CREATE TABLE", "pgx", []string{"CREATE TABLE {tbl}_ddl (id int)"}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := sharedDSN(t, c.driver)
			ph, lock, hold := "?", "SET SESSION innodb_lock_wait_timeout = 1", 1500*time.Millisecond
			if c.driver == "pgx" {
				ph, lock, hold = "$1", "SET lock_timeout = '300ms'", 450*time.Millisecond
			}
			db, err := sqlretry.Open(c.driver, d)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			tbl := table(t, db, "fxcp")
			mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (7, 0)",
				"CREATE TABLE "+tbl+"_side (id int)")
			defer db.Exec("DROP TABLE IF EXISTS " + tbl + "_side")
			defer db.Exec("DROP TABLE IF EXISTS " + tbl + "_ddl")
			log := table(t, db, "fxlg")
			mustExec(t, db, "CREATE TABLE "+log+" (op varchar(40))")
			release := rowHolder(t, c.driver, d, tbl)
			held := make(chan struct{})
			go func() { time.Sleep(hold); release(); close(held) }()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			calls := 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, lock); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+log+" VALUES ("+ph+")", "once"); err != nil {
					return err
				}
				for _, m := range c.middle {
					if _, err := tx.ExecContext(ctx, strings.ReplaceAll(m, "{tbl}", tbl)); err != nil {
						return err
					}
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 7")
				return err
			})
			<-held
			var n int
			db.QueryRow("SELECT count(*) FROM " + log).Scan(&n)
			t.Logf("err=%v calls=%d log rows=%d", err, calls, n)
			if !c.escapes {
				if err != nil || calls < 2 || n != 1 {
					t.Errorf("err=%v calls=%d log rows=%d; want the lock timeout replayed and one row", err, calls, n)
				}
				return
			}
			if n > 1 || calls != 1 { // SET autocommit = 1 commits only when autocommit was off
				t.Fatalf("calls=%d log rows=%d (err=%v): the closure was replayed after it committed part of its work", calls, n, err)
			}
			if err == nil || !strings.Contains(err.Error(), "committed part of its work itself") {
				t.Errorf("err = %v; want the lock timeout, saying why it was not replayed", err)
			}
		})
	}
}

// A closure that commits (or rolls back) itself: RunInTx returns the
// closure's outcome, not the sql.ErrTxDone of its own COMMIT, and never
// replays. Shared servers.
func TestFixtxClosureCommitsItself(t *testing.T) {
	for _, drv := range []string{"pgx", "mysql"} {
		t.Run(drv, func(t *testing.T) {
			db, err := sqlretry.Open(drv, sharedDSN(t, drv))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			ph := "?"
			if drv == "pgx" {
				ph = "$1"
			}
			tbl := table(t, db, "fxself")
			mustExec(t, db, "CREATE TABLE "+tbl+" (op varchar(40) PRIMARY KEY)")
			count := func(op string) (n int) {
				db.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = "+ph, op).Scan(&n)
				return n
			}
			ctx := context.Background()
			for _, tc := range []struct {
				op   string
				end  func(tx *sql.Tx) error
				want error
				rows int
			}{
				{"return-commit", func(tx *sql.Tx) error { return tx.Commit() }, nil, 1},
				{"commit-nil", func(tx *sql.Tx) error { tx.Commit(); return nil }, nil, 1},
				{"rollback-nil", func(tx *sql.Tx) error { tx.Rollback(); return nil }, sql.ErrTxDone, 0},
			} {
				calls := 0
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ("+ph+")", tc.op); err != nil {
						return err
					}
					return tc.end(tx)
				})
				n := count(tc.op)
				t.Logf("%s: err=%v calls=%d rows=%d", tc.op, err, calls, n)
				if calls != 1 || n != tc.rows || !errors.Is(err, tc.want) || tc.want == nil && err != nil {
					t.Errorf("%s: err=%v calls=%d rows=%d; want %v, one run, %d rows", tc.op, err, calls, n, tc.want, tc.rows)
				}
			}
		})
	}
}
