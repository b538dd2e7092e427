package integration

// Hostile tests of sqlretry (attack17): PostgreSQL short deadlock checks and
// short lock waits, and the session state a replayed closure leaves on the
// pooled connection. Each runs the same closure through the plain driver
// (BeginTx/Commit) and through RunInTx on a db whose first attempt fails
// with 40001, so that the replay carries sqlretry's bound (a16PgRun), on a
// pool of one connection, and compares the session's value of the setting
// afterwards.

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

type a17PgCase struct {
	setting string
	opts    []sqlretry.Option
}

var a17PgCases = []a17PgCase{
	{"lock_timeout", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
	{"deadlock_timeout", nil},
}

// a17PgRun is a16PgRun without its log statement in the replay (which
// names both settings, and so counts as touching them).
func a17PgRun(t *testing.T, drv string, db *sql.DB, fn func(ctx context.Context, tx *sql.Tx) error) {
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
			_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack17 conflict' USING ERRCODE = '40001'; END$$`)
			return err
		}
		return fn(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
	// 3: the replay touched the setting and ran again unbounded
	// (touchedRedo); 4: that run met a statement its DEALLOCATE ALL took.
	if runs < 2 || runs > 4 {
		t.Fatalf("runs %d", runs)
	}
}

// a17After reads the setting with a text no closure used (pgx caches
// prepared statements by text).
func a17After(t *testing.T, db *sql.DB, setting string) string {
	t.Helper()
	var v string
	if err := db.QueryRow("SELECT current_setting('" + setting + "') /* a17 after */").Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// a17LaterUpdateWaits runs an autocommit UPDATE on db (one connection)
// that waits 300 ms for a row another session holds; the plain driver's
// session (lock_timeout 0) waits and succeeds.
func a17LaterUpdateWaits(t *testing.T, db *sql.DB) error {
	plain := atkPlain(t, "pgx")
	tbl := atkName("a17later")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
	done := a14HoldRow(t, "pgx", tbl, 1, 300*time.Millisecond)
	time.Sleep(50 * time.Millisecond)
	_, err := db.ExecContext(sqlretry.NoRetry(context.Background()), "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1")
	<-done
	return err
}

// TestAttack17PgDeallocateAllLeaksTheBound: attack15's helper (save the
// setting, change it, restore it with a session-level SET), then
// `DEALLOCATE ALL` in the same closure. sqlretry's restore after the COMMIT
// (restoreBound) sends `SHOW <setting> /* sqlretry */`, a text pgx has
// cached as a prepared statement since the attempt's own SHOW; the server
// no longer has it, the SHOW fails (26000) and the restore silently does
// nothing. The bound (20ms) stays the session's value on the pooled
// connection: with lock_timeout a later autocommit UPDATE on it that waits
// 300 ms for a row fails with 55P03, where the plain driver's session is
// back to its own value (0, 1s) and the UPDATE waits and succeeds. Fails
// every run.
func TestAttack17PgDeallocateAllLeaksTheBound(t *testing.T) {
	for _, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				before := a16Show(t, db, c.setting)
				a17PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var saved string
					if err := tx.QueryRowContext(ctx, "SELECT current_setting('"+c.setting+"')").Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+saved+"'"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "DEALLOCATE ALL")
					return err
				})
				after := a17After(t, db, c.setting)
				t.Logf("%s: %s before %q after %q", drv, c.setting, before, after)
				if after != before {
					t.Errorf("the session's %s is %q after the transaction, was %q (the plain driver's is back to its own)", c.setting, after, before)
				}
				if c.setting == "lock_timeout" {
					err := a17LaterUpdateWaits(t, db)
					t.Logf("%s: a later autocommit UPDATE waiting 300 ms for its row: %v", drv, err)
					if err != nil {
						t.Errorf("a later statement on the same connection failed where the plain driver waits: %v", err)
					}
				}
			})
		}
	}
}

// TestAttack17PgCallOnItsOwnLineLeaksTheBound: the README says a closure
// statement that may set the setting is "read widely", naming `CALL` and
// `DO` among what is seen. The check looks for "call " with a space: a
// `CALL` written on its own line (`CALL\n  proc()`, as a Go raw string
// lays it out) or followed by a tab is not seen, nor is `EXECUTE` of an
// SQL-prepared statement that saves or restores the setting. The
// procedure saves the setting, changes it and restores it with
// set_config(..., false) (attack15's helper, server-side): under sqlretry it
// saves and restores the bound (20ms), which becomes the session's value on
// the pooled connection; the plain driver's session is back to its own.
// With lock_timeout a later autocommit UPDATE that waits 300 ms for a row
// fails with 55P03 where the plain driver's waits and succeeds. Fails every
// run.
func TestAttack17PgCallOnItsOwnLineLeaksTheBound(t *testing.T) {
	plain := atkPlain(t, "pgx")
	for _, c := range a17PgCases {
		proc := atkName("a17p_" + c.setting[:4])
		atkMust(t, plain, `CREATE PROCEDURE `+proc+`() LANGUAGE plpgsql AS $$
DECLARE saved text := current_setting('`+c.setting+`');
BEGIN
  PERFORM set_config('`+c.setting+`', '5s', false);
  PERFORM 1;
  PERFORM set_config('`+c.setting+`', saved, false);
END$$`)
		t.Cleanup(func() { plain.Exec("DROP PROCEDURE " + proc + "()") })
		for _, how := range []string{"newline", "tab", "execute"} {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(c.setting+"/"+how+"/"+drv, func(t *testing.T) {
					db := a16Open(t, drv, c.opts...)
					if how == "execute" { // prepared on the session before (an AfterConnect hook's)
						atkMust(t, db, "PREPARE a17get AS SELECT current_setting('"+c.setting+"')",
							"PREPARE a17put(text) AS SELECT set_config('"+c.setting+"', $1, false)")
					}
					before := a16Show(t, db, c.setting)
					a17PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						switch how {
						case "newline":
							_, err := tx.ExecContext(ctx, "CALL\n  "+proc+"()")
							return err
						case "tab":
							_, err := tx.ExecContext(ctx, "CALL\t"+proc+"()")
							return err
						}
						var saved string
						if err := tx.QueryRowContext(ctx, "EXECUTE a17get").Scan(&saved); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "EXECUTE a17put('5s')"); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "EXECUTE a17put('"+saved+"')")
						return err
					})
					after := a17After(t, db, c.setting)
					t.Logf("%s: %s before %q after %q", drv, c.setting, before, after)
					if after != before {
						t.Errorf("the session's %s is %q after the transaction, was %q (the plain driver's is back to its own)", c.setting, after, before)
					}
					if c.setting == "lock_timeout" {
						err := a17LaterUpdateWaits(t, db)
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

// TestAttack17PgEnsureSeesTheBound: a closure that gives the session a
// value of its own when it has none yet (`set_config(name, '3s', false)
// WHERE current_setting(name) = <the default>`, an "ensure a lock timeout
// is configured" guard) reads sqlretry's SET LOCAL bound in a replay, so
// it does not set it: the plain driver's session has 3s afterwards,
// sqlretry's its old value (0 / 1s), on every later statement of the
// pooled connection. (The README says server-side code can read the bound
// with current_setting; the consequence here outlives the transaction, a
// session state the plain driver would not leave.) Fails every run.
func TestAttack17PgEnsureSeesTheBound(t *testing.T) {
	for _, c := range a17PgCases {
		def := "0"
		if c.setting == "deadlock_timeout" {
			def = "1s"
		}
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				before := a16Show(t, db, c.setting)
				if before != def {
					t.Skipf("the session's %s is %q, not the default %q", c.setting, before, def)
				}
				a17PgRun(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "SELECT set_config('"+c.setting+"', '3s', false) WHERE current_setting('"+c.setting+"') = '"+def+"'")
					return err
				})
				after := a17After(t, db, c.setting)
				t.Logf("%s: %s before %q after %q", drv, c.setting, before, after)
				if after != "3s" {
					t.Errorf("the session's %s is %q after a transaction that gave it 3s where it had the default (plain driver: 3s)", c.setting, after)
				}
			})
		}
	}
}

// TestAttack17PgBouncerRestoreLeaksToOtherClients: behind PgBouncer in
// transaction mode (a private server and pooler), six callers run
// attack15's helper (save the setting, change it for the work, restore
// it with a session-level SET) in transactions. With the plain driver the
// helper is net zero on whatever server connection ran it. Through
// sqlretry, replays (the first attempt fails with 40001) save and restore
// the bound, which the COMMIT makes the server connection's value; the
// restore after the COMMIT is two more autocommit statements (SHOW, then
// SET), which the pooler sends to whichever server connection is free:
// another client's. Server connections are left with the bound (20ms)
// as their session value, and any client of the pooler may get one.
// Sampled afterwards by holding a transaction on every server connection.
func TestAttack17PgBouncerRestoreLeaksToOtherClients(t *testing.T) {
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
	mustExec(t, admin, "CREATE TABLE a17b (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO a17b SELECT g, 0 FROM generate_series(1, 10) g")
	through := bouncer.DSN + "&default_query_exec_mode=exec"
	for _, c := range a17PgCases {
		def := "0"
		if c.setting == "deadlock_timeout" {
			def = "1s"
		}
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				var db *sql.DB
				if drv == "pgx" {
					db = a12Plain(t, through)
					db.SetMaxOpenConns(6)
				} else {
					db = a12Open(t, through, 6, nil, c.opts...)
				}
				ctx := a12Ctx(t, 30*time.Second)
				body := func(ctx context.Context, tx *sql.Tx) error {
					var saved string
					if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE a17b SET n = n + 1 WHERE id = 5"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+saved+"'")
					return err
				}
				stop := time.Now().Add(2 * time.Second)
				var wg sync.WaitGroup
				var calls atomic.Int64
				var firstErr atomic.Value
				for range 6 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for time.Now().Before(stop) {
							var err error
							if drv == "pgx" {
								var tx *sql.Tx
								if tx, err = db.BeginTx(ctx, nil); err == nil {
									if err = body(ctx, tx); err == nil {
										err = tx.Commit()
									} else {
										tx.Rollback()
									}
								}
							} else {
								_, err = a12Replay(ctx, db, body)
							}
							if err != nil {
								firstErr.CompareAndSwap(nil, err.Error())
								return
							}
							calls.Add(1)
						}
					}()
				}
				wg.Wait()
				if e := firstErr.Load(); e != nil {
					t.Fatalf("a call failed: %v", e)
				}
				// every server connection: hold 20 transactions at once (the pool's size)
				sample := a12Plain(t, through)
				sample.SetMaxOpenConns(20)
				var mu sync.Mutex
				seen := map[string]int{}
				var bar sync.WaitGroup
				bar.Add(20)
				var all sync.WaitGroup
				for range 20 {
					all.Add(1)
					go func() {
						defer all.Done()
						tx, err := sample.BeginTx(ctx, nil)
						if err != nil {
							bar.Done()
							return
						}
						defer tx.Rollback()
						var v string
						tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v)
						mu.Lock()
						seen[v]++
						mu.Unlock()
						bar.Done()
						bar.Wait()
					}()
				}
				all.Wait()
				leaked := 0
				for v, n := range seen {
					if v != def {
						leaked += n
					}
				}
				t.Logf("%s: %d calls; the server connections' %s: %v", drv, calls.Load(), c.setting, seen)
				if leaked > 0 {
					t.Errorf("%d server connections of the pooler have a %s other than %s, which other clients get (the plain driver leaves none)", leaked, c.setting, def)
				}
			})
		}
	}
}

// TestAttack17PgTempPgSettingsBypassesReadOnly: the session is read-only
// by the user's choice (SET default_transaction_read_only = on), and it
// has a temporary table named pg_settings (PostgreSQL searches the
// session's temporary schema first for relations, before pg_catalog).
// An autocommit INSERT fails with 25006. The plain driver returns that
// error. sqlretry asks the session whether the server or the user made it
// read-only with an unqualified `FROM pg_settings`, reads the temporary
// table (which says the configuration file did), takes the session for a
// fenced primary, discards it and runs the INSERT on a new connection,
// where it succeeds: a read-only session the user asked for is bypassed
// through another connection (DESIGN: never).
func TestAttack17PgTempPgSettingsBypassesReadOnly(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := atkName("a17ro")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int)")
	t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
	for _, drv := range []string{"pgx", "sqlretry"} {
		t.Run(drv, func(t *testing.T) {
			db := a16Open(t, drv)
			atkMust(t, db, "CREATE TEMP TABLE pg_settings (name text, setting text, source text)",
				"INSERT INTO pg_settings VALUES ('default_transaction_read_only', 'on', 'configuration file')",
				"SET default_transaction_read_only = on")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := db.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)")
			n := atkCount(t, plain, "SELECT count(*) FROM "+tbl)
			t.Logf("%s: INSERT in a read-only session: err=%v; rows=%d", drv, err, n)
			if drv == "sqlretry" && (err == nil || n != 0) {
				t.Errorf("the write went through (err=%v, rows=%d) where the plain driver refuses it as read-only (the user's session setting)", err, n)
			}
			plain.Exec("DELETE FROM " + tbl)
		})
	}
}

// TestAttack17PgDeallocateAllTurnsShortChecksOff: one `DEALLOCATE ALL` on
// one pooled connection (here an autocommit statement of some caller)
// turns short deadlock checks (on by default) and short lock waits off for
// the whole db, for good. The next bounded attempt on that connection
// sends its cached `SHOW ... /* sqlretry */`, which fails with 26000
// (prepared statement does not exist); sqlretry takes that for an engine
// that refuses the setting ("turns them off for the db"). Every later
// replay of every connection then waits the server's deadlock_timeout
// (1 s) before a deadlock is found, as with WithShortDeadlockCheck(false).
// The caller sees no error. Fails every run.
func TestAttack17PgDeallocateAllTurnsShortChecksOff(t *testing.T) {
	for _, c := range a17PgCases {
		t.Run(c.setting, func(t *testing.T) {
			db := a16Open(t, "sqlretry", c.opts...)
			db.SetMaxOpenConns(2)
			// Read through a view: a statement naming the setting makes the
			// attempt run again unbounded (touchedRedo), and shows nothing
			// of the bound.
			view := atkName("a17view")
			plain := atkPlain(t, "pgx")
			atkMust(t, plain, "CREATE VIEW "+view+" AS SELECT current_setting('"+c.setting+"') AS v")
			t.Cleanup(func() { plain.Exec("DROP VIEW " + view) })
			a17PgRun(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error { return nil }) // the bound's statements are cached
			atkMust(t, db, "DEALLOCATE ALL")
			for i := range 3 {
				var in string
				a17PgRun(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
					return tx.QueryRowContext(ctx, "SELECT v FROM "+view+" /* a17 in replay */").Scan(&in)
				})
				t.Logf("replay after DEALLOCATE ALL, round %d: %s in the transaction", i+1, in)
				if i == 2 && (in == "0" || in == "1s") {
					t.Errorf("replays run without the bound (%s = %s) after one DEALLOCATE ALL on one connection: the feature is off for the db", c.setting, in)
				}
			}
		})
	}
}

// TestAttack17PgDeallocateAllFailsCommit: a closure that writes and then
// runs `DEALLOCATE ALL`, on a connection where an earlier writing
// transaction ran. The plain driver's COMMIT succeeds. Held: sqlretry's
// COMMIT (and its question for the transaction id) succeeds too. (A claim
// that held; kept as a check.)
func TestAttack17PgDeallocateAllFailsCommit(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := atkName("a17dc")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id serial primary key, tag text)")
	t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
	for _, drv := range []string{"pgx", "sqlretry", "sqlretry-begintx"} {
		t.Run(drv, func(t *testing.T) {
			var db *sql.DB
			if drv == "pgx" {
				db = atkPlain(t, "pgx")
			} else {
				db = atkOpenPG(t, nil)
			}
			db.SetMaxOpenConns(1)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			run := func(tag string, dealloc bool) error {
				fn := func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ($1)", tag); err != nil {
						return err
					}
					if dealloc {
						_, err := tx.ExecContext(ctx, "DEALLOCATE ALL")
						return err
					}
					return nil
				}
				if drv == "sqlretry" {
					return sqlretry.RunInTx(ctx, db, nil, fn)
				}
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					return err
				}
				if err := fn(ctx, tx); err != nil {
					tx.Rollback()
					return err
				}
				return tx.Commit()
			}
			if err := run(drv+"-warm", false); err != nil {
				t.Fatal(err)
			}
			err := run(drv, true)
			n := atkCount(t, plain, "SELECT count(*) FROM "+tbl+" WHERE tag = '"+drv+"'")
			t.Logf("%s: err=%v rows=%d", drv, err, n)
			if err != nil || n != 1 {
				t.Errorf("the transaction failed (err=%v, rows=%d); the plain driver's COMMIT: nil, one row", err, n)
			}
		})
	}
}

// TestAttack17PgBoundEndsWaitAtCommit: a DEFERRABLE INITIALLY DEFERRED
// unique constraint is checked at COMMIT, which then waits for another
// transaction that inserted the same key (it held it 300 ms, then rolled
// back). The plain driver's COMMIT waits and succeeds. Held: with short
// lock waits the bound ends the COMMIT's wait (55P03), which is replayed,
// never surfaced, and the transaction commits once. (A claim that held;
// kept as a check.)
func TestAttack17PgBoundEndsWaitAtCommit(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := atkName("a17du")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (k int, tag text, CONSTRAINT "+tbl+"_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)")
	t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
	for i, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				k := 10*i + map[string]int{"pgx": 1, "sqlretry": 2}[drv]
				db := a16Open(t, drv, c.opts...)
				holder := atkPlain(t, "pgx")
				htx, err := holder.Begin()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := htx.Exec("INSERT INTO "+tbl+" VALUES ($1, 'holder')", k); err != nil {
					t.Fatal(err)
				}
				go func() { time.Sleep(300 * time.Millisecond); htx.Rollback() }()
				start := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				var err2 error
				runs := 0
				fn := func(ctx context.Context, tx *sql.Tx) error {
					runs++
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1, 'x')", k)
					return err
				}
				if drv == "pgx" {
					var tx *sql.Tx
					if tx, err2 = db.BeginTx(ctx, nil); err2 == nil {
						if err2 = fn(ctx, tx); err2 == nil {
							err2 = tx.Commit()
						}
					}
				} else {
					first := true
					err2 = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						if first {
							first = false
							_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack17 conflict' USING ERRCODE = '40001'; END$$`)
							return err
						}
						return fn(ctx, tx)
					})
				}
				n := atkCount(t, plain, fmt.Sprintf("SELECT count(*) FROM %s WHERE k = %d AND tag = 'x'", tbl, k))
				t.Logf("%s: err=%v runs=%d rows=%d after %v", drv, err2, runs, n, time.Since(start).Round(time.Millisecond))
				if err2 != nil || n != 1 {
					t.Errorf("err=%v rows=%d; the plain driver's COMMIT waits for the other transaction and succeeds", err2, n)
				}
			})
		}
	}
}
