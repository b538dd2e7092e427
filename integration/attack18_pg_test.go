package integration

// Hostile tests of sqlretry (attack18): the restore of a touched short-wait
// setting before COMMIT (restoreBound, tx.go), which runs
// "SAVEPOINT sqlretry_restore; SELECT set_config...; RELEASE SAVEPOINT
// sqlretry_restore" and, when that fails, "ROLLBACK TO SAVEPOINT
// sqlretry_restore; RELEASE SAVEPOINT sqlretry_restore".

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// a18Replay runs fn as the second attempt of RunInTx (the first fails with
// 40001, so the replay carries the bound), or once through the plain
// driver's BeginTx/Commit. It returns the error the caller sees.
func a18Replay(t *testing.T, drv string, db *sql.DB, fn func(ctx context.Context, tx *sql.Tx) error) error {
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
			return err
		}
		return tx.Commit()
	}
	runs := 0
	return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs == 1 {
			_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack18 conflict' USING ERRCODE = '40001'; END$$`)
			return err
		}
		return fn(ctx, tx)
	})
}

// TestAttack18PgAbortedTxRevivedByRestoreCommits: a closure that reads
// deadlock_timeout (SHOW: "touched"), inserts row 1, opens a savepoint
// of its own that happens to be named sqlretry_restore, inserts row 2,
// meets an error it swallows (division by zero: the transaction is
// aborted) and returns nil. The plain driver's COMMIT of an aborted
// transaction is a ROLLBACK: Commit fails ("commit unexpectedly resulted
// in rollback"), nothing is committed. sqlretry's restore fails on the
// aborted transaction, and its clean-up "ROLLBACK TO SAVEPOINT
// sqlretry_restore" then rolls back to the closure's savepoint, which
// revives the transaction: the COMMIT commits row 1 and RunInTx reports
// success for a transaction the plain driver rolls back.
func TestAttack18PgAbortedTxRevivedByRestoreCommits(t *testing.T) {
	for _, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				plain := atkPlain(t, "pgx")
				tbl := atkName("a18abort")
				atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key)")
				t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl) })
				db := a16Open(t, drv, c.opts...)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SAVEPOINT sqlretry_restore"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (2)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SELECT 1/0")
					t.Logf("swallowed: %v", err)
					return nil
				})
				n := atkCount(t, plain, "SELECT count(*) FROM "+tbl)
				t.Logf("%s: err=%v rows=%d", drv, err, n)
				if err == nil || n != 0 {
					t.Errorf("%s: err=%v rows=%d; the plain driver: commit unexpectedly resulted in rollback, 0 rows", drv, err, n)
				}
			})
		}
	}
}

// TestAttack18PgOwnCommitAfterRestoreLeaksTheBound: attack15's helper
// (save the setting, change it, restore it with a session SET), then the
// closure commits itself with tx.Exec("COMMIT") and returns nil. With the
// plain driver the helper saved and restored the session's own value
// (0 / 1s); its Commit succeeds (the second COMMIT only draws a
// warning) and the session keeps its own value. sqlretry's restore runs after the closure's COMMIT, outside any
// transaction, where its SAVEPOINT fails: the bound the helper saved
// (20ms) stays the session's value on the pooled connection: with
// lock_timeout a later autocommit UPDATE that waits 300 ms for a row fails
// with 55P03 where the plain driver's waits and succeeds.
func TestAttack18PgOwnCommitAfterRestoreLeaksTheBound(t *testing.T) {
	for _, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				before := a17After(t, db, c.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+v+"'"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "COMMIT")
					return err
				})
				after := a17After(t, db, c.setting)
				t.Logf("%s: err=%v before=%s after=%s", drv, err, before, after)
				if after != before {
					t.Errorf("%s: session's %s %s after the transaction, %s before; the plain driver's is back to its own", drv, c.setting, after, before)
				}
				if c.setting == "lock_timeout" {
					if err := a17LaterUpdateWaits(t, db); err != nil {
						t.Errorf("%s: a later UPDATE on the pooled connection that waits 300 ms for a row: %v; the plain driver's waits and succeeds", drv, err)
					}
				}
			})
		}
	}
}

// TestAttack18PgLaterSetLocalHidesTheLeak: attack15's helper (save the
// setting, change it, restore it with a session SET: the session's value is
// now the bound, 20ms), then a later part of the closure that sets its own
// value for the rest of the transaction with SET LOCAL (3s). After the
// COMMIT the session SET's value takes effect (PostgreSQL: "SET followed by
// SET LOCAL ... afterwards the SET value takes effect"). sqlretry's restore
// compares pg_settings.setting, the transaction's current value (the SET
// LOCAL's 3s), with the bound, finds them different and does nothing: the
// bound stays the session's value on the pooled connection. The plain
// driver's helper saved and restored the session's own value (0 / 1s).
func TestAttack18PgLaterSetLocalHidesTheLeak(t *testing.T) {
	for _, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				before := a17After(t, db, c.setting)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '5s'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+v+"'"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SET LOCAL "+c.setting+" = '3s'")
					return err
				})
				after := a17After(t, db, c.setting)
				t.Logf("%s: err=%v before=%s after=%s", drv, err, before, after)
				if err != nil {
					t.Fatal(err)
				}
				if after != before {
					t.Errorf("%s: session's %s %s after the transaction, %s before; the plain driver's is back to its own", drv, c.setting, after, before)
				}
				if c.setting == "lock_timeout" {
					if err := a17LaterUpdateWaits(t, db); err != nil {
						t.Errorf("%s: a later UPDATE on the pooled connection that waits 300 ms for a row: %v; the plain driver's waits and succeeds", drv, err)
					}
				}
			})
		}
	}
}

// TestAttack18PgSetLocalBackToSavedUndoesSessionSet: the mirror of
// TestAttack18PgLaterSetLocalHidesTheLeak. The closure saves the setting
// (SHOW: the bound, 20ms, in sqlretry's replay), sets a new session value
// on purpose (SET 2s: the connection's value from now on), and sets the
// transaction's value back to the saved one with SET LOCAL. The plain
// driver's session keeps 2s after the COMMIT. sqlretry's restore sees the
// current value equal to the bound and sets the session value to what the
// bound replaced (0 / 1s): the closure's deliberate session setting is
// lost.
func TestAttack18PgSetLocalBackToSavedUndoesSessionSet(t *testing.T) {
	for _, c := range a17PgCases {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				db := a16Open(t, drv, c.opts...)
				err := a18Replay(t, drv, db, func(ctx context.Context, tx *sql.Tx) error {
					var v string
					if err := tx.QueryRowContext(ctx, "SHOW "+c.setting).Scan(&v); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '2s'"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SET LOCAL "+c.setting+" = '"+v+"'")
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
