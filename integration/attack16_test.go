package integration

// Hostile tests of sqlretry (attack16), written from the README and go doc
// only. Each Test below fails on the code it was written against.

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// a16PgRun runs fn as one transaction: through RunInTx for sqlretry (whose
// first attempt fails with 40001 so that the replay is bounded), with
// BeginTx/Commit for the plain driver.
func a16PgRun(t *testing.T, drv string, db *sql.DB, fn func(ctx context.Context, tx *sql.Tx) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if drv == "pgx" {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := fn(ctx, tx); err != nil {
			tx.Rollback()
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		return
	}
	runs := 0
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs == 1 {
			_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack16 conflict' USING ERRCODE = '40001'; END$$`)
			return err
		}
		var cur string
		tx.QueryRowContext(ctx, "SELECT current_setting('deadlock_timeout')||' '||current_setting('lock_timeout')").Scan(&cur)
		t.Logf("replay %d: deadlock_timeout, lock_timeout in the transaction: %s", runs, cur)
		return fn(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func a16Open(t *testing.T, drv string, opts ...sqlretry.Option) *sql.DB {
	var db *sql.DB
	if drv == "pgx" {
		db = atkPlain(t, "pgx")
	} else {
		db = atkOpenPG(t, nil, opts...)
	}
	db.SetMaxOpenConns(1)
	return db
}

func a16Show(t *testing.T, db *sql.DB, setting string) string {
	t.Helper()
	var v string
	if err := db.QueryRow("SHOW " + setting).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestAttack16PgSetConfigRestoreLeaksTheBound: the save/restore fix
// (attack15) only sees a closure's plain `SET lock_timeout`. The same
// save/change/restore helper written any other way PostgreSQL offers
// restores sqlretry's bound (20ms) as the session's value, on the pooled
// connection: set_config(name, value, false) with the name bound as a
// parameter ("param"), a PL/pgSQL function that saves and restores with
// set_config ("function"), SET with the name as a quoted identifier
// (`SET "lock_timeout" = ...`, "quoted"), and UPDATE pg_settings
// ("pg_settings", documented as equivalent to SET). With lock_timeout a
// later autocommit UPDATE on that connection then fails with 55P03 after
// 20 ms where the plain driver waits and succeeds.
func TestAttack16PgSetConfigRestoreLeaksTheBound(t *testing.T) {
	plain := atkPlain(t, "pgx")
	fname := atkName("a16withlt")
	atkMust(t, plain, `CREATE FUNCTION `+fname+`(s text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE saved text := current_setting(s);
BEGIN
  PERFORM set_config(s, '5s', false);
  PERFORM 1;
  PERFORM set_config(s, saved, false);
END$$`)
	t.Cleanup(func() { plain.Exec("DROP FUNCTION " + fname + "(text)") })
	for _, c := range []struct {
		name, setting string
		opts          []sqlretry.Option
	}{
		{"lock_timeout", "lock_timeout", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
		{"deadlock_timeout", "deadlock_timeout", nil},
	} {
		for _, how := range []string{"param", "function", "quoted", "pg_settings"} {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(c.name+"/"+how+"/"+drv, func(t *testing.T) {
					db := a16Open(t, drv, c.opts...)
					before := a16Show(t, db, c.setting)
					a16PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						if how == "function" {
							_, err := tx.ExecContext(ctx, "SELECT "+fname+"($1)", c.setting)
							return err
						}
						var saved string
						if err := tx.QueryRowContext(ctx, "SELECT current_setting($1)", c.setting).Scan(&saved); err != nil {
							return err
						}
						switch how {
						case "quoted": // SET with the name as a quoted identifier
							if _, err := tx.ExecContext(ctx, `SET "`+c.setting+`" = '5s'`); err != nil {
								return err
							}
							_, err := tx.ExecContext(ctx, `SET "`+c.setting+`" = '`+saved+`'`)
							return err
						case "pg_settings": // the documented equivalent of SET
							if _, err := tx.ExecContext(ctx, "UPDATE pg_settings SET setting = '5s' WHERE name = $1", c.setting); err != nil {
								return err
							}
							_, err := tx.ExecContext(ctx, "UPDATE pg_settings SET setting = $2 WHERE name = $1", c.setting, saved)
							return err
						}
						if _, err := tx.ExecContext(ctx, "SELECT set_config($1, '5s', false)", c.setting); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "SELECT set_config($1, $2, false)", c.setting, saved)
						return err
					})
					after := a16Show(t, db, c.setting)
					t.Logf("%s: %s before %q after %q", drv, c.setting, before, after)
					if after != before {
						t.Errorf("the session's %s is %q after the transaction, was %q (the plain driver's is back to its own)", c.setting, after, before)
					}
					if c.setting == "lock_timeout" {
						tbl := atkName("a16sc")
						atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)")
						done := a14HoldRow(t, "pgx", tbl, 1, 300*time.Millisecond)
						time.Sleep(50 * time.Millisecond)
						_, err := db.ExecContext(sqlretry.NoRetry(context.Background()), "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1")
						<-done
						t.Logf("%s: a later autocommit UPDATE waiting 300 ms for its row: %v", drv, err)
						if err != nil {
							t.Errorf("a later statement on the same connection failed where the plain driver waits: %v", err)
						}
					}
				})
			}
		}
	}
}

// TestAttack16PgDeliberateSessionValueEqualToBoundIsUndone: a closure that
// sets the session's deadlock_timeout (or lock_timeout) on purpose to a
// value that happens to equal sqlretry's bound (20ms) has it set back to
// the old value after the COMMIT; the plain driver keeps what the closure
// set. Passes since a bounded attempt that touches the setting runs again
// unbounded (touchedRedo).
func TestAttack16PgDeliberateSessionValueEqualToBoundIsUndone(t *testing.T) {
	for _, c := range []struct {
		setting, value string
		opts           []sqlretry.Option
	}{
		{"lock_timeout", "20ms", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
		{"deadlock_timeout", "20ms", nil},
	} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				before := a16Show(t, db, c.setting)
				a16PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "SET SESSION "+c.setting+" = '"+c.value+"'")
					return err
				})
				after := a16Show(t, db, c.setting)
				t.Logf("%s: %s before %q after %q", drv, c.setting, before, after)
				if after != c.value {
					t.Errorf("the session's %s is %q after a transaction that set it to %q (plain driver: %q)", c.setting, after, c.value, c.value)
				}
			})
		}
	}
}

// TestAttack16PgPrepareInClosureBreaksReplay: PostgreSQL's SQL-level
// PREPARE is not transactional: a statement prepared in a transaction that
// rolls back stays on the session. A closure that PREPAREs, EXECUTEs and
// DEALLOCATEs (all inside its transaction) and meets a serialization
// failure between PREPARE and DEALLOCATE is replayed on the same pooled
// connection, where its PREPARE now fails with 42P05 "prepared statement
// already exists", and RunInTx returns that error for a transaction the
// replay was meant to commit.
func TestAttack16PgPrepareInClosureBreaksReplay(t *testing.T) {
	if os.Getenv("ATTACK16_DEFECTS") == "" {
		t.Skip("left: an SQL PREPARE survives ROLLBACK, and the replay's PREPARE fails with 42P05 (README: what a replay cannot undo); run with ATTACK16_DEFECTS=1")
	}
	db := atkOpenPG(t, nil)
	db.SetMaxOpenConns(1)
	tbl := atkName("a16prep")
	atkMust(t, db, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	runs := 0
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "PREPARE a16bump(int) AS UPDATE "+tbl+" SET v = v + 1 WHERE id = $1"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "EXECUTE a16bump(1)"); err != nil {
			return err
		}
		if runs == 1 { // the server rolls this attempt back: a serialization failure
			if _, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack16 conflict' USING ERRCODE = '40001'; END$$`); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, "DEALLOCATE a16bump")
		return err
	})
	v := atkCount(t, db, "SELECT v FROM "+tbl+" WHERE id = 1")
	t.Logf("RunInTx: runs=%d err=%v; v=%d", runs, err, v)
	if err != nil || v != 1 {
		t.Errorf("a replayed closure failed on the session state its rolled-back attempt left (runs=%d, err=%v, v=%d): the replay runs on the session the failed attempt left behind, where the plain driver ran the closure once", runs, err, v)
	}
}

// TestAttack16PgSetRoleAfterRestoreDropsTheSession: a closure replayed
// under the short deadlock check saves deadlock_timeout, sets it for its
// work and restores it (attack15's helper), then drops privileges for the
// rest of the session with SET ROLE (least privilege for what follows).
// After the COMMIT, the attack15 fix's SET SESSION deadlock_timeout runs
// under that role, which may not set it; sqlretry then discards the
// connection. The transaction committed and RunInTx says nil, but the
// session the closure left (its role, and with it every session-level
// thing: temporary tables, prepared statements, settings) is gone: the
// next statement on the db runs on a new connection as the superuser. The
// plain driver keeps the session: the next statement runs as the role.
func TestAttack16PgSetRoleAfterRestoreDropsTheSession(t *testing.T) {
	plain := atkPlain(t, "pgx")
	role := atkName("a16role")
	atkMust(t, plain, "CREATE ROLE "+role)
	t.Cleanup(func() { plain.Exec("DROP OWNED BY " + role); plain.Exec("DROP ROLE " + role) })
	tbl := atkName("a16sr")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)", "GRANT ALL ON "+tbl+" TO "+role)
	for _, drv := range []string{"pgx", "sqlretry", "sqlretry-no-setting"} {
		t.Run(drv, func(t *testing.T) {
			noSetting := drv == "sqlretry-no-setting"
			if noSetting {
				drv = "sqlretry"
			}
			db := a16Open(t, drv)
			var pid0 int
			if err := db.QueryRow("SELECT pg_backend_pid()").Scan(&pid0); err != nil {
				t.Fatal(err)
			}
			a16PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
				if noSetting { // control: the same closure without the save/SET/restore
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "CREATE TEMP TABLE a16scratch (x int)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SET ROLE "+role)
					return err
				}
				var saved string
				if err := tx.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&saved); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "SET deadlock_timeout = '5s'"); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "SET deadlock_timeout = '"+saved+"'"); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "CREATE TEMP TABLE a16scratch (x int)"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "SET ROLE "+role)
				return err
			})
			var who string
			var pid int
			if err := db.QueryRow("SELECT current_user, pg_backend_pid()").Scan(&who, &pid); err != nil {
				t.Fatal(err)
			}
			temp := atkCount(t, db, "SELECT count(*) FROM pg_tables WHERE tablename = 'a16scratch' AND schemaname LIKE 'pg_temp%'")
			t.Logf("%s: after the transaction: current_user %s, backend %d -> %d, the closure's temp table: %d", drv, who, pid0, pid, temp)
			if who != role || pid != pid0 || temp != 1 {
				t.Errorf("the session the closure left is gone: the next statement runs as %s on backend %d (was %d), temp table %d; the plain driver's runs as %s on the same session", who, pid, pid0, temp, role)
			}
		})
	}
}

// a16MyRun runs fn as one transaction: RunInTx for sqlretry, BeginTx and
// Commit for the plain driver; it returns the outcome, or gives up
// waiting after wait (done false).
//
//lint:ignore ST1008 the outcome first, as the tests read it
func a16MyRun(ctx context.Context, drv string, db *sql.DB, wait time.Duration, fn func(ctx context.Context, tx *sql.Tx) error) (err error, took time.Duration, done bool) {
	start := time.Now()
	ch := make(chan error, 1)
	go func() {
		if drv == "mysql" {
			tx, e := db.BeginTx(ctx, nil)
			if e != nil {
				ch <- e
				return
			}
			if e = fn(ctx, tx); e != nil {
				tx.Rollback()
				ch <- e
				return
			}
			ch <- tx.Commit()
			return
		}
		ch <- sqlretry.RunInTx(ctx, db, nil, fn)
	}()
	select {
	case err = <-ch:
		return err, time.Since(start), true
	case <-time.After(wait):
		return nil, time.Since(start), false
	}
}

// TestAttack16MyGlobalReadLockHangsCommitted: attack15's FLUSH TABLES fix
// covers `FLUSH TABLES t WITH READ LOCK` and `FOR EXPORT`; the global
// `FLUSH TABLES WITH READ LOCK` (a backup script's first statement; it
// commits the transaction implicitly, as the table form does) in the first
// writing transaction of a db (the marker table already there, created by
// another db of the program) is not covered. The plain driver's COMMIT
// returns at once, nil, the INSERT committed. Through sqlretry, RunInTx
// does not return: with a deadline (6 s) it returns
// context.DeadlineExceeded (not ErrAmbiguousCommit) for a transaction that
// committed; with none it is still waiting when the test gives up (8 s),
// and while it waits the session keeps the global read lock, so another
// client's INSERT waits too. (The same closure in a later transaction of a
// db that already wrote commits at once: the wait is in sqlretry's first
// use of the marker table, which the closure's own global read lock
// blocks.) Run on a private MariaDB.
func TestAttack16MyGlobalReadLockHangsCommitted(t *testing.T) {
	srv, err := dbserver.StartLocal(dbserver.MariaDB)
	if err != nil {
		t.Skipf("no private MariaDB: %v", err)
	}
	t.Cleanup(srv.Stop)
	admin, err := sql.Open("mysql", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close() })
	for _, c := range []struct {
		drv      string
		deadline bool
	}{{"mysql", true}, {"sqlretry", true}, {"sqlretry", false}} {
		name := c.drv + map[bool]string{true: "/deadline", false: "/no-deadline"}[c.deadline]
		t.Run(name, func(t *testing.T) {
			tbl := atkName("a16gl")
			atkMust(t, admin, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40))")
			var db *sql.DB
			if c.drv == "mysql" {
				db, err = sql.Open("mysql", srv.DSN)
			} else {
				db, err = sqlretry.Open("mysql", srv.DSN)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			db.SetMaxOpenConns(1)
			// the marker table is there (another db of the program created it); this db's first writing transaction is the closure's
			if _, err := admin.Exec("CREATE TABLE IF NOT EXISTS a16seed (x int)"); err != nil {
				t.Fatal(err)
			}
			if seed, err := sqlretry.Open("mysql", srv.DSN); err == nil {
				sqlretry.RunInTx(context.Background(), seed, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO a16seed VALUES (1)")
					return err
				})
				seed.Close()
			}
			ctx := context.Background()
			if c.deadline {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, 6*time.Second)
				defer cancel()
			}
			err, took, done := a16MyRun(ctx, c.drv, db, 8*time.Second, func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('x')"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "FLUSH TABLES WITH READ LOCK")
				return err
			})
			// another client's write while the call is (or was) in flight
			octx, ocancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			_, oerr := admin.ExecContext(octx, "INSERT INTO "+tbl+" (tag) VALUES ('other')")
			ocancel()
			if done {
				db.Exec("UNLOCK TABLES")
			}
			n := atkCount(t, admin, "SELECT count(*) FROM "+tbl+" WHERE tag = 'x'")
			t.Logf("%s: returned=%v after %v, err=%v (ErrAmbiguousCommit: %v); rows=%d; another client's INSERT just after: %v", name, done, took.Round(time.Millisecond), err, errors.Is(err, sqlretry.ErrAmbiguousCommit), n, oerr)
			if !done {
				t.Errorf("RunInTx has not returned after %v for a transaction that committed (rows=%d); the plain driver's COMMIT returns at once", took.Round(time.Millisecond), n)
				return
			}
			if err != nil && n == 1 {
				t.Errorf("a committed transaction reported failed after %v: %v (the plain driver: nil at once)", took.Round(time.Millisecond), err)
			}
		})
	}
}

// TestAttack16MyBackupLockCommittedButError: MariaDB's `BACKUP LOCK t`
// (what mariabackup takes to copy a table's files consistently) in a
// closure. The plain driver's COMMIT succeeds and the INSERT before it is
// committed. Through sqlretry the commit marker's INSERT meets the backup
// lock (1223, "conflicting read lock"), and RunInTx returns that error for
// a transaction whose INSERT is committed.
func TestAttack16MyBackupLockCommittedButError(t *testing.T) {
	plain := atkPlain(t, "mysql")
	tbl := atkName("a16bl")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40))")
	for _, drv := range []string{"mysql", "sqlretry"} {
		t.Run(drv, func(t *testing.T) {
			var db *sql.DB
			if drv == "mysql" {
				db = atkPlain(t, "mysql")
			} else {
				db = a15OpenMyGate(t)
			}
			db.SetMaxOpenConns(1)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err, took, done := a16MyRun(ctx, drv, db, 12*time.Second, func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('"+drv+"')"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "BACKUP LOCK "+tbl)
				return err
			})
			db.Exec("BACKUP UNLOCK")
			n := atkCount(t, plain, "SELECT count(*) FROM "+tbl+" WHERE tag = '"+drv+"'")
			t.Logf("%s: returned=%v after %v err=%v rows=%d", drv, done, took.Round(time.Millisecond), err, n)
			if err != nil && n == 1 {
				t.Errorf("a committed transaction reported failed: %v (the plain driver's COMMIT: nil)", err)
			}
		})
	}
}
