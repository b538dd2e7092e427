package integration

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// twoWay runs fn in two goroutines through RunInTx; on their first attempt
// both wait at a barrier between their first and second step, which makes
// the conflict certain. It returns the two errors.
func twoWay(t *testing.T, db *sql.DB, opts *sql.TxOptions, first, second func(ctx context.Context, tx *sql.Tx, who int) error) [2]error {
	t.Helper()
	var barrier sync.WaitGroup
	barrier.Add(2)
	var errs [2]error
	var wg sync.WaitGroup
	for who := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			attempt := 0
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			errs[who] = sqlretry.RunInTx(ctx, db, opts, func(ctx context.Context, tx *sql.Tx) error {
				attempt++
				if err := first(ctx, tx, who); err != nil {
					if attempt == 1 {
						barrier.Done()
					}
					return err
				}
				if attempt == 1 {
					barrier.Done()
					barrier.Wait()
				}
				return second(ctx, tx, who)
			})
		}()
	}
	wg.Wait()
	return errs
}

func TestPostgresSerializationFailureIsReplayed(t *testing.T) {
	db, err := sqlretry.Open("pgx", need(t, "pgx"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, db, "counter")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	errs := twoWay(t, db, &sql.TxOptions{Isolation: sql.LevelSerializable},
		func(ctx context.Context, tx *sql.Tx, _ int) error {
			var n int
			return tx.QueryRowContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n)
		},
		func(ctx context.Context, tx *sql.Tx, _ int) error {
			_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
			return err
		})
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("RunInTx surfaced errors: %v", errs)
	}
	var n int
	db.QueryRow("SELECT n FROM " + tbl + " WHERE id = 1").Scan(&n)
	s, _ := sqlretry.StatsOf(db)
	t.Logf("n=%d stats=%+v", n, s)
	if n != 2 {
		t.Errorf("n = %d, want 2 (both increments, once each)", n)
	}
	if s.RetriesTransaction < 1 {
		t.Errorf("no transaction was replayed: the serialization failure was not provoked")
	}
}

func deadlockTest(t *testing.T, driverName string) {
	db, err := sqlretry.Open(driverName, need(t, driverName))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, db, "acct")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 100), (2, 100)")
	q := "UPDATE " + tbl + " SET n = n + ? WHERE id = ?"
	if driverName == "pgx" {
		q = "UPDATE " + tbl + " SET n = n + $1 WHERE id = $2"
	}
	// Opposite lock order: 0 moves 10 from 1 to 2, 1 moves 10 from 2 to 1.
	errs := twoWay(t, db, nil,
		func(ctx context.Context, tx *sql.Tx, who int) error {
			_, err := tx.ExecContext(ctx, q, -10, 1+who)
			return err
		},
		func(ctx context.Context, tx *sql.Tx, who int) error {
			_, err := tx.ExecContext(ctx, q, 10, 2-who)
			return err
		})
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("RunInTx surfaced errors: %v", errs)
	}
	var a, b int
	db.QueryRow("SELECT n FROM " + tbl + " WHERE id = 1").Scan(&a)
	db.QueryRow("SELECT n FROM " + tbl + " WHERE id = 2").Scan(&b)
	s, _ := sqlretry.StatsOf(db)
	t.Logf("a=%d b=%d stats=%+v", a, b, s)
	if a != 100 || b != 100 {
		t.Errorf("balances %d, %d; want 100, 100 (each transfer applied once)", a, b)
	}
	if s.RetriesTransaction < 1 {
		t.Error("no transaction was replayed: the deadlock was not provoked")
	}
}

func TestPostgresDeadlockIsReplayed(t *testing.T) { deadlockTest(t, "pgx") }
func TestMariaDBDeadlockIsReplayed(t *testing.T)  { deadlockTest(t, "mysql") }

// On MariaDB a deadlock rolls the whole transaction back and the session
// goes on in autocommit: a closure that swallows the error writes half a
// transfer. Shown first with the plain driver, then refused by sqlretry.
func TestMariaDBSwallowedDeadlockIsRefused(t *testing.T) {
	d := need(t, "mysql")
	for _, wrapped := range []bool{false, true} {
		var db *sql.DB
		var err error
		if wrapped {
			db, err = sqlretry.Open("mysql", d)
		} else {
			db, err = sql.Open("mysql", d)
		}
		if err != nil {
			t.Fatal(err)
		}
		tbl := table(t, db, "ledger")
		mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
		var barrier, wg sync.WaitGroup
		barrier.Add(2)
		var commitErr [2]error
		for who := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tx, err := db.Begin()
				if err != nil {
					commitErr[who] = err
					return
				}
				tx.Exec("UPDATE "+tbl+" SET n = n + 1 WHERE id = ?", 1+who)
				barrier.Done()
				barrier.Wait()
				tx.Exec("UPDATE "+tbl+" SET n = n + 1 WHERE id = ?", 2-who) // the victim's error is swallowed
				tx.Exec("INSERT INTO "+tbl+" VALUES (?, 1)", 10+who)        // after the rollback: autocommit on a plain driver
				commitErr[who] = tx.Commit()
			}()
		}
		wg.Wait()
		var partial int
		db.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE id >= 10").Scan(&partial)
		var rows int
		db.QueryRow("SELECT SUM(n) FROM " + tbl + " WHERE id < 10").Scan(&rows)
		t.Logf("wrapped=%v commit errors=%v partial rows=%d", wrapped, commitErr, partial)
		deadlocked := 0
		for _, e := range commitErr {
			var me *mysql.MySQLError
			if errors.As(e, &me) && me.Number == 1213 {
				deadlocked++
			}
		}
		if !wrapped {
			if partial != 2 {
				t.Errorf("plain driver: want the partial write to show (2 inserts committed, one of them after the deadlock), got %d", partial)
			}
		} else {
			if partial != 1 || deadlocked != 1 {
				t.Errorf("sqlretry: want only the winner's insert and the deadlock from the victim's Commit, got %d rows, errors %v", partial, commitErr)
			}
		}
		db.Close()
	}
}

// sql.Conn.Raw still reaches *stdlib.Conn through sqlretry: pgx CopyFrom works.
func TestPostgresRawCopyFromThroughSqlretry(t *testing.T) {
	db, err := sqlretry.Open("pgx", need(t, "pgx"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, db, "copy")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int, name text)")
	conn, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		pc := sqlretry.UnwrapConn(dc).(*stdlib.Conn).Conn()
		n, err := pc.CopyFrom(context.Background(), pgx.Identifier{tbl}, []string{"id", "name"},
			pgx.CopyFromRows([][]any{{1, "a"}, {2, "b"}, {3, "c"}}))
		if n != 3 {
			t.Errorf("copied %d rows", n)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var n int
	db.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&n)
	if n != 3 {
		t.Errorf("count = %d", n)
	}
	// The pgx error type is still reachable through sqlretry's errors.
	_, err = db.Exec("INSERT INTO no_such_table_xyz VALUES (1)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42P01" {
		t.Errorf("err = %v, want *pgconn.PgError 42P01", err)
	}
}
