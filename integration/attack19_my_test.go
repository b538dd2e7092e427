package integration

// Hostile tests of sqlretry (attack19): MariaDB's commit marker and table
// locks of other sessions.

import (
	"context"
	"database/sql"
	"os"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// TestAttack19MyOtherSessionReadLockOnMarkerHangsCommits: another session
// (a backup's LOCK TABLES ... READ over the tables of the DSN's database,
// here cut down to the marker table so as not to block other tests) holds
// a READ lock on the marker table for 3 s. A caller writes a row to a
// table that lock does not cover and commits. The plain driver commits at
// once. sqlretry's marker INSERT (in the COMMIT's block) waits for the
// READ lock with the session's lock_wait_timeout (a day by default), not
// the second its marker check now waits: the COMMIT is held for the whole
// lock (here the 3 s), or to the caller's deadline.
func TestAttack19MyOtherSessionReadLockOnMarkerHangsCommits(t *testing.T) {
	if os.Getenv("ATTACK19_DEFECTS") == "" {
		t.Skip("left: another session's lock on the commit marker table holds COMMITs as long as it is held (README, the marker table); run with ATTACK19_DEFECTS=1")
	}
	root := atkPlain(t, "mysql")
	marker := atkName("a19mk")
	tbl := atkName("a19w")
	atkMust(t, root, "CREATE TABLE "+tbl+" (id int primary key, tag varchar(40))")
	t.Cleanup(func() {
		root.Exec("DROP TABLE IF EXISTS " + tbl)
		root.Exec("DROP TABLE IF EXISTS test." + marker)
	})
	{
		// the marker table is made by a first transaction of a db
		w := atkOpenMy(t, sqlretry.WithMySQLCommitMarker("test."+marker))
		if err := sqlretry.RunInTx(context.Background(), w, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (99, 'made')")
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
				db = atkOpenMy(t, sqlretry.WithMySQLCommitMarker("test."+marker), sqlretry.WithObserver(sqlretry.ObserverFunc(func(ctx context.Context, e sqlretry.Event) {
					t.Logf("event %v %s %v %s", e.Kind, e.Op, e.Err, e.Reason)
				})))
			}
			db.SetMaxOpenConns(1)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// warm: the db has checked its marker table and writes markers
			// (the marker rows grow)
			for k := 0; ; k++ {
				before := atkCount(t, root, "SELECT COUNT(*) FROM test."+marker)
				ws := time.Now()
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?, 'warm')", 100+100*i+k)
					return err
				})
				t.Logf("warm-up %d: %v err=%v", k, time.Since(ws).Round(time.Millisecond), err)
				if err != nil {
					t.Fatal(err)
				}
				if drv == "mysql" || atkCount(t, root, "SELECT COUNT(*) FROM test."+marker) > before {
					break
				}
				if k == 20 {
					t.Fatal("the db writes no marker")
				}
				time.Sleep(100 * time.Millisecond)
			}
			locker, err := root.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer locker.Close()
			if _, err := locker.ExecContext(context.Background(), "LOCK TABLES test."+marker+" READ"); err != nil {
				t.Fatal(err)
			}
			unlocked := make(chan struct{})
			go func() {
				time.Sleep(3 * time.Second)
				locker.ExecContext(context.Background(), "UNLOCK TABLES")
				close(unlocked)
			}()
			defer func() { <-unlocked }()
			if drv == "sqlretry" {
				t.Logf("marker rows before the lock: %d", atkCount(t, root, "SELECT COUNT(*) FROM test."+marker))
			}
			start := time.Now()
			fn := func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?, 'x')", i)
				return err
			}
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
			took := time.Since(start)
			t.Logf("%s: err=%v took %v", drv, err, took.Round(time.Millisecond))
			if err != nil || took > time.Second {
				t.Errorf("%s: err=%v after %v; the plain driver commits at once", drv, err, took.Round(time.Millisecond))
			}
		})
	}
}
