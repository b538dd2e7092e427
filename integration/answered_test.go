package integration

// A healthy server's answer to a statement is the statement's, whatever
// its code says: only a session that really ended (FATAL and closed on
// PostgreSQL, killed and closed on MariaDB) counts as a lost connection or
// an unavailable server. From the probe of branch probe1.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

func ansName(prefix string) string { return fmt.Sprintf("%s_%d", prefix, rand.Uint32()) }

func ansPgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func ansMyNum(err error) uint16 {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return me.Number
	}
	return 0
}

// ansCheck runs each variant once per code, and checks that each ran the
// raising code once, returned the server's code at once, never as an
// ambiguous commit, and that the breaker stayed closed for another caller.
func ansCheck[C comparable](t *testing.T, db *sql.DB, codes []C, count func() int64, codeOf func(error) C,
	variants map[string]func(ctx context.Context, code C) error) {
	t.Helper()
	for _, code := range codes {
		for name, run := range variants {
			before := count()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			start := time.Now()
			err := run(ctx, code)
			el := time.Since(start)
			cancel()
			if runs := count() - before; runs != 1 || codeOf(err) != code || errors.Is(err, sqlretry.ErrAmbiguousCommit) || el > time.Second {
				t.Errorf("%v %s: ran %d times in %v, err = %v; want once, at once, the server's error", code, name, runs, el.Round(time.Millisecond), err)
			}
		}
	}
	st, _ := sqlretry.StatsOf(db)
	if st.Breaker != sqlretry.BreakerClosed || st.HandOffs != 0 {
		t.Errorf("breaker %v, hand-offs %d after statement errors of a healthy server", st.Breaker, st.HandOffs)
	}
	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil {
		t.Errorf("another caller's SELECT 1: %v", err)
	}
}

func TestAnsweredPostgresUserRaisedSessionCodes(t *testing.T) {
	raw, err := sql.Open("pgx", defaultPG)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	seq, fn := ansName("ans_seq"), ansName("ans_raise")
	mustExec(t, raw, "CREATE SEQUENCE "+seq, `CREATE FUNCTION `+fn+`(code text) RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM nextval('`+seq+`'); RAISE EXCEPTION 'user raised %', code USING ERRCODE = code; END $$`)
	defer raw.Exec("DROP SEQUENCE IF EXISTS " + seq)
	defer raw.Exec("DROP FUNCTION IF EXISTS " + fn + "(text)")
	db, err := sqlretry.Open("pgx", defaultPG)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	count := func() int64 {
		var n int64
		if err := raw.QueryRow("SELECT last_value + CASE WHEN is_called THEN 0 ELSE -1 END FROM " + seq).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	ansCheck(t, db, []string{"57P01", "57P02", "57P03", "53300", "57P05", "08006", "25P03", "25P02"}, count, ansPgCode,
		map[string]func(ctx context.Context, code string) error{
			"read": func(ctx context.Context, code string) error {
				var x int
				return db.QueryRowContext(ctx, "SELECT "+fn+"($1)", code).Scan(&x)
			},
			"write": func(ctx context.Context, code string) error {
				_, err := db.ExecContext(ctx, "SELECT "+fn+"('"+code+"')")
				return err
			},
			"RunInTx": func(ctx context.Context, code string) error {
				if code == "25P02" {
					// In a transaction a 25P02 is taken for the aftermath of
					// an error the wrapper did not see: replayed (not this
					// test's subject). Run the read instead.
					var x int
					return db.QueryRowContext(ctx, "SELECT "+fn+"($1)", code).Scan(&x)
				}
				return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "SELECT "+fn+"($1)", code)
					return err
				})
			},
		})
}

func TestAnsweredMariaDBUserSignalledSessionNumbers(t *testing.T) {
	raw, err := sql.Open("mysql", defaultMySQL)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	cnt, fn := ansName("ans_cnt"), ansName("ans_sig")
	mustExec(t, raw, "CREATE TABLE "+cnt+" (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=MyISAM",
		"CREATE FUNCTION "+fn+"(n INT) RETURNS INT MODIFIES SQL DATA BEGIN INSERT INTO "+cnt+"() VALUES (); SIGNAL SQLSTATE '45000' SET MYSQL_ERRNO = n, MESSAGE_TEXT = 'user signal'; RETURN 1; END")
	defer raw.Exec("DROP TABLE IF EXISTS " + cnt)
	defer raw.Exec("DROP FUNCTION IF EXISTS " + fn)
	db, err := sqlretry.Open("mysql", defaultMySQL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	count := func() int64 {
		var n int64
		if err := raw.QueryRow("SELECT COUNT(*) FROM " + cnt).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	ansCheck(t, db, []uint16{1927, 1053, 1080, 1152, 1158, 1161, 1040, 1203, 4031}, count, ansMyNum,
		map[string]func(ctx context.Context, n uint16) error{
			"read": func(ctx context.Context, n uint16) error {
				var x int
				return db.QueryRowContext(ctx, "SELECT "+fn+"(?)", n).Scan(&x)
			},
			"write": func(ctx context.Context, n uint16) error {
				// (text protocol: go-sql-driver's Exec of a prepared SELECT whose
				// function SIGNALs hangs on MariaDB 10.11, with or without sqlretry)
				_, err := db.ExecContext(ctx, fmt.Sprintf("SELECT %s(%d)", fn, n))
				return err
			},
			"RunInTx": func(ctx context.Context, n uint16) error {
				return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, fmt.Sprintf("SELECT %s(%d)", fn, n))
					return err
				})
			},
			"RunInTx-rows": func(ctx context.Context, n uint16) error {
				// the error comes while the rows are read
				return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					var x int
					return tx.QueryRowContext(ctx, "SELECT "+fn+"(?)", n).Scan(&x)
				})
			},
		})
}

// The real ones still count: a session terminated (PostgreSQL, FATAL
// 57P01) or killed (MariaDB, 1927) while its statement runs is a lost
// connection: RunInTx replays, an autocommit read runs again.
func TestAnsweredKilledSessionsStillCount(t *testing.T) {
	for _, driver := range []string{"pgx", "mysql"} {
		t.Run(driver, func(t *testing.T) {
			dsn := needPrivate(t, driver)
			admin, err := sql.Open(driver, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer admin.Close()
			db, err := sqlretry.Open(driver, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			idQ, sleepQ, kill := "SELECT pg_backend_pid()", "SELECT pg_sleep(3)", "SELECT pg_terminate_backend($1)"
			if driver == "mysql" {
				idQ, sleepQ, kill = "SELECT CONNECTION_ID()", "SELECT SLEEP(3)", "KILL CONNECTION ?"
			}
			killSoon := func(id int64) chan error {
				done := make(chan error, 1)
				go func() {
					time.Sleep(300 * time.Millisecond)
					_, err := admin.Exec(kill, id)
					done <- err
				}()
				return done
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			calls := 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if calls > 1 {
					return nil
				}
				var id int64
				if err := tx.QueryRowContext(ctx, idQ).Scan(&id); err != nil {
					return err
				}
				done := killSoon(id)
				var x any
				err := tx.QueryRowContext(ctx, sleepQ).Scan(&x)
				if kerr := <-done; kerr != nil {
					t.Errorf("kill: %v", kerr)
				}
				return err
			})
			if err != nil || calls != 2 {
				t.Errorf("RunInTx: %d runs, err = %v; want the killed attempt replayed", calls, err)
			}
			c, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var id int64
			if err := c.QueryRowContext(ctx, idQ).Scan(&id); err != nil {
				t.Fatal(err)
			}
			c.Close() // back to the pool: the read below takes it
			db.SetMaxIdleConns(1)
			done := killSoon(id)
			start := time.Now()
			// database/sql re-runs the handed-off call on a new connection,
			// which sleeps its full time. (A function call is not a plain
			// read: the caller vouches for it.)
			var x any
			err = db.QueryRowContext(sqlretry.Idempotent(ctx), sleepQ).Scan(&x)
			<-done
			if err != nil || time.Since(start) < 3*time.Second {
				t.Errorf("autocommit read on a killed session: err = %v after %v; want it run again", err, time.Since(start))
			}
		})
	}
}

// A write whose COMMIT the caller's deadline cut (a synchronous standby
// frozen, so the COMMIT waits) may have committed: the caller gets
// ErrAmbiguousCommit with the deadline, never a plain failure, whether
// the COMMIT was RunInTx's, Tx.Commit's or an autocommit statement's own.
func TestAnsweredCommitCutByTheDeadlineIsAmbiguous(t *testing.T) {
	p := syncPair(t)
	admin, err := sql.Open("pgx", p.Primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	tbl := ansName("ans_sync")
	mustExec(t, admin, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, tag text)")
	db, err := sqlretry.Open("pgx", p.Primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, c := range []struct {
		name string
		run  func(ctx context.Context, q string) error
	}{
		{"autocommit", func(ctx context.Context, q string) error { _, err := db.ExecContext(ctx, q); return err }},
		{"RunInTx", func(ctx context.Context, q string) error {
			return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error { _, err := tx.ExecContext(ctx, q); return err })
		}},
		{"Tx.Commit", func(ctx context.Context, q string) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, q); err != nil {
				tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := db.Ping(); err != nil {
				t.Fatal(err)
			}
			if err := p.FreezeStandby(); err != nil {
				t.Fatal(err)
			}
			tag := ansName("t")
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err := c.run(ctx, "INSERT INTO "+tbl+"(tag) VALUES ('"+tag+"')")
			cancel()
			p.ThawStandby()
			var n int
			for range 50 { // the cut COMMIT finishes on the primary alone
				admin.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE tag = $1", tag).Scan(&n)
				if n > 0 {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || !errors.Is(err, context.DeadlineExceeded) || n > 1 {
				t.Errorf("err = %v, rows %d; want ErrAmbiguousCommit with the deadline, at most one row", err, n)
			}
		})
	}
}
