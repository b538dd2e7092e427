package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/sqlretry/sqlretry"
)

// holdRow makes another session hold row id=1 of lockTbl FOR UPDATE until cleanup.
func a4HoldRow(t *testing.T, plain *sql.DB, lockTbl string) {
	t.Helper()
	ctx := context.Background()
	c, err := plain.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := c.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT n FROM "+lockTbl+" WHERE id = 1 FOR UPDATE").Scan(&n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback(); c.Close() })
}

// (1) A closure that ends the transaction itself (COMMIT, START TRANSACTION,
// LOCK TABLES, CALL of a committing procedure, SET autocommit=1 after =0),
// writes, then meets a lock wait timeout: RunInTx must not replay (the
// committed write would double).
func TestAttack4MyOwnCommitThenLockTimeoutNotReplayed(t *testing.T) {
	plain := atkPlain(t, "mysql")
	db := atkOpenMy(t)
	log := atkName("a4log")
	lk := atkName("a4lock")
	proc := atkName("a4proc")
	atkMust(t, plain,
		"CREATE TABLE "+log+" (id int AUTO_INCREMENT PRIMARY KEY, tag varchar(40)) ENGINE=InnoDB",
		"CREATE TABLE "+lk+" (id int PRIMARY KEY, n int) ENGINE=InnoDB",
		"INSERT INTO "+lk+" VALUES (1,0)",
		"CREATE PROCEDURE "+proc+"() BEGIN COMMIT; END",
	)
	t.Cleanup(func() {
		plain.Exec("DROP TABLE IF EXISTS " + log)
		plain.Exec("DROP TABLE IF EXISTS " + lk)
		plain.Exec("DROP PROCEDURE IF EXISTS " + proc)
	})
	a4HoldRow(t, plain, lk)
	cases := []struct{ name, ender string }{
		{"commit", "COMMIT"},
		{"start", "START TRANSACTION"},
		{"begin", "BEGIN"},
		{"locktables", "LOCK TABLES " + log + " WRITE"},
		{"call", "CALL " + proc + "()"},
		{"autocommit", "SET autocommit = 0; SET autocommit = 1"},
		{"autocommit1", "SET autocommit = 1"},
		{"rollback", "ROLLBACK"}, // rollback ends tx; write after it autocommits
		{"ddl", "CREATE TEMPORARY TABLE IF NOT EXISTS a4tmp (x int); DROP TEMPORARY TABLE a4tmp; ANALYZE TABLE " + lk},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 12*time.Second)
			defer cancel()
			var calls atomic.Int32
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls.Add(1)
				if _, err := tx.ExecContext(ctx, "SET SESSION innodb_lock_wait_timeout = 1"); err != nil {
					return err
				}
				if tc.name == "rollback" {
					if _, err := tx.ExecContext(ctx, "ROLLBACK"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+log+" (tag) VALUES (?)", tc.name); err != nil {
						return err
					}
				} else {
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+log+" (tag) VALUES (?)", tc.name); err != nil {
						return err
					}
					for _, q := range strings.Split(tc.ender, "; ") {
						if _, err := tx.ExecContext(ctx, q); err != nil {
							return fmt.Errorf("%s: %w", q, err)
						}
					}
				}
				if tc.name == "locktables" {
					tx.ExecContext(ctx, "UNLOCK TABLES")
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+lk+" SET n = n + 1 WHERE id = 1")
				return err
			})
			var rows int
			plain.QueryRow("SELECT COUNT(*) FROM "+log+" WHERE tag = ?", tc.name).Scan(&rows)
			t.Logf("%s: calls=%d rows=%d err=%v", tc.name, calls.Load(), rows, err)
			if err == nil {
				t.Errorf("success reported though the UPDATE timed out")
			}
			if rows > 1 || calls.Load() > 1 {
				t.Errorf("REPLAYED after the closure's own commit: calls=%d rows=%d", calls.Load(), rows)
			}
		})
	}
}

// (1b) SET autocommit = 0 left on the connection by a closure: later
// autocommit writes through the same pool must still be durable.
func TestAttack4MyAutocommitZeroLeaksToPool(t *testing.T) {
	plain := atkPlain(t, "mysql")
	db := atkOpenMy(t)
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	tbl := atkName("a4ac")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int AUTO_INCREMENT PRIMARY KEY, tag varchar(20)) ENGINE=InnoDB")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('tx')"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "SET autocommit = 0")
		return err
	})
	t.Logf("tx err=%v", err)
	if _, err := db.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('auto')"); err != nil {
		t.Fatalf("autocommit insert: %v", err)
	}
	err2 := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('tx2')")
		return err
	})
	t.Logf("tx2 err=%v", err2)
	var tx1, auto, tx2 int
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE tag='tx'").Scan(&tx1)
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE tag='auto'").Scan(&auto)
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE tag='tx2'").Scan(&tx2)
	t.Logf("visible from another session: tx=%d auto=%d tx2=%d", tx1, auto, tx2)
	if err == nil && tx1 != 1 {
		t.Errorf("first tx reported success, row count %d", tx1)
	}
	if auto != 1 {
		t.Errorf("autocommit INSERT reported success but is not committed (%d rows)", auto)
	}
	if err2 == nil && tx2 != 1 {
		t.Errorf("tx2 reported success but %d rows", tx2)
	}
	db.Close()
	time.Sleep(200 * time.Millisecond)
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE tag='auto'").Scan(&auto)
	t.Logf("after close: auto=%d", auto)
}

// (1c) Closure writes then returns its own error / panics: nothing stays,
// one call, own error back, panic propagates.
func TestAttack4MyWriteThenOwnErrorOrPanic(t *testing.T) {
	plain := atkPlain(t, "mysql")
	db := atkOpenMy(t)
	tbl := atkName("a4err")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int AUTO_INCREMENT PRIMARY KEY, tag varchar(20)) ENGINE=InnoDB")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	mine := errors.New("mine")
	var calls int
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('err')"); err != nil {
			return err
		}
		return mine
	})
	if err != mine || calls != 1 {
		t.Errorf("own error: err=%v calls=%d", err, calls)
	}
	func() {
		defer func() {
			r := recover()
			if r != "boom" {
				t.Errorf("panic value %v", r)
			}
		}()
		sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('panic')")
			panic("boom")
		})
	}()
	// own error wrapping a MySQL deadlock-like error code from SIGNAL after a write
	calls = 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('signal')"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'fake deadlock'")
		return err
	})
	t.Logf("signal 1213: err=%v calls=%d", err, calls)
	var n int
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&n)
	if n != 0 {
		t.Errorf("%d rows left after error/panic/signal transactions, want 0", n)
	}
	// the pool must still work
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('ok')")
		return err
	}); err != nil {
		t.Errorf("after panic: %v", err)
	}
	plain.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&n)
	if n != 1 {
		t.Errorf("rows %d, want 1", n)
	}
}

// (1d) Private MariaDB: a pre-existing table named like the default marker
// with another shape; sql_mode variants; a user without CREATE.
func TestAttack4MyMarkerOddEnvironments(t *testing.T) {
	root, cfg, name := privateMariaDB(t)
	mustExec(t, root, "CREATE TABLE t (id int PRIMARY KEY, n int)", "INSERT INTO t VALUES (1, 0)")
	run := func(t *testing.T, c *mysql.Config, k int, want int) {
		db, log := openLogged(t, c)
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var before int
		root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&before)
		ok := 0
		var calls int
		for range k {
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1 WHERE id = 1")
				return err
			})
			if err != nil {
				t.Errorf("writing tx: %v", err)
			} else {
				ok++
			}
		}
		var after int
		root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&after)
		off, e := log.count(sqlretry.EventResolutionOff)
		t.Logf("ok=%d calls=%d delta=%d resolutionOff=%d (%v %s)", ok, calls, after-before, off, e.Err, e.Reason)
		if after-before != ok {
			t.Errorf("reported %d successes, %d increments applied", ok, after-before)
		}
	}
	t.Run("sql_mode=ORACLE", func(t *testing.T) {
		c := cfg.Clone()
		c.Params = map[string]string{"sql_mode": "'ORACLE'"}
		run(t, c, 3, 3)
	})
	t.Run("sql_mode=ANSI,NO_BACKSLASH_ESCAPES", func(t *testing.T) {
		c := cfg.Clone()
		c.Params = map[string]string{"sql_mode": "'ANSI,NO_BACKSLASH_ESCAPES,PAD_CHAR_TO_FULL_LENGTH'"}
		run(t, c, 3, 3)
	})
	t.Run("sql_mode=ORACLE,multiStatements", func(t *testing.T) {
		c := cfg.Clone()
		c.MultiStatements = true
		c.Params = map[string]string{"sql_mode": "'ORACLE'"}
		run(t, c, 3, 3)
	})
	t.Run("closure sets sql_mode ORACLE", func(t *testing.T) {
		conn, _ := mysql.NewConnector(cfg)
		db := sqlretry.OpenDB(conn)
		defer db.Close()
		db.SetMaxOpenConns(1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var before, after, calls int
		root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&before)
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "SET SESSION sql_mode = 'ORACLE'"); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1 WHERE id = 1")
			return err
		})
		root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&after)
		t.Logf("err=%v calls=%d delta=%d", err, calls, after-before)
		if (err == nil) != (after-before == 1) || after-before > 1 {
			t.Errorf("err=%v but delta=%d", err, after-before)
		}
	})
	t.Run("foreign table named like the marker", func(t *testing.T) {
		mustExec(t, root, "DROP TABLE IF EXISTS "+sqlretry.DefaultMySQLCommitMarker, "CREATE TABLE "+sqlretry.DefaultMySQLCommitMarker+" (id int AUTO_INCREMENT PRIMARY KEY, note text NOT NULL)")
		defer root.Exec("DROP TABLE IF EXISTS " + sqlretry.DefaultMySQLCommitMarker)
		run(t, cfg, 3, 3)
	})
	t.Run("marker-named table with token but a trigger that fails", func(t *testing.T) {
		mustExec(t, root, "DROP TABLE IF EXISTS "+sqlretry.DefaultMySQLCommitMarker, "CREATE TABLE "+sqlretry.DefaultMySQLCommitMarker+" (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB")
		defer root.Exec("DROP TABLE IF EXISTS " + sqlretry.DefaultMySQLCommitMarker)
		run(t, cfg, 2, 2)
	})
	t.Run("MyISAM marker table", func(t *testing.T) {
		mustExec(t, root, "DROP TABLE IF EXISTS "+sqlretry.DefaultMySQLCommitMarker, "CREATE TABLE "+sqlretry.DefaultMySQLCommitMarker+" (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=MyISAM")
		defer root.Exec("DROP TABLE IF EXISTS " + sqlretry.DefaultMySQLCommitMarker)
		// A marker in a non-transactional table survives a rolled back
		// transaction: a closure that fails at COMMIT... just check basic.
		run(t, cfg, 2, 2)
	})
	_ = name
}
