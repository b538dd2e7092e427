package integration

// Hostile tests of sqlretry (attack22): the rule "a bounded attempt whose
// closure ran a statement that may read or set the setting is never
// committed; it is rolled back and run again at once unbounded"
// (tx.go: mayTouchSetting, touchedRedo, runAttempt).

import (
	"context"
	"database/sql"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// TestAttack22PgPrepareExecuteRerunFails: a closure that runs an SQL-level
// PREPARE and then EXECUTEs it (the simple-protocol idiom; the word
// EXECUTE counts as "may read or set the setting"). In a bounded replay
// the attempt is rolled back and run again at once; a ROLLBACK does not
// undo a PREPARE, so the rerun's PREPARE fails with 42P05 "prepared
// statement already exists" and RunInTx returns that error, nothing
// committed. The plain driver runs the closure once on the same fresh
// connection: it commits the row. (The first attempt of sqlretry's call
// fails with 40001 without preparing anything.)
func TestAttack22PgPrepareExecuteRerunFails(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				tbl := atkName("a22prep")
				atkMust(t, db, "CREATE TABLE "+tbl+" (v int)")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				p := atkName("a22p")
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "PREPARE "+p+"(int) AS INSERT INTO "+tbl+" VALUES ($1)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "EXECUTE "+p+"(7)")
					return err
				})
				if err != nil {
					t.Errorf("%s: RunInTx: %v (the plain driver commits)", drv, err)
				}
				if n := atkCount(t, db, "SELECT count(*) FROM "+tbl); n != 1 {
					t.Errorf("%s: %d rows committed, want 1", drv, n)
				}
			})
		}
	}
}

// a22DoHidden is a DO block whose body is a plain string literal with a
// comment between DO and it: it reads the setting (EXECUTE 'SHOW ...' in
// PL/pgSQL, its name put together from two parts) and stores it in tbl.
// mayTouchSetting blanks the literal's contents, doBlock looks for the
// body right after DO (not after a comment), and the name never appears
// whole.
func a22DoHidden(setting, tbl string) string {
	i := len(setting) - len("_timeout") + 1
	return `DO /* store it */ 'DECLARE v text; BEGIN EXECUTE ''SHOW ` + setting[:i] + `'' || ''` + setting[i:] +
		`'' INTO v; INSERT INTO ` + tbl + ` VALUES (v); END'`
}

// TestAttack22PgDoAfterCommentCommitsTheBound: a bounded replay whose
// closure runs a DO block (written DO /* comment */ '...body...') that
// reads the setting and stores what it read. The plain driver stores the
// session's value ("1s" for deadlock_timeout, "0" for lock_timeout).
// sqlretry sees no touch (the comment hides the DO, the literal hides
// EXECUTE and SHOW), commits the attempt, and the row holds sqlretry's
// bound ("20ms").
func TestAttack22PgDoAfterCommentCommitsTheBound(t *testing.T) {
	for _, m := range a21Modes {
		want := map[string]string{"deadlock_timeout": "1s", "lock_timeout": "0"}[m.setting]
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				tbl := atkName("a22do")
				atkMust(t, db, "CREATE TABLE "+tbl+" (v text)")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				if err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, a22DoHidden(m.setting, tbl))
					return err
				}); err != nil {
					t.Fatal(err)
				}
				var got string
				if err := db.QueryRow("SELECT string_agg(v, ',') FROM " + tbl).Scan(&got); err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Errorf("%s: the closure stored %q, the plain driver %q", drv, got, want)
				}
			})
		}
	}
}

// TestAttack22PgTableToXmlCommitsTheBound: table_to_xml reads any
// relation given as a regclass; given pg_settings by a name put together
// from parts it reads the setting with none of the words mayTouchSetting
// looks for (query_to_xml is counted, table_to_xml is not). The plain
// driver stores the session's value, sqlretry's bounded replay the bound.
func TestAttack22PgTableToXmlCommitsTheBound(t *testing.T) {
	for _, m := range a21Modes {
		want := map[string]string{"deadlock_timeout": "1s", "lock_timeout": "0"}[m.setting]
		// pg_settings as XML; the setting's row is picked out in Go.
		q := `SELECT x::text FROM (SELECT table_to_xml(('pg_catalog.pg_sett' || 'ings')::regclass, false, false, '') x) s`
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				tbl := atkName("a22xml")
				atkMust(t, db, "CREATE TABLE "+tbl+" (v text)")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				if err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var x string
					if err := tx.QueryRowContext(ctx, q).Scan(&x); err != nil {
						return err
					}
					v := a22XMLSetting(x, m.setting)
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", v)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				var got string
				if err := db.QueryRow("SELECT string_agg(v, ',') FROM " + tbl).Scan(&got); err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Errorf("%s: the closure stored %q, the plain driver %q", drv, got, want)
				}
			})
		}
	}
}

// a22XMLSetting picks the setting's value and unit out of pg_settings as
// table_to_xml gives it ("<name>x</name><setting>1000</setting><unit>ms</unit>").
func a22XMLSetting(x, name string) string {
	i := strings.Index(x, "<name>"+name+"</name>")
	if i < 0 {
		return "?"
	}
	r := x[i:]
	s := between(r, "<setting>", "</setting>")
	u := between(r, "<unit>", "</unit>")
	v := s + u
	switch v {
	case "1000ms":
		return "1s"
	case "0ms":
		return "0"
	}
	return v
}

func between(s, a, b string) string {
	i := strings.Index(s, a)
	if i < 0 {
		return ""
	}
	s = s[i+len(a):]
	j := strings.Index(s, b)
	if j < 0 {
		return ""
	}
	return s[:j]
}

// TestAttack22PgAdvisoryLockHeldTwice: a closure that takes a session-level
// advisory lock (released by the application after the call, on the same
// connection) and reads a harmless setting (SHOW TimeZone, counted as
// "may read or set"). In a bounded replay the attempt is rolled back and
// run again; a ROLLBACK does not release a session-level advisory lock, so
// the rerun takes it a second time. After the application's one
// pg_advisory_unlock the plain driver's session holds nothing; sqlretry's
// still holds the lock, and every other session's pg_try_advisory_lock
// fails (pg_advisory_lock would wait forever).
func TestAttack22PgAdvisoryLockHeldTwice(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				other := atkPlain(t, "pgx")
				key := int64(rand.Uint32())
				if err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_lock($1)", key); err != nil {
						return err
					}
					var tz string
					return tx.QueryRowContext(ctx, "SHOW TimeZone").Scan(&tz)
				}); err != nil {
					t.Fatal(err)
				}
				var unlocked bool
				if err := db.QueryRow("SELECT pg_advisory_unlock($1)", key).Scan(&unlocked); err != nil || !unlocked {
					t.Fatalf("unlock: %v %v", unlocked, err)
				}
				var got bool
				if err := other.QueryRow("SELECT pg_try_advisory_lock($1)", key).Scan(&got); err != nil {
					t.Fatal(err)
				}
				if !got {
					t.Errorf("%s: after the application's unlock another session cannot take the lock: the call left it held (taken twice)", drv)
				}
				other.Exec("SELECT pg_advisory_unlock_all()")
			})
		}
	}
}

// TestAttack22PgOwnRollbackRunsTwice: README: "If the closure calls
// tx.Commit() or tx.Rollback() itself, RunInTx returns that outcome ...
// and never replays". A closure that reads a harmless setting (SHOW
// TimeZone), does something outside the database (counted here) and then
// ends the transaction itself:
//   - rollback: calls tx.Rollback() (a dry run) and returns nil;
//   - commit: calls tx.Commit(); on an error it records a failure outside
//     the database and returns the error.
//
// In a bounded replay sqlretry runs it twice: the dry run's side effect
// happens twice; the closure's own tx.Commit() fails (the plain driver's
// succeeds), the closure records a failure for a transaction that then
// commits in the rerun. (sqlretry, called the same way when the attempt
// is not bounded: once, and Commit succeeds.)
func TestAttack22PgOwnRollbackRunsTwice(t *testing.T) {
	for _, how := range []string{"rollback", "commit"} {
		for _, m := range a21Modes {
			t.Run(how+"/"+m.name, func(t *testing.T) {
				db := a16Open(t, "sqlretry", m.opts...)
				runs, failures := 0, 0
				err := a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
					runs++
					var tz string
					if err := tx.QueryRowContext(ctx, "SHOW TimeZone").Scan(&tz); err != nil {
						return err
					}
					if how == "rollback" {
						return tx.Rollback()
					}
					if err := tx.Commit(); err != nil {
						failures++
						return err
					}
					return nil
				})
				t.Logf("RunInTx: %v; closure runs after the conflict: %d; Commit failures it saw: %d", err, runs, failures)
				if runs != 1 {
					t.Errorf("%s: the closure that ended its transaction itself ran %d times after the conflict; README: RunInTx returns that outcome and never replays", how, runs)
				}
				if failures != 0 {
					t.Errorf("%s: the closure's own tx.Commit() failed %d times (the plain driver's commits)", how, failures)
				}
			})
		}
	}
}

// a22MakeHot has one RunInTx of db meet a deadlock (40P01, raised by its
// first attempt): for 2 s every attempt of db is bounded, first attempts
// of other calls included (README: "any attempt of the db for 2 s after a
// deadlock, a first one included").
func a22MakeHot(t *testing.T, db *sql.DB) {
	t.Helper()
	runs := 0
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs == 1 {
			_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack22 deadlock' USING ERRCODE = '40P01'; END$$`)
			return err
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestAttack22PgHotWindowDeadlineFails: a call with no conflict of its
// own, a 600 ms deadline, and a closure that reads a harmless setting
// (SHOW TimeZone) and works 350 ms before its INSERT. The plain driver
// commits in ~350 ms. Within 2 s of an unrelated deadlock on the same db,
// sqlretry bounds this first attempt, the SHOW marks it touched, it is
// rolled back after 350 ms and run again: 700 ms, past the deadline. The
// caller gets "context deadline exceeded" and nothing is committed, for a
// transaction that met no conflict at all.
func TestAttack22PgHotWindowDeadlineFails(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				db.SetMaxOpenConns(4)
				tbl := atkName("a22hot")
				atkMust(t, db, "CREATE TABLE "+tbl+" (v int)")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				fn := func(ctx context.Context, tx *sql.Tx) error {
					var tz string
					if err := tx.QueryRowContext(ctx, "SHOW TimeZone").Scan(&tz); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.35)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)")
					return err
				}
				ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
				defer cancel()
				var err error
				start := time.Now()
				if drv == "pgx" {
					var tx *sql.Tx
					if tx, err = db.BeginTx(ctx, nil); err == nil {
						if err = fn(ctx, tx); err == nil {
							err = tx.Commit()
						} else {
							tx.Rollback()
						}
					}
				} else {
					a22MakeHot(t, db)
					start = time.Now()
					err = sqlretry.RunInTx(ctx, db, nil, fn)
				}
				took := time.Since(start)
				n := atkCount(t, db, "SELECT count(*) FROM "+tbl)
				t.Logf("%s: %v in %v, %d rows", drv, err, took, n)
				if err != nil || n != 1 {
					t.Errorf("%s: a conflict-free call failed (%v) after %v, %d rows; the plain driver commits in ~350 ms", drv, err, took, n)
				}
			})
		}
	}
}

// TestAttack22PgExecuteDeallocateRerunFails: the other half of the
// PREPARE/EXECUTE idiom. A statement prepared on the session earlier
// (PREPARE, outside the call) is run and deallocated by the closure
// (EXECUTE p(7); DEALLOCATE p). In a bounded replay the EXECUTE marks the
// attempt touched; it is rolled back, which does not bring back a
// DEALLOCATEd statement, and run again: EXECUTE fails with 26000
// ("prepared statement does not exist"), once more, and RunInTx returns
// it. The plain driver commits the row.
func TestAttack22PgExecuteDeallocateRerunFails(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, m.opts...)
				tbl := atkName("a22dealloc")
				atkMust(t, db, "CREATE TABLE "+tbl+" (v int)")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				p := atkName("a22p")
				atkMust(t, db, "PREPARE "+p+"(int) AS INSERT INTO "+tbl+" VALUES ($1)")
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "EXECUTE "+p+"(7)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "DEALLOCATE "+p)
					return err
				})
				if err != nil {
					t.Errorf("%s: RunInTx: %v (the plain driver commits)", drv, err)
				}
				if n := atkCount(t, db, "SELECT count(*) FROM "+tbl); n != 1 {
					t.Errorf("%s: %d rows committed, want 1", drv, n)
				}
			})
		}
	}
}

// TestAttack22PgToDoLiteralRunsTwice: a task board's everyday statement,
// UPDATE tasks SET status = 'to do' (Jira's "To Do"), with no conflict of
// its own, run within 2 s of an unrelated deadlock on the db. The word
// "do" followed by a quote reads as a DO block (doBlock looks at the raw
// text, string literals included), so the bounded first attempt counts as
// touched, is rolled back and run again: the closure runs twice (its
// notification is sent twice) where the plain driver runs it once. The
// same call with status = 'done' runs once.
func TestAttack22PgToDoLiteralRunsTwice(t *testing.T) {
	for _, status := range []string{"done", "to do"} {
		for _, m := range a21Modes {
			t.Run(status+"/"+m.name, func(t *testing.T) {
				db := a16Open(t, "sqlretry", m.opts...)
				db.SetMaxOpenConns(4)
				tbl := atkName("a22tasks")
				atkMust(t, db, "CREATE TABLE "+tbl+" (id int primary key, status text)", "INSERT INTO "+tbl+" VALUES (1, 'new')")
				t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
				a22MakeHot(t, db)
				runs := 0
				if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					runs++ // (the notification "task 1 moved")
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET status = '"+status+"' WHERE id = 1")
					return err
				}); err != nil {
					t.Fatal(err)
				}
				if runs != 1 {
					t.Errorf("status %q: a conflict-free closure ran %d times (the plain driver: once)", status, runs)
				}
			})
		}
	}
}

// TestAttack22PgDollarQuoteHidesCall: mayTouchSetting blanks '...'
// literals before it looks for SHOW, CALL and EXECUTE, but it does not
// know dollar quotes: a $$'$$ (a dollar-quoted string holding one single
// quote, say a column default or a label) opens a "literal" that never
// closes, and every word after it is blanked. A closure that runs
// SELECT $$'$$ AS q; CALL p() — p a procedure of the application that
// stores the setting it runs under (CALL is on the list of words that may
// read or set it) — is not counted as touched, and the bounded replay
// commits the bound ("20ms") where the plain driver stores the session's
// value. The same with an apostrophe in an SQL comment before the CALL
// ("-- store the session's setting"): the comment is not skipped either.
// (Without them the CALL is counted: the "plain" cases pass.)
func TestAttack22PgDollarQuoteHidesCall(t *testing.T) {
	for _, pre := range []string{"", "SELECT $$'$$ AS q; ", "-- store the session's setting\n"} {
		for _, m := range a21Modes {
			want := map[string]string{"deadlock_timeout": "1s", "lock_timeout": "0"}[m.setting]
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(map[string]string{"": "plain", "S": "dollar", "-": "comment"}[pre[:min(1, len(pre))]]+"/"+m.name+"/"+drv, func(t *testing.T) {
					db := a16Open(t, drv, m.opts...)
					tbl, proc := atkName("a22dq"), atkName("a22dqp")
					i := len(m.setting) - len("_timeout") + 1
					atkMust(t, db, "CREATE TABLE "+tbl+" (v text)",
						"CREATE PROCEDURE "+proc+"() LANGUAGE sql AS $b$ INSERT INTO "+tbl+" SELECT current_setting('"+m.setting[:i]+"' || '"+m.setting[i:]+"') $b$")
					t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl, "DROP PROCEDURE IF EXISTS "+proc) })
					if err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						_, err := tx.ExecContext(ctx, pre+"CALL "+proc+"()")
						return err
					}); err != nil {
						t.Fatal(err)
					}
					var got string
					if err := db.QueryRow("SELECT string_agg(v, ',') FROM " + tbl).Scan(&got); err != nil {
						t.Fatal(err)
					}
					if got != want {
						t.Errorf("%s: the procedure stored %q, the plain driver %q", drv, got, want)
					}
				})
			}
		}
	}
}

// TestAttack22PgTouchedPanicPropagatesHolds: a bounded replay whose closure
// reads the setting and then panics: the panic reaches the caller with its
// own value, the closure is not run again, nothing is committed, and the
// pooled connection is usable with the session's value (as the plain
// driver: panic, rollback).
func TestAttack22PgTouchedPanicPropagatesHolds(t *testing.T) {
	for _, m := range a21Modes {
		t.Run(m.name, func(t *testing.T) {
			db := a16Open(t, "sqlretry", m.opts...)
			tbl := atkName("a22panic")
			atkMust(t, db, "CREATE TABLE "+tbl+" (v int)")
			t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
			before := a16Show(t, db, m.setting)
			runs := 0
			func() {
				defer func() {
					if r := recover(); r != "attack22" {
						t.Errorf("recovered %v, want the closure's own value", r)
					}
				}()
				a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
					runs++
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+m.setting).Scan(&v); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)"); err != nil {
						return err
					}
					panic("attack22")
				})
			}()
			if runs != 1 {
				t.Errorf("the panicking closure ran %d times", runs)
			}
			if n := atkCount(t, db, "SELECT count(*) FROM "+tbl); n != 0 {
				t.Errorf("%d rows committed", n)
			}
			if after := a16Show(t, db, m.setting); after != before {
				t.Errorf("session's %s %q after the call, %q before", m.setting, after, before)
			}
		})
	}
}

// TestAttack22PgCommonStatementsRunOnceHolds: statements an application
// commonly runs in every transaction are not taken for touches: within 2 s
// of a deadlock a conflict-free closure made of them runs once.
func TestAttack22PgCommonStatementsRunOnceHolds(t *testing.T) {
	for _, m := range a21Modes {
		t.Run(m.name, func(t *testing.T) {
			db := a16Open(t, "sqlretry", m.opts...)
			db.SetMaxOpenConns(4)
			tbl := atkName("a22common")
			atkMust(t, db, "CREATE TABLE "+tbl+" (id int primary key, doc jsonb, note text)")
			t.Cleanup(func() { atkMust(t, db, "DROP TABLE IF EXISTS "+tbl) })
			a22MakeHot(t, db)
			runs := 0
			if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				for _, q := range []struct {
					q    string
					args []any
				}{
					{"SET LOCAL search_path TO public", nil},
					{"SET LOCAL application_name = 'billing'", nil},
					{"SET LOCAL statement_timeout = '5s'", nil},
					{"SELECT set_config('app.tenant', $1, true)", []any{"42"}},
					{`INSERT INTO "` + tbl + `" ("id", "doc", "note") VALUES ($1, $2, $3) ON CONFLICT ("id") DO UPDATE SET "doc" = EXCLUDED."doc"`,
						[]any{1, `{"action": "show", "call": "execute", "do": "u&"}`, "show me; call; execute"}},
					{"SELECT id FROM " + tbl + " WHERE doc->>'action' = 'show' AND current_setting('app.tenant') = '42'", nil},
				} {
					if _, err := tx.ExecContext(ctx, q.q, q.args...); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if runs != 1 {
				t.Errorf("ran %d times", runs)
			}
		})
	}
}

// TestAttack22PgSessionRoleTurnsChecksOffForGood: README: "Only a role
// that may set deadlock_timeout gets them ... For any other role the SET
// LOCAL fails with 42501 ... and the db stops asking". The db's user is a
// superuser; one pooled session runs for a while under another role (SET
// ROLE reporting, say for one report, RESET ROLE after). A bounded replay
// that happens to run on that session meanwhile gets 42501, and short
// deadlock checks are off for the whole db, for good: after RESET ROLE,
// replays of the superuser's transactions run with the server's 1 s
// deadlock_timeout (read by a column DEFAULT, a probe) where they had
// 20 ms. (The MySQL marker's same shape was fixed in attack15: a refusal
// under a role of the session's own stays that connection's.)
func TestAttack22PgSessionRoleTurnsChecksOffForGood(t *testing.T) {
	db := a16Open(t, "sqlretry")
	tbl, role := atkName("a22role"), atkName("a22reporting")
	atkMust(t, db, "CREATE TABLE "+tbl+" (tag text, v text DEFAULT current_setting('deadlock_timeout'))",
		"CREATE ROLE "+role+" NOLOGIN", "GRANT SELECT ON "+tbl+" TO "+role)
	t.Cleanup(func() { atkMust(t, db, "RESET ROLE", "DROP TABLE IF EXISTS "+tbl, "DROP ROLE IF EXISTS "+role) })
	probe := func(tag string) string {
		if err := a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ($1)", tag)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		var v string
		if err := db.QueryRow("SELECT v FROM "+tbl+" WHERE tag = $1", tag).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := probe("before")
	atkMust(t, db, "SET ROLE "+role)
	if err := a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "SELECT count(*) FROM "+tbl)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	atkMust(t, db, "RESET ROLE")
	after := probe("after")
	t.Logf("a replay's deadlock_timeout before the session's SET ROLE: %s, after RESET ROLE: %s", before, after)
	// The bound doubles per bounded attempt of a call, and the db is hot
	// after the first replay's deadlock (every attempt bounded), so the
	// value may differ from before; it must still be a bound, not the
	// server's deadlock_timeout.
	server := a16Show(t, atkPlain(t, "pgx"), "deadlock_timeout")
	if after == server && before != server {
		t.Errorf("one session's temporary SET ROLE turned short deadlock checks off for the db: replays run with %s (the server's), %s before", after, before)
	}
}
