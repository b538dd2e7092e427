package integration

// Hostile tests of sqlretry (attack21): the rule "a bounded attempt whose
// closure ran a statement that may read or set the setting is never
// committed" (tx.go: mayTouchSetting, touchedRedo). mayTouchSetting looks
// for words in the statement's text; PostgreSQL accepts spellings of the
// same statements that hold none of them. Fixed after the round:
// Unicode escapes, query_to_xml and set_config/current_setting whose first
// argument is not a plain literal count as touches, and set_config of
// another setting (the row-level security idiom) does not. Gated
// (ATTACK21_DEFECTS=1): the backslash misreading, a Go-side cache, a
// column DEFAULT.

import (
	"context"
	"database/sql"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// a21Modes are the two bounds: the default short deadlock checks
// (deadlock_timeout) and short lock waits (lock_timeout).
var a21Modes = []struct {
	name    string
	setting string
	opts    []sqlretry.Option
}{
	{"deadlock", "deadlock_timeout", nil},
	{"lockwait", "lock_timeout", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
}

// a21Uident is the setting's name as a Unicode-escape identifier or
// string body: "deadlock_timeout" -> deadlock\005ftimeout.
func a21Uesc(setting string) string {
	out := make([]byte, 0, len(setting)+8)
	for i := 0; i < len(setting); i++ {
		if setting[i] == '_' {
			out = append(out, `\005f`...)
			continue
		}
		out = append(out, setting[i])
	}
	return string(out)
}

// a21Reads are statements that read the setting's value in the current
// transaction, spelled without any word mayTouchSetting looks for.
var a21Reads = []struct {
	name string
	stmt func(setting string) string
}{
	// current_setting called by a Unicode-escape identifier, the name as a
	// Unicode-escape string.
	{"uescape", func(s string) string {
		return `SELECT U&"current\005fsetting"(U&'` + a21Uesc(s) + `')`
	}},
	// The built-in query_to_xml runs a query given as text; the text is
	// put together from parts.
	{"query_to_xml", func(s string) string {
		i := len(s) - len("_timeout")
		return `SELECT (xpath('/row/v/text()', query_to_xml('select current' || '_setting(''` + s[:i] + `' || '` + s[i:] + `'') as v', false, true, '')))[1]::text`
	}},
}

// TestAttack21PgEscapedReadCommitsTheBound: a bounded replay (the first
// attempt fails with 40001) whose closure reads the setting and stores
// what it read. The plain driver, running the closure once, stores the
// session's value ("1s" for deadlock_timeout, "0" for lock_timeout).
// sqlretry claims such an attempt is never committed (it is rolled back
// and run again unbounded); with the read spelled as U&"current\005fsetting"
// or through query_to_xml, mayTouchSetting sees nothing and the attempt
// commits sqlretry's bound ("20ms") as what the closure read.
func TestAttack21PgEscapedReadCommitsTheBound(t *testing.T) {
	for _, m := range a21Modes {
		for _, rd := range a21Reads {
			for _, drv := range []string{"pgx", "sqlretry"} {
				t.Run(m.name+"/"+rd.name+"/"+drv, func(t *testing.T) {
					plain := atkPlain(t, "pgx")
					res := atkName("a21rd")
					atkMust(t, plain, "CREATE TABLE "+res+" (v text)")
					t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
					db := a16Open(t, drv, m.opts...)
					want := a16Show(t, plain, m.setting)
					runs := 0
					err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
						runs++
						var v string
						if err := tx.QueryRowContext(ctx, rd.stmt(m.setting)).Scan(&v); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ($1)", v)
						return err
					})
					var got string
					plain.QueryRow("SELECT coalesce(string_agg(v, ','), '') FROM " + res).Scan(&got)
					t.Logf("%s: err=%v runs=%d committed %q", drv, err, runs, got)
					if err != nil || got != want {
						t.Errorf("%s: err=%v committed %s = %q; the plain driver reads and commits the session's %q",
							drv, err, m.setting, got, want)
					}
				})
			}
		}
	}
}

// TestAttack21PgEscapedHelperLeaksTheBound: the attack15 helper (save the
// setting, do the work, set the saved value back for the session) with
// its read and its set_config spelled as Unicode-escape identifiers. The
// plain driver saves and restores the session's value: the session keeps
// it. sqlretry's bounded replay is committed (nothing seen), the helper
// restores sqlretry's bound at session level, and the pooled connection
// keeps "20ms" for every later transaction of every caller.
func TestAttack21PgEscapedHelperLeaksTheBound(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a21hl")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
				db := a16Open(t, drv, m.opts...)
				want := a16Show(t, db, m.setting)
				u := a21Uesc(m.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var saved string
					if err := tx.QueryRowContext(ctx, `SELECT U&"current\005fsetting"(U&'`+u+`')`).Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, `SELECT U&"set\005fconfig"(U&'`+u+`', $1, false)`, saved)
					return err
				})
				got := a16Show(t, db, m.setting)
				v := atkCount(t, plain, "SELECT v FROM "+tbl+" WHERE id = 1")
				t.Logf("%s: err=%v v=%d session %s before %q after %q", drv, err, v, m.setting, want, got)
				if err != nil || v != 1 || got != want {
					t.Errorf("%s: err=%v v=%d; the session's %s is %q after the call where it was %q (the plain driver keeps it)",
						drv, err, v, m.setting, got, want)
				}
			})
		}
	}
}

// TestAttack21PgBackslashLiteralTakenForCommitKeepsTheRead: a bounded
// replay whose closure reads the setting with a plain SHOW (which
// mayTouchSetting does see) and then stores it with an INSERT that has a
// backslash literal ('\', as a path separator) and a note 'saved; end'.
// Under standard_conforming_strings (on, the server's default) that is
// one INSERT; sqlretry also reads it with backslash escapes, where '\', '
// is one string and "end" a statement of its own: an END (COMMIT). It
// takes the attempt for one that committed part of its work by itself
// (escaped), which is exempt from the touched rule, and commits the
// attempt that read sqlretry's bound. The plain driver stores the
// session's value ("1s" / "0").
func TestAttack21PgBackslashLiteralTakenForCommitKeepsTheRead(t *testing.T) {
	if os.Getenv("ATTACK21_DEFECTS") == "" {
		t.Skip("left: a PostgreSQL text with a backslash is read also as under standard_conforming_strings off, where '\\' does not end the literal; a later literal's '; end' then counts as a COMMIT of the closure's, and the attempt is taken for escaped (README, short waits); run with ATTACK21_DEFECTS=1")
	}
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				res := atkName("a21bs")
				atkMust(t, plain, "CREATE TABLE "+res+" (v text, sep text, note text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, m.opts...)
				want := a16Show(t, plain, m.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+m.setting).Scan(&v); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, `INSERT INTO `+res+` (v, sep, note) VALUES ($1, '\', 'saved; end')`, v)
					return err
				})
				var got string
				plain.QueryRow("SELECT coalesce(string_agg(v || '|' || sep || '|' || note, ','), '') FROM " + res).Scan(&got)
				t.Logf("%s: err=%v committed %q", drv, err, got)
				if err != nil || got != want+`|\|saved; end` {
					t.Errorf("%s: err=%v committed %q; the plain driver commits the session's %s %q",
						drv, err, got, m.setting, want)
				}
			})
		}
	}
}

// TestAttack21PgBackslashLiteralBusyBranch: short lock waits on. The
// closure updates row 1, stores a note with a backslash literal
// (`INSERT ... VALUES ('\', 'saved; end')`, which sqlretry also reads as
// an END: "escaped"), then in a savepoint updates row 2, which another
// session holds for 300 ms, taking a "busy" branch on a lock timeout.
// The plain driver (lock_timeout 0) waits 300 ms and commits "done".
// "read": the closure first reads lock_timeout (SHOW). The touched rule
// does not apply to an escaped attempt, and a 55P03 after a touch counts
// as the closure's own: sqlretry commits "busy" after 20 ms.
// "noread": no read. The bound's 55P03 is sqlretry's own, but the attempt
// counts as having committed part of its work, so it is neither
// committed nor replayed: RunInTx returns an error and nothing is
// committed, where the plain driver committed everything.
func TestAttack21PgBackslashLiteralBusyBranch(t *testing.T) {
	if os.Getenv("ATTACK21_DEFECTS") == "" {
		t.Skip("left: as ...TakenForCommitKeepsTheRead: an attempt misread as escaped is not replayed (README, short waits); run with ATTACK21_DEFECTS=1")
	}
	for _, read := range []bool{true, false} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			name := "noread/" + drv
			if read {
				name = "read/" + drv
			}
			t.Run(name, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a21bb")
				res := atkName("a21bbres")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)",
					"CREATE TABLE "+res+" (said text, sep text, note text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl); plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, sqlretry.WithShortLockWait(true))
				var done <-chan struct{}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					if read {
						var saved string
						if err := tx.QueryRowContext(ctx, "SHOW lock_timeout").Scan(&saved); err != nil {
							return err
						}
					}
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
					_, err := tx.ExecContext(ctx, `INSERT INTO `+res+` (said, sep, note) VALUES ($1, '\', 'saved; end')`, said)
					return err
				})
				if done != nil {
					<-done
				}
				var said string
				plain.QueryRow("SELECT coalesce(string_agg(said, ','), '') FROM " + res).Scan(&said)
				v := atkCount(t, plain, "SELECT coalesce(sum(v), 0) FROM "+tbl)
				t.Logf("%s: err=%v committed said=%q sum(v)=%d", drv, err, said, v)
				if err != nil || said != "done" || v != 2 {
					t.Errorf("%s: err=%v committed said=%q sum(v)=%d; the plain driver waits 300 ms for the row and commits \"done\", sum 2",
						drv, err, said, v)
				}
			})
		}
	}
}

// TestAttack21PgOnceCachedReadOutlivesTheRollback: a helper reads the
// server's setting once per process (sync.Once, the usual way to cache a
// server setting) and the closure stores it. In sqlretry's bounded
// replay the plain SHOW is seen and the attempt is rolled back and run
// again unbounded, but the value it read, sqlretry's bound ("20ms"), is
// already in the Go cache: the run again stores and commits it, and every
// later caller of the helper gets it. The plain driver, running the
// closure once, caches and stores the session's value ("1s" / "0").
func TestAttack21PgOnceCachedReadOutlivesTheRollback(t *testing.T) {
	if os.Getenv("ATTACK21_DEFECTS") == "" {
		t.Skip("left: what a closure keeps in Go memory of the bound it read outlives the rollback (README, short waits); run with ATTACK21_DEFECTS=1")
	}
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				res := atkName("a21once")
				atkMust(t, plain, "CREATE TABLE "+res+" (v text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, m.opts...)
				want := a16Show(t, plain, m.setting)
				var once sync.Once
				var cached string
				var onceErr error
				serverSetting := func(ctx context.Context, tx *sql.Tx) (string, error) {
					once.Do(func() { onceErr = tx.QueryRowContext(ctx, "SHOW "+m.setting).Scan(&cached) })
					return cached, onceErr
				}
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					v, err := serverSetting(ctx, tx)
					if err != nil {
						return err
					}
					_, err = tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ($1)", v)
					return err
				})
				var got string
				plain.QueryRow("SELECT coalesce(string_agg(v, ','), '') FROM " + res).Scan(&got)
				t.Logf("%s: err=%v committed %q, cached %q", drv, err, got, cached)
				if err != nil || got != want || cached != want {
					t.Errorf("%s: err=%v committed %q, cached %q; the plain driver caches and commits the session's %s %q",
						drv, err, got, cached, m.setting, want)
				}
			})
		}
	}
}

// TestAttack21PgColumnDefaultReadsTheBound: a column whose DEFAULT is
// current_setting of the setting (an audit column), filled by a plain
// INSERT that names neither. The README lists "a function, view or
// trigger of your own" as not seen; a column default is none of those.
// The plain driver stores the session's value; sqlretry's bounded replay
// commits its bound.
func TestAttack21PgColumnDefaultReadsTheBound(t *testing.T) {
	if os.Getenv("ATTACK21_DEFECTS") == "" {
		t.Skip("left: server-side code (here a column DEFAULT) that reads the setting is not seen (README, short waits); run with ATTACK21_DEFECTS=1")
	}
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				res := atkName("a21def")
				atkMust(t, plain, "CREATE TABLE "+res+" (id int, v text DEFAULT current_setting('"+m.setting+"'))")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
				db := a16Open(t, drv, m.opts...)
				want := a16Show(t, plain, m.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" (id) VALUES (1)")
					return err
				})
				var got string
				plain.QueryRow("SELECT coalesce(string_agg(v, ','), '') FROM " + res).Scan(&got)
				t.Logf("%s: err=%v committed %q", drv, err, got)
				if err != nil || got != want {
					t.Errorf("%s: err=%v committed %q; the plain driver commits the session's %s %q", drv, err, got, m.setting, want)
				}
			})
		}
	}
}

// TestAttack21PgPlainSpellingsHold: claims that held. In a bounded replay
// (both modes): a read through a statement prepared on the db before the
// call and used with tx.Stmt is seen and run again unbounded; RESET ALL
// (which resets the setting without naming it) leaves the session as the
// plain driver does; a closure that reads the setting and panics panics
// once, and the session keeps its value.
func TestAttack21PgPlainSpellingsHold(t *testing.T) {
	for _, m := range a21Modes {
		t.Run(m.name+"/prepared_on_db", func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			res := atkName("a21ps")
			atkMust(t, plain, "CREATE TABLE "+res+" (v text)")
			t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
			db := a16Open(t, "sqlretry", m.opts...)
			want := a16Show(t, plain, m.setting)
			st, err := db.Prepare("SELECT current_setting('" + m.setting + "')")
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			err = a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
				var v string
				if err := tx.StmtContext(ctx, st).QueryRowContext(ctx).Scan(&v); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ($1)", v)
				return err
			})
			var got string
			plain.QueryRow("SELECT coalesce(string_agg(v, ','), '') FROM " + res).Scan(&got)
			if err != nil || got != want {
				t.Errorf("err=%v committed %q, want %q", err, got, want)
			}
		})
		t.Run(m.name+"/reset_all", func(t *testing.T) {
			db := a16Open(t, "sqlretry", m.opts...)
			atkMust(t, db, "SET "+m.setting+" = '700ms'")
			err := a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "RESET ALL")
				return err
			})
			// The plain driver: RESET ALL at session level, committed.
			want := a16Show(t, atkPlain(t, "pgx"), m.setting)
			if got := a16Show(t, db, m.setting); err != nil || got != want {
				t.Errorf("err=%v session %q, want %q", err, got, want)
			}
		})
		t.Run(m.name+"/panic", func(t *testing.T) {
			db := a16Open(t, "sqlretry", m.opts...)
			want := a16Show(t, db, m.setting)
			calls := 0
			func() {
				defer func() {
					if r := recover(); r == nil {
						t.Errorf("no panic")
					}
				}()
				a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					var v string
					tx.QueryRowContext(ctx, "SHOW "+m.setting).Scan(&v)
					panic("a21")
				})
			}()
			if got := a16Show(t, db, m.setting); calls != 1 || got != want {
				t.Errorf("calls=%d session %q, want 1 call and %q", calls, got, want)
			}
		})
	}
}

// TestAttack21PgManyGoroutinesOneConnHold: 8 goroutines, each a bounded
// replay that reads the setting and stores it, on a db of one
// connection. Held: every stored value is the session's, and so is the
// session's value after.
func TestAttack21PgManyGoroutinesOneConnHold(t *testing.T) {
	for _, m := range a21Modes {
		t.Run(m.name, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			res := atkName("a21mg")
			atkMust(t, plain, "CREATE TABLE "+res+" (v text)")
			t.Cleanup(func() { plain.Exec("DROP TABLE " + res) })
			db := a16Open(t, "sqlretry", m.opts...)
			want := a16Show(t, plain, m.setting)
			var wg sync.WaitGroup
			errs := make([]error, 8)
			for i := range errs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs[i] = a18Replay(t, "sqlretry", db, func(ctx context.Context, tx *sql.Tx) error {
						var v string
						if err := tx.QueryRowContext(ctx, "SELECT current_setting('"+m.setting+"')").Scan(&v); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" VALUES ($1)", v)
						return err
					})
				}()
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			bad := atkCount(t, plain, "SELECT count(*) FROM "+res+" WHERE v <> '"+want+"'")
			n := atkCount(t, plain, "SELECT count(*) FROM "+res)
			if got := a16Show(t, db, m.setting); bad != 0 || n != 8 || got != want {
				t.Errorf("rows=%d, %d not %q; session %q", n, bad, want, got)
			}
		})
	}
}

// TestAttack21PgTenantSetConfigRunsTwiceWithoutConflict: the row-level
// security idiom, `SELECT set_config('app.tenant', $1, true)` at the
// start of every transaction (a custom setting, not the bound's). After
// one deadlock on the db (call A's first attempt fails with 40P01), every
// attempt of the db is bounded for 2 s, first attempts included. Call B,
// which meets no conflict at all, has its first attempt bounded;
// mayTouchSetting matches "set_config" whatever the name, so B's closure
// is rolled back and run again. The README says such a closure runs once
// more "only in a replay that was bounded"; B is no replay. The plain
// driver runs B's closure once (one nextval, one Go-side effect);
// sqlretry runs it twice (two nextvals, the Go-side effect twice).
func TestAttack21PgTenantSetConfigRunsTwiceWithoutConflict(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				seq := atkName("a21seq")
				res := atkName("a21ten")
				atkMust(t, plain, "CREATE SEQUENCE "+seq, "CREATE TABLE "+res+" (id bigint, tenant text)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + res); plain.Exec("DROP SEQUENCE " + seq) })
				db := a16Open(t, drv, m.opts...)
				db.SetMaxOpenConns(2)
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				if drv == "sqlretry" {
					// Call A: a deadlock, then success.
					runsA := 0
					if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						runsA++
						if runsA == 1 {
							_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack21 deadlock' USING ERRCODE = '40P01'; END$$`)
							return err
						}
						return nil
					}); err != nil {
						t.Fatal(err)
					}
				}
				// Call B: no conflict.
				runsB := 0
				fn := func(ctx context.Context, tx *sql.Tx) error {
					runsB++ // a side effect outside the database (a message sent, a counter)
					if _, err := tx.ExecContext(ctx, "SELECT set_config('app.tenant', $1, true)", "42"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+res+" SELECT nextval('"+seq+"'), current_setting('app.tenant')")
					return err
				}
				var err error
				if drv == "pgx" {
					tx, berr := db.BeginTx(ctx, nil)
					if berr != nil {
						t.Fatal(berr)
					}
					if err = fn(ctx, tx); err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				} else {
					err = sqlretry.RunInTx(ctx, db, nil, fn)
				}
				var last int64
				plain.QueryRow("SELECT last_value FROM " + seq).Scan(&last)
				rows := atkCount(t, plain, "SELECT count(*) FROM "+res)
				t.Logf("%s: err=%v closure runs=%d rows=%d sequence at %d", drv, err, runsB, rows, last)
				if err != nil || runsB != 1 || rows != 1 || last != 1 {
					t.Errorf("%s: err=%v call B's closure ran %d times, sequence at %d; the plain driver runs it once (sequence at 1), and B met no conflict",
						drv, err, runsB, last)
				}
			})
		}
	}
}

// TestAttack21PgEscapedFromCurrentStoresTheBound: attack20's FROM CURRENT
// shape (a migration run in a RunInTx creates a function that keeps the
// setting in force at creation) with the setting's name as a
// Unicode-escape identifier: `CREATE FUNCTION ... SET
// U&"deadlock\005ftimeout" FROM CURRENT`. The plain driver's function
// keeps the session's value ("1s" / "0"); in sqlretry's bounded replay
// the text names nothing mayTouchSetting knows, the DDL commits, and the
// function carries sqlretry's bound ("20ms") in the catalog for good:
// every later call in every session runs with it (with lock_timeout, a
// 55P03 after 20 ms on any row lock wait).
func TestAttack21PgEscapedFromCurrentStoresTheBound(t *testing.T) {
	for _, m := range a21Modes {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(m.name+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				fn := atkName("a21fc")
				t.Cleanup(func() { plain.Exec("DROP FUNCTION IF EXISTS " + fn + "()") })
				db := a16Open(t, drv, m.opts...)
				want := a16Show(t, plain, m.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, `CREATE FUNCTION `+fn+`() RETURNS int LANGUAGE sql SET U&"`+a21Uesc(m.setting)+`" FROM CURRENT AS 'SELECT 1'`)
					return err
				})
				var cfg string
				plain.QueryRow("SELECT coalesce(array_to_string(proconfig, ','), '') FROM pg_proc WHERE proname = $1", fn).Scan(&cfg)
				t.Logf("%s: err=%v function config %q", drv, err, cfg)
				if err != nil || cfg != m.setting+"="+want {
					t.Errorf("%s: err=%v function stored %q; the plain driver's stores %s=%s", drv, err, cfg, m.setting, want)
				}
			})
		}
	}
}
