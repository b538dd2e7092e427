package integration

// Hostile tests of sqlretry (attack18): MariaDB's commit marker.

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// TestAttack18MyReadLockOnAllTablesReportsCommittedFailed: a closure
// writes an audit row, then takes READ locks on the tables of its
// database, as mysqldump --lock-tables does, with a LOCK TABLES text built
// from information_schema and run by EXECUTE IMMEDIATE (the default
// marker table, test.sqlretry_commit_marker, is one of the database's
// tables; here a marker table of the test's own in the same database,
// and the lock list is cut down to it and the test's table so as not to
// block other sessions). LOCK TABLES commits the transaction implicitly:
// the audit row is committed. The plain driver's Commit returns nil.
// sqlretry's marker INSERT is refused with 1099 (table locked with a READ
// lock), which it does not take for a lock of the session's own (only
// 1100 and 1223): it rolls back and RunInTx returns that error, a
// committed transaction reported failed.
func TestAttack18MyReadLockOnAllTablesReportsCommittedFailed(t *testing.T) {
	a18MyReadLock(t, true)
}

// TestAttack18MyReadLockColdDbHangsToDeadline: the same closure as the
// first transaction of a db (an application just started; the marker
// table exists, made by another instance). sqlretry checks the marker
// table at COMMIT on a side connection, whose "DELETE ... WHERE 1=0"
// waits for the closure's READ lock on it (lock_wait_timeout, a year by
// default): RunInTx hangs until the caller's deadline (5 s here) and
// returns "context deadline exceeded" for a transaction that committed
// (the audit row is there). The plain driver's Commit returns nil at once.
func TestAttack18MyReadLockColdDbHangsToDeadline(t *testing.T) {
	a18MyReadLock(t, false)
}

func a18MyReadLock(t *testing.T, warm bool) {
	root := atkPlain(t, "mysql")
	marker := atkName("a18mk")
	tbl := atkName("a18rl")
	atkMust(t, root, "CREATE TABLE "+tbl+" (id int primary key, tag varchar(40))")
	t.Cleanup(func() {
		root.Exec("DROP TABLE IF EXISTS " + tbl)
		root.Exec("DROP TABLE IF EXISTS test." + marker)
	})
	{
		// the marker table is made by a first transaction of a db
		w := atkOpenMy(t, sqlretry.WithMySQLCommitMarker("test."+marker))
		if err := sqlretry.RunInTx(context.Background(), w, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (99, 'warm')")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		w.Close()
		atkCount(t, root, "SELECT COUNT(*) FROM test."+marker)
	}
	for i, drv := range []string{"mysql", "sqlretry"} {
		t.Run(drv, func(t *testing.T) {
			var db *sql.DB
			if drv == "mysql" {
				db = atkPlain(t, "mysql")
			} else {
				db = atkOpenMy(t, sqlretry.WithMySQLCommitMarker("test."+marker))
			}
			db.SetMaxOpenConns(1)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			// warm up: sqlretry's db checks its marker table in a first
			// transaction
			if warm {
				if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?, 'warm')", 100+i)
					return err
				}); err != nil {
					t.Fatal(err)
				}
			}
			fn := func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?, 'audit')", i); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "SELECT CONCAT('LOCK TABLES ', GROUP_CONCAT(CONCAT('`', table_name, '` READ'))) INTO @a18lock FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN (?, ?)", tbl, marker); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "EXECUTE IMMEDIATE @a18lock"); err != nil {
					return err
				}
				var n int
				return tx.QueryRowContext(ctx, "SELECT COUNT(*) FROM "+tbl).Scan(&n)
			}
			var err error
			start := time.Now()
			if drv == "mysql" {
				tx, berr := db.BeginTx(ctx, nil)
				if berr != nil {
					t.Fatal(berr)
				}
				if err = fn(ctx, tx); err != nil {
					tx.Rollback()
				} else {
					err = tx.Commit()
				}
			} else {
				err = sqlretry.RunInTx(ctx, db, nil, fn)
			}
			db.ExecContext(context.Background(), "UNLOCK TABLES")
			n := atkCount(t, root, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = 'audit' AND id = "+string(rune('0'+i)))
			t.Logf("%s: err=%v audit rows=%d (%v)", drv, err, n, time.Since(start))
			if err != nil && n == 1 {
				t.Errorf("%s: committed (audit row there) but reported failed: %v; the plain driver's Commit returns nil", drv, err)
			}
		})
	}
}
