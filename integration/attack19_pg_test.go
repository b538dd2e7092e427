package integration

// Hostile tests of sqlretry (attack19): the restore of a touched short-wait
// setting (restoreBound, tx.go) before and after COMMIT.

import (
	"context"
	"database/sql"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// a19Bodies are closures that save the setting, change it and restore it
// with a session SET (attack15's helper), then either set a value of their
// own for the rest of the transaction with SET LOCAL (the in-transaction
// restore is then skipped: lastLocal) or commit themselves (escaped). The
// restore is then left to the one after sqlretry's COMMIT alone.
var a19Bodies = []struct {
	name string
	tail func(ctx context.Context, tx *sql.Tx, setting string) error
}{
	{"setlocal", func(ctx context.Context, tx *sql.Tx, setting string) error {
		_, err := tx.ExecContext(ctx, "SET LOCAL "+setting+" = '3s'")
		return err
	}},
	{"owncommit", func(ctx context.Context, tx *sql.Tx, setting string) error {
		_, err := tx.ExecContext(ctx, "COMMIT")
		return err
	}},
}

// TestAttack19PgBouncerAfterCommitRestoreMissesTheSession: behind PgBouncer
// in transaction mode. Attack17 moved the restore into the transaction
// because, sent after the COMMIT, it reached other clients' server
// sessions; attack18 added the after-COMMIT restore back for the two
// shapes where the in-transaction one is skipped or cannot run (a SET
// LOCAL of the closure's last; a closure that commits itself). Behind
// PgBouncer that after-COMMIT statement runs on whatever server session
// the pooler hands out, not the one the closure's session SET stuck to:
// the bound (20 ms) stays on that server session, which other clients
// then get. The plain driver's closure saved and restored the session's
// own value (0 / 1s): no server session of the pooler is left with
// anything else.
func TestAttack19PgBouncerAfterCommitRestoreMissesTheSession(t *testing.T) {
	if dbserver.PgBouncerBinary() == "" {
		unavailable(t, "no pgbouncer binary")
	}
	srv := ownServer(t, "pgx")
	admin := a12Plain(t, srv.DSN)
	mustExec(t, admin, "CREATE TABLE a19b (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO a19b SELECT g, 0 FROM generate_series(1, 10) g")
	for _, c := range a17PgCases {
		def := "0"
		if c.setting == "deadlock_timeout" {
			def = "1s"
		}
		for _, shape := range a19Bodies {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(c.setting+"/"+shape.name+"/"+drv, func(t *testing.T) {
					if shape.name == "owncommit" && os.Getenv("ATTACK19_DEFECTS") == "" {
						t.Skip("left: behind PgBouncer in transaction mode, a closure that touched the setting and then committed by a COMMIT statement of its own cannot run again, and the restore after the COMMIT reaches another server session (README, short waits); run with ATTACK19_DEFECTS=1")
					}
					// a pooler of its own: no server session another subtest used
					bouncer, err := dbserver.StartPgBouncer(dsnPort(t, srv.DSN))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(bouncer.Stop)
					through := bouncer.DSN + "&default_query_exec_mode=exec"
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
						if _, err := tx.ExecContext(ctx, "UPDATE a19b SET n = n + 1 WHERE id = 5"); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+saved+"'"); err != nil {
							return err
						}
						return shape.tail(ctx, tx, c.setting)
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
					seen := a19Sample(t, ctx, through, c.setting)
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
}

// a19Sample reads setting on every server connection of the pooler: 20
// transactions held at once (the pool's size).
func a19Sample(t *testing.T, ctx context.Context, through, setting string) map[string]int {
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
			tx.QueryRowContext(ctx, "SHOW "+setting).Scan(&v)
			mu.Lock()
			seen[v]++
			mu.Unlock()
			bar.Done()
			bar.Wait()
		}()
	}
	all.Wait()
	return seen
}

// TestAttack19PgHelperMakesTheBoundTheClosuresOwn: short lock waits on.
// The closure runs attack15's helper around a statement it wants to wait
// longer for (save lock_timeout, SET it to 5s, UPDATE, SET it back to the
// saved value; also with SET LOCAL, PostgreSQL's idiom for a change kept
// to the transaction), then, in a savepoint, updates a row another session holds
// for 300 ms, and takes a "busy" branch on a lock timeout (ROLLBACK TO
// SAVEPOINT, record "busy", return nil). The plain driver's helper saved
// the session's own value (0): the UPDATE waits 300 ms, the closure
// records "done" and commits. In sqlretry's replay the helper saved the
// bound (20ms) and set it back for the rest of the transaction as the
// closure's own value: the UPDATE fails with 55P03 after 20 ms, which
// sqlretry now counts as the user's (the closure set lock_timeout), and
// RunInTx commits "busy", an outcome the plain driver never commits
// (README: "What the closure itself does with the bound's 55P03 it does
// see ... such an attempt is never committed").
func TestAttack19PgHelperMakesTheBoundTheClosuresOwn(t *testing.T) {
	// "SET": the helper of attack15; "SET LOCAL": the same helper kept to
	// the transaction, PostgreSQL's own idiom for a temporary change.
	for _, set := range []string{"SET", "SET LOCAL"} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(set+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a19own")
				res := atkName("a19res")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+res+" (said text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl); plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
				var done <-chan struct{}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var saved string
					if err := tx.QueryRowContext(ctx, "SHOW lock_timeout").Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, set+" lock_timeout = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, set+" lock_timeout = '"+saved+"'"); err != nil {
						return err
					}
					done = a14HoldRow(t, "pgx", tbl, 2, 300*time.Millisecond)
					if _, err := tx.ExecContext(ctx, "SAVEPOINT busy"); err != nil {
						return err
					}
					said := "done"
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 2"); err != nil {
						t.Logf("%s: saved lock_timeout %q; UPDATE of the held row: %v", drv, saved, err)
						if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT busy"); err != nil {
							return err
						}
						said = "busy"
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ('"+said+"')")
					return err
				})
				if done != nil {
					<-done
				}
				var said string
				plain.QueryRow("SELECT coalesce(string_agg(said, ','), '') FROM " + res).Scan(&said)
				t.Logf("%s: err=%v committed said=%q", drv, err, said)
				if err != nil || said != "done" {
					t.Errorf("%s: err=%v committed %q; the plain driver waits 300 ms for the row and commits \"done\"", drv, err, said)
				}
			})
		}
	}
}

// TestAttack19PgHelperMakesTheDeadlockCheckTheClosuresOwn: the defaults
// (short deadlock checks). The closure runs attack15's helper on
// deadlock_timeout (save it, SET it to 5s, UPDATE row 1, SET it back to
// the saved value; also with SET LOCAL), then, in a savepoint, updates row 2, which session B
// holds while B waits for row 1 (B began waiting first): a deadlock. On a
// 40P01 the closure takes a "busy" branch (ROLLBACK TO SAVEPOINT, record
// "busy", return nil). The plain driver's helper saved the session's own
// deadlock_timeout (1s): B, waiting longer, finds the cycle first and is
// the victim; the closure's UPDATE then goes through and it commits
// "done". In sqlretry's replay the helper saved the bound (20ms) and made
// it the closure's own value for the rest of the transaction: the closure
// finds the cycle first, its 40P01 counts as the user's (the closure set
// deadlock_timeout), and RunInTx commits "busy" (README: "A closure that
// handles such a 40P01 itself ... is never committed").
func TestAttack19PgHelperMakesTheDeadlockCheckTheClosuresOwn(t *testing.T) {
	for _, set := range []string{"SET", "SET LOCAL"} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(set+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a19dl")
				res := atkName("a19dlres")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+res+" (said text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl); plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv)
				other := atkPlain(t, "pgx")
				var bDone chan error
				var bErr error
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if err := a19AwaitB(ctx, &bDone, &bErr); err != nil {
						return err
					}
					var saved string
					if err := tx.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, set+" deadlock_timeout = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, set+" deadlock_timeout = '"+saved+"'"); err != nil {
						return err
					}
					btx, err := other.BeginTx(context.Background(), nil)
					if err != nil {
						return err
					}
					if _, err := btx.Exec("UPDATE " + tbl + " SET v = v + 10 WHERE id = 2"); err != nil {
						return err
					}
					done := make(chan error, 1) // this attempt's: a replay makes another
					bDone = done
					go func() {
						_, err := btx.Exec("UPDATE " + tbl + " SET v = v + 10 WHERE id = 1")
						if err != nil {
							btx.Rollback()
						} else {
							err = btx.Commit()
						}
						done <- err
					}()
					time.Sleep(100 * time.Millisecond)
					if _, err := tx.ExecContext(ctx, "SAVEPOINT busy"); err != nil {
						return err
					}
					said := "done"
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 2"); err != nil {
						t.Logf("%s: saved deadlock_timeout %q; UPDATE of row 2: %v", drv, saved, err)
						if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT busy"); err != nil {
							return err
						}
						said = "busy"
					}
					_, err = tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ('"+said+"')")
					return err
				})
				if bDone != nil {
					bErr = <-bDone
				}
				var said string
				plain.QueryRow("SELECT coalesce(string_agg(said, ','), '') FROM " + res).Scan(&said)
				t.Logf("%s: err=%v committed said=%q; session B: %v", drv, err, said, bErr)
				if err != nil || said != "done" {
					t.Errorf("%s: err=%v committed %q; the plain driver's session B is the victim and the closure commits \"done\"", drv, err, said)
				}
			})
		}
	}
}

// TestAttack19PgLocalSetOtherSpellingsUndoSessionSet: attack18's
// TestAttack18PgSetLocalBackToSavedUndoesSessionSet was fixed by skipping
// the in-transaction restore after a "SET LOCAL <name>" of the closure
// (setsLocal reads that text only). The closure saves the setting (the
// bound, 20ms, in sqlretry's replay), sets a session value on purpose
// (SET 2s) and sets the transaction's value back to the saved one in
// another spelling PostgreSQL takes for the same thing: set_config(name,
// value, true), SET LOCAL with the name quoted, or a comment between the
// words; or attack18's own "SET LOCAL <name>" followed by a common
// statement with the word DO in it (INSERT ... ON CONFLICT DO NOTHING),
// which counts as touching the setting again and clears "the last was a
// SET LOCAL". The plain driver's session keeps 2s after the COMMIT; sqlretry's
// in-transaction restore sees the bound as the current value and sets the
// session's to the value the bound replaced (0 / 1s): the deliberate
// session setting is lost.
func TestAttack19PgLocalSetOtherSpellingsUndoSessionSet(t *testing.T) {
	spellings := []struct {
		name string
		stmt func(setting, v string) string
	}{
		{"set_config_true", func(s, v string) string { return "SELECT set_config('" + s + "', '" + v + "', true)" }},
		{"quoted", func(s, v string) string { return `SET LOCAL "` + s + `" = '` + v + "'" }},
		{"comment", func(s, v string) string { return "SET /* for the rest */ LOCAL " + s + " = '" + v + "'" }},
		// attack18's own spelling, then a common statement whose text
		// has the word DO (mayTouchSetting: "touched" again, and no
		// longer "last was SET LOCAL")
		{"setlocal_then_on_conflict_do_nothing", func(s, v string) string {
			return "SET LOCAL " + s + " = '" + v + "'"
		}},
	}
	for _, c := range a17PgCases {
		for _, sp := range spellings {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(c.setting+"/"+sp.name+"/"+drv, func(t *testing.T) {
					plain := atkPlain(t, "pgx")
					tbl := atkName("a19oc")
					atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key)")
					t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
					db := a16Open(t, drv, c.opts...)
					err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						var v string
						if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '2s'"); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, sp.stmt(c.setting, v)); err != nil {
							return err
						}
						if sp.name == "setlocal_then_on_conflict_do_nothing" {
							_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1) ON CONFLICT DO NOTHING")
							return err
						}
						return nil
					})
					after := a17After(t, db, c.setting)
					t.Logf("%s: err=%v after=%s", drv, err, after)
					if err != nil {
						t.Fatal(err)
					}
					if after != "2s" {
						t.Errorf("%s: session's %s %s after the transaction; the plain driver's is the closure's 2s", drv, c.setting, after)
					}
				})
			}
		}
	}
}

// TestAttack19PgColumnNamedLikeTheSettingDisownsTheBound: short lock waits
// on. A table with a column named lock_timeout (a job queue's lease time,
// say). The closure updates that column ("UPDATE jobs SET lock_timeout =
// 30 ..."), then, in a savepoint, updates a row another session holds for
// 300 ms, taking a "busy" branch on a lock timeout. sqlretry reads "SET
// lock_timeout" in the UPDATE's text as the closure setting its own lock
// timeout (setsSetting) and so counts the bound's 55P03 as the user's: the
// replay commits "busy". Without that column the same closure's busy
// attempt is never committed (README: replayed unbounded, then "done").
// The plain driver waits 300 ms and commits "done".
func TestAttack19PgColumnNamedLikeTheSettingDisownsTheBound(t *testing.T) {
	// "lease": the same closure with the column named otherwise, the
	// control (sqlretry replays the busy attempt unbounded: "done").
	for _, col := range []string{"lock_timeout", "lease"} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(col+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a19col")
				jobs := atkName("a19jobs")
				res := atkName("a19colres")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+jobs+" (id int primary key, "+col+" int)", "INSERT INTO "+jobs+" VALUES (1, 10)",
					"CREATE TABLE "+res+" (said text)")
				t.Cleanup(func() {
					plain.Exec("DROP TABLE " + tbl)
					plain.Exec("DROP TABLE " + jobs)
					plain.Exec("DROP TABLE " + res)
				})
				db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
				var done <-chan struct{}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "UPDATE "+jobs+" SET "+col+" = 30 WHERE id = 1"); err != nil {
						return err
					}
					done = a14HoldRow(t, "pgx", tbl, 2, 300*time.Millisecond)
					if _, err := tx.ExecContext(ctx, "SAVEPOINT busy"); err != nil {
						return err
					}
					said := "done"
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 2"); err != nil {
						t.Logf("%s: UPDATE of the held row: %v", drv, err)
						if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT busy"); err != nil {
							return err
						}
						said = "busy"
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ('"+said+"')")
					return err
				})
				if done != nil {
					<-done
				}
				var said string
				plain.QueryRow("SELECT coalesce(string_agg(said, ','), '') FROM " + res).Scan(&said)
				t.Logf("%s: err=%v committed said=%q", drv, err, said)
				if err != nil || said != "done" {
					t.Errorf("%s: err=%v committed %q; the plain driver waits 300 ms for the row and commits \"done\"", drv, err, said)
				}
			})
		}
	}
}

// a19AwaitB waits for an earlier attempt's session B to end (*bDone, its
// error into *bErr) before the next attempt begins: else, on a loaded
// machine, an attempt can take row 1 before that B, which still holds
// row 2 and waits for row 1, and the attempt's own B then waits for it: a
// cycle through the test's goroutine the server cannot see (CI,
// 2026-12-01: a 20 s hang).
func a19AwaitB(ctx context.Context, bDone *chan error, bErr *error) error {
	if *bDone == nil {
		return nil
	}
	select {
	case *bErr = <-*bDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	*bDone = nil
	return nil
}
