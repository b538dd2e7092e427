package integration

// Hostile tests of sqlretry (attack20): the guesses sqlretry makes from the
// closure's statement text about lock_timeout / deadlock_timeout (tx.go:
// setsSetting, setsValue, setsLocal, mayTouchSetting). All six pass since
// those checks gave way to one rule: a bounded attempt whose closure may
// have touched the setting is rolled back and run again unbounded
// (tx.go: touchedRedo).

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// a20Restores are ways a save/change/restore helper sets the setting back
// to the value it saved (SHOW: sqlretry's bound, "20ms", in the replay).
// Each is the value the helper saved, in the text or as an argument; each
// sets exactly what the helper saved, as attack19's "SET name = 'saved'"
// does, which sqlretry recognises (setsValue).
var a20Restores = []struct {
	name string
	stmt func(setting, saved string) (string, []any)
}{
	// A Go helper: the value as an argument (the usual way to pass a value).
	{"set_config_param", func(s, v string) (string, []any) {
		return "SELECT set_config('" + s + "', $1, false)", []any{v}
	}},
	// The same with the argument typed, as pgx users often write it.
	{"set_config_param_text", func(s, v string) (string, []any) {
		return "SELECT set_config('" + s + "', $1::text, false)", []any{v}
	}},
	// A literal with a cast.
	{"set_config_cast", func(s, v string) (string, []any) {
		return "SELECT set_config('" + s + "', '" + v + "'::text, false)", nil
	}},
	// An escape-string literal (lib/pq's QuoteLiteral, E'' quoting helpers).
	{"set_estring", func(s, v string) (string, []any) {
		return "SET " + s + " = E'" + v + "'", nil
	}},
	// A dollar-quoted literal.
	{"set_dollar", func(s, v string) (string, []any) {
		return "SET " + s + " = $$" + v + "$$", nil
	}},
}

// TestAttack20PgHelperRestoreSpellingsCommitBusy: short lock waits on.
// Attack19's TestAttack19PgHelperMakesTheBoundTheClosuresOwn was fixed by
// reading the value a closure's SET sets (setsValue): a SET back to the
// bound's literal '20ms' keeps the bound sqlretry's. The same helper,
// restoring the saved value another way PostgreSQL takes (a set_config
// whose value is an argument, a cast literal, E” or $$ quoting), is read
// as the closure setting a value of its own: the bound it restored, now
// the session's, gives a 55P03 after 20 ms on the held row which sqlretry
// counts as the user's, and the closure's "busy" branch commits. The
// plain driver's helper saved and restored 0: the UPDATE waits 300 ms and
// the closure commits "done".
func TestAttack20PgHelperRestoreSpellingsCommitBusy(t *testing.T) {
	for _, r := range a20Restores {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(r.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a20own")
				res := atkName("a20res")
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
					if _, err := tx.ExecContext(ctx, "SET lock_timeout = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					q, args := r.stmt("lock_timeout", saved)
					if _, err := tx.ExecContext(ctx, q, args...); err != nil {
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

// TestAttack20PgHelperRestoreSpellingsDeadlockBusy: the defaults (short
// deadlock checks). Attack19's deadlock shape with the helper's restore
// spelled as in a20Restores: the closure, having made the bound its own
// deadlock_timeout, finds the cycle first and commits "busy"; the plain
// driver's session B (its deadlock_timeout 1s, waiting longer) is the
// victim and the closure commits "done".
func TestAttack20PgHelperRestoreSpellingsDeadlockBusy(t *testing.T) {
	for _, r := range a20Restores {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(r.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a20dl")
				res := atkName("a20dlres")
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
					if _, err := tx.ExecContext(ctx, "SET deadlock_timeout = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					q, args := r.stmt("deadlock_timeout", saved)
					if _, err := tx.ExecContext(ctx, q, args...); err != nil {
						return err
					}
					btx, err := other.BeginTx(context.Background(), nil)
					if err != nil {
						return err
					}
					if _, err := btx.Exec("UPDATE " + tbl + " SET v = v + 10 WHERE id = 2"); err != nil {
						return err
					}
					done := make(chan error, 1)
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

// TestAttack20PgLocalSpellingsUndoSessionSet: attack19's
// TestAttack19PgLocalSetOtherSpellingsUndoSessionSet with further
// spellings of "for the rest of the transaction only" that setsLocal
// does not read: set_config whose is_local is an argument or the literal
// 't' / 'on', and a SET LOCAL inside a DO block (setsSetting wants SET at
// the statement's start, so lastLocal is never set). The closure saves
// the setting (the bound, 20ms), sets a session value on purpose (SET
// 2s) and sets the transaction's value back to the saved one. The plain
// driver's session keeps 2s; sqlretry's in-transaction restore sees the
// bound and sets the session's value back to 0 / 1s.
func TestAttack20PgLocalSpellingsUndoSessionSet(t *testing.T) {
	spellings := []struct {
		name string
		stmt func(setting, v string) (string, []any)
	}{
		{"set_config_local_param", func(s, v string) (string, []any) {
			return "SELECT set_config('" + s + "', $1, $2)", []any{v, true}
		}},
		{"set_config_local_t", func(s, v string) (string, []any) {
			return "SELECT set_config('" + s + "', '" + v + "', 't')", nil
		}},
		{"set_config_local_on", func(s, v string) (string, []any) {
			return "SELECT set_config('" + s + "', '" + v + "', 'on')", nil
		}},
		{"do_block_set_local", func(s, v string) (string, []any) {
			return "DO $$BEGIN SET LOCAL " + s + " = '" + v + "'; END$$", nil
		}},
	}
	for _, c := range a17PgCases {
		for _, sp := range spellings {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(c.setting+"/"+sp.name+"/"+drv, func(t *testing.T) {
					db := a16Open(t, drv, c.opts...)
					err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						var v string
						if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '2s'"); err != nil {
							return err
						}
						q, args := sp.stmt(c.setting, v)
						_, err := tx.ExecContext(ctx, q, args...)
						return err
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

// TestAttack20PgReadingTheSettingDisownsTheBound: short lock waits on. The
// closure never changes lock_timeout: it only reads it, in a statement
// that also calls set_config for another setting: it keeps the value in a
// custom setting of its own for later ("save_to_guc", the usual way to
// keep a value for the rest of a transaction in SQL), or sets its
// application_name while reading it for a log line ("with_app_name").
// setsSetting takes any text with set_config and the name in it for a
// SET of the name, and setsValue finds no '20ms' literal: the bound counts
// as the closure's own. Then, in a savepoint, it updates a row another
// session holds for 300 ms, taking a "busy" branch on a lock timeout. The
// plain driver waits 300 ms and commits "done"; sqlretry's bound's 55P03
// after 20 ms counts as the user's and RunInTx commits "busy" (without the
// read, the same closure's busy attempt is never committed).
func TestAttack20PgReadingTheSettingDisownsTheBound(t *testing.T) {
	reads := []struct{ name, stmt string }{
		{"save_to_guc", "SELECT set_config('a20.saved', current_setting('lock_timeout'), true)"},
		{"with_app_name", "SELECT current_setting('lock_timeout'), set_config('application_name', 'a20', false)"},
	}
	for _, rd := range reads {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(rd.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a20rd")
				res := atkName("a20rdres")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+res+" (said text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl); plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
				var done <-chan struct{}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					rows, err := tx.QueryContext(ctx, rd.stmt)
					if err != nil {
						return err
					}
					rows.Close()
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
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
					_, err = tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ('"+said+"')")
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

// TestAttack20PgRolledBackSetStillDisownsTheBound: short lock waits on.
// The closure tries a step with a longer lock wait of its own in a
// savepoint (SAVEPOINT try; SET LOCAL lock_timeout = '5s', or a session
// SET; an INSERT that fails with a unique violation), rolls back to the
// savepoint and goes on: PostgreSQL undoes the SET with the savepoint, so
// the setting in force is again what it was (plain driver: 0; sqlretry:
// its 20 ms bound). sqlretry remembered "the closure set lock_timeout"
// (ownBound false) and does not forget it on ROLLBACK TO SAVEPOINT: the
// bound's 55P03 on a row another session holds for 300 ms then counts as
// the user's, and the closure's "busy" branch commits. The plain driver
// waits 300 ms and commits "done".
func TestAttack20PgRolledBackSetStillDisownsTheBound(t *testing.T) {
	for _, set := range []string{"SET LOCAL", "SET"} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(set+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a20rb")
				res := atkName("a20rbres")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+res+" (said text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl); plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
				var done <-chan struct{}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "SAVEPOINT try"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, set+" lock_timeout = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1, 0)"); err == nil {
						return nil // (never: id 1 exists)
					}
					if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT try"); err != nil {
						return err
					}
					var cur string
					if err := tx.QueryRowContext(ctx, "SELECT current_setting('lock_timeout')").Scan(&cur); err != nil {
						return err
					}
					t.Logf("%s: lock_timeout after ROLLBACK TO SAVEPOINT: %s", drv, cur)
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

// TestAttack20PgFromCurrentStoresTheBound: short lock waits on. The
// closure creates a function with "SET lock_timeout FROM CURRENT" (the
// idiom that pins a setting's value in force at creation to the function,
// as is usual for search_path). In sqlretry's replay the value in force is
// the bound (20ms), which the function keeps for good: every later call,
// on any session, runs with a 20 ms lock_timeout. The plain driver's
// function keeps the session's 0: a later call that waits 300 ms for a row
// another session holds succeeds; the one created through sqlretry fails
// with 55P03.
func TestAttack20PgFromCurrentStoresTheBound(t *testing.T) {
	for _, drv := range []string{"pgx", "sqlretry"} {
		t.Run(drv, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := atkName("a20fc")
			fn := atkName("a20fcfn")
			atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
			t.Cleanup(func() { plain.Exec("DROP FUNCTION IF EXISTS " + fn + "()"); plain.Exec("DROP TABLE " + tbl) })
			db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
			err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "CREATE FUNCTION "+fn+"() RETURNS void LANGUAGE sql SET lock_timeout FROM CURRENT AS $$UPDATE "+tbl+" SET v = v + 1 WHERE id = 2$$")
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			var cfg sql.NullString
			plain.QueryRow("SELECT array_to_string(proconfig, ',') FROM pg_proc WHERE proname = '" + fn + "'").Scan(&cfg)
			done := a14HoldRow(t, "pgx", tbl, 2, 300*time.Millisecond)
			time.Sleep(50 * time.Millisecond)
			_, err = plain.Exec("SELECT " + fn + "()")
			<-done
			t.Logf("%s: function's settings %q; a later call waiting 300 ms for a row: %v", drv, cfg.String, err)
			if err != nil {
				t.Errorf("%s: a later call of the function created in the transaction: %v; the plain driver's (lock_timeout=0) waits and succeeds", drv, err)
			}
		})
	}
}
