package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// a13Victim: as a12VictimOf, with pre run first in every attempt of B.
//
//lint:ignore ST1008 the error first reads as the call it reports
func a13Victim(t *testing.T, d, tbl, pre string, o ...sqlretry.Option) (said string, runs int, err error, aErr error, n1 int, dtIn string) {
	t.Helper()
	ctx := a12Ctx(t, 15*time.Second)
	plain := a12Plain(t, d)
	mon := a12Plain(t, d)
	db := a12Open(t, d, 1, nil, o...)
	mustExec(t, plain, "UPDATE "+tbl+" SET n = 0")
	aConn, e := plain.Conn(ctx)
	if e != nil {
		t.Fatal(e)
	}
	defer aConn.Close()
	var aPid int
	if e := aConn.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&aPid); e != nil {
		t.Fatal(e)
	}
	aTx, e := aConn.BeginTx(ctx, nil)
	if e != nil {
		t.Fatal(e)
	}
	defer aTx.Rollback()
	aDone := make(chan error, 1)
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs < 2 {
			return a12Fake(ctx, tx, "40001")
		}
		if pre != "" {
			if _, err := tx.ExecContext(ctx, pre); err != nil {
				return err
			}
		}
		if err := tx.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&dtIn); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2"); err != nil {
			return err
		}
		if runs == 2 {
			if _, err := aTx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
				return err
			}
			go func() {
				_, err := aTx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2")
				if err == nil {
					err = aTx.Commit()
				} else {
					aTx.Rollback()
				}
				aDone <- err
			}()
			if err := a12WaitLocked(ctx, mon, aPid); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, "SAVEPOINT a13"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			if sqlretry.ErrorCode(err) != "40P01" {
				return err
			}
			said = "busy"
			_, err = tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT a13")
			return err
		}
		said = "done"
		return nil
	}, o...)
	select {
	case aErr = <-aDone:
	case <-ctx.Done():
		t.Fatal("A never ended")
	}
	plain.QueryRowContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n1)
	return
}

func TestAttack13ResetThenSavepoint(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK13_ALL") == "" {
		t.Skip("observations of a hostile tester's (they held); SQLRETRY_ATTACK13_ALL=1 to run")
	}
	d := need(t, "pgx")
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a13reset")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
	for _, pre := range []string{"", "RESET deadlock_timeout", "SET LOCAL deadlock_timeout TO DEFAULT"} {
		for _, on := range []bool{false, true} {
			t0 := time.Now()
			said, runs, err, aErr, n1, dt := a13Victim(t, d, tbl, pre, sqlretry.WithShortDeadlockCheck(on))
			t.Logf("pre=%q short=%v: said=%q runs=%d err=%v A=%v n1=%d dtIn(last)=%s took %v", pre, on, said, runs, err, aErr, n1, dt, time.Since(t0).Round(time.Millisecond))
		}
	}
}

// Swallowing a 40P01 without a savepoint: the transaction is aborted, the
// commit fails. Plain driver: hand loop.
func TestAttack13SwallowNoSavepoint(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK13_ALL") == "" {
		t.Skip("observations of a hostile tester's (they held); SQLRETRY_ATTACK13_ALL=1 to run")
	}
	d := need(t, "pgx")
	ctx := a12Ctx(t, 12*time.Second)
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a13sw")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id serial PRIMARY KEY, tag text)")
	for _, code := range []string{"40P01", "40001", "23505"} {
		// plain
		runs := 0
		var perr error
		for runs < 5 {
			runs++
			tx, err := setup.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			tx.ExecContext(ctx, "INSERT INTO "+tbl+"(tag) VALUES ($1)", "plain-"+code)
			_ = a12Fake(ctx, tx, code) // swallowed
			perr = tx.Commit()
			c := sqlretry.ErrorCode(perr)
			if c == "40001" || c == "40P01" {
				continue
			}
			break
		}
		t.Logf("plain %s: runs=%d commit err=%v (%T, code %q, ErrTxDone? %v)", code, runs, perr, perr, sqlretry.ErrorCode(perr), errors.Is(perr, sql.ErrTxDone))
		for _, replay := range []bool{false, true} {
			db := a12Open(t, d, 1, nil)
			r := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				r++
				if replay && r == 1 {
					return a12Fake(ctx, tx, "40001")
				}
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+"(tag) VALUES ($1)", fmt.Sprintf("sr-%s-%v", code, replay)); err != nil {
					return err
				}
				if r <= 3 || code == "40P01" {
					_ = a12Fake(ctx, tx, code) // swallowed (40P01: always)
				}
				return nil
			})
			var n int
			setup.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl+" WHERE tag = $1", fmt.Sprintf("sr-%s-%v", code, replay)).Scan(&n)
			t.Logf("sqlretry %s replay=%v: runs=%d err=%v (%T code %q) rows=%d", code, replay, r, err, err, sqlretry.ErrorCode(err), n)
		}
	}
}

func TestAttack13SetTransactionSnapshot(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK13_ALL") == "" {
		t.Skip("observations of a hostile tester's (they held); SQLRETRY_ATTACK13_ALL=1 to run")
	}
	d := need(t, "pgx")
	ctx := a12Ctx(t, 20*time.Second)
	setup := a12Plain(t, d)
	tbl := table(t, setup, "a13snap")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY)", "INSERT INTO "+tbl+" VALUES (1)")
	exp, err := setup.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Close()
	etx, err := exp.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	defer etx.Rollback()
	var snap string
	if err := etx.QueryRowContext(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
		t.Fatal(err)
	}
	mustExec(t, setup, "INSERT INTO "+tbl+" VALUES (2)") // not in the snapshot
	body := func(ctx context.Context, tx *sql.Tx) (int, error) {
		if _, err := tx.ExecContext(ctx, "SET TRANSACTION SNAPSHOT '"+snap+"'"); err != nil {
			return -1, err
		}
		var n int
		err := tx.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl).Scan(&n)
		return n, err
	}
	ro := &sql.TxOptions{Isolation: sql.LevelRepeatableRead}
	{
		tx, _ := setup.BeginTx(ctx, ro)
		n, err := body(ctx, tx)
		tx.Rollback()
		t.Logf("plain: n=%d err=%v", n, err)
	}
	for _, iso := range []sql.IsolationLevel{sql.LevelRepeatableRead, sql.LevelSerializable} {
		tr := &a12Tracer{}
		db := a12Open(t, d, 1, tr)
		runs, n := 0, -1
		err := sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: iso}, func(ctx context.Context, tx *sql.Tx) error {
			if runs++; runs == 1 {
				return a12Fake(ctx, tx, "40P01")
			}
			var err error
			n, err = body(ctx, tx)
			return err
		})
		t.Logf("sqlretry %v: runs=%d n=%d err=%v SET LOCAL sent %d", iso, runs, n, err, a12Count(tr.seen(), "SET LOCAL deadlock_timeout"))
		// a new call within 2 s after the deadlock
		runs = 0
		err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: iso}, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			var err error
			n, err = body(ctx, tx)
			return err
		})
		t.Logf("sqlretry %v new call after deadlock: runs=%d n=%d err=%v SET LOCAL sent %d", iso, runs, n, err, a12Count(tr.seen(), "SET LOCAL deadlock_timeout"))
	}
}

func TestAttack13DSNSettings(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK13_ALL") == "" {
		t.Skip("observations of a hostile tester's (they held); SQLRETRY_ATTACK13_ALL=1 to run")
	}
	d := need(t, "pgx")
	ctx := a12Ctx(t, 25*time.Second)
	add := func(kv ...string) string {
		u, err := url.Parse(d)
		if err != nil {
			t.Fatal(err)
		}
		q := u.Query()
		for i := 0; i < len(kv); i += 2 {
			q.Set(kv[i], kv[i+1])
		}
		u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
		return u.String()
	}
	for _, tc := range []struct{ name, dsn string }{
		{"base", d},
		{"DateStyle German, IntervalStyle iso_8601", add("DateStyle", "German, DMY", "IntervalStyle", "iso_8601")},
		{"IntervalStyle sql_standard", add("IntervalStyle", "sql_standard")},
		{"lc_messages de_DE / C", add("lc_messages", "C")},
		{"simple_protocol", add("default_query_exec_mode", "simple_protocol")},
		{"simple_protocol + session dt 15ms", add("default_query_exec_mode", "simple_protocol", "options", "-c deadlock_timeout=15ms")},
		{"session dt 15ms (as ALTER ROLE)", add("options", "-c deadlock_timeout=15ms")},
		{"session dt 20ms", add("options", "-c deadlock_timeout=20ms")},
		{"session dt 21ms", add("options", "-c deadlock_timeout=21ms")},
		{"session dt 1min", add("options", "-c deadlock_timeout=1min")},
		{"session dt 1500 (ms no unit)", add("options", "-c deadlock_timeout=1500")},
		{"session dt 1.5s", add("options", "-c deadlock_timeout=1.5s")},
		{"session dt 0.5ms rounds", add("options", "-c deadlock_timeout=500us")},
		{"cache_describe", add("default_query_exec_mode", "cache_describe")},
		{"exec", add("default_query_exec_mode", "exec")},
	} {
		tr := &a12Tracer{}
		cfg, err := pgx.ParseConfig(tc.dsn)
		if err != nil {
			t.Logf("%s: parse %v", tc.name, err)
			continue
		}
		cfg.Tracer = tr
		db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
		db.SetMaxOpenConns(1)
		var before, in, after string
		db.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&before)
		runs, err := a12Replay(ctx, db, func(ctx context.Context, tx *sql.Tx) error {
			return tx.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&in)
		})
		db.QueryRowContext(ctx, "SHOW deadlock_timeout").Scan(&after)
		var sets []string
		for _, q := range tr.seen() {
			if strings.Contains(q, "deadlock_timeout") {
				sets = append(sets, q)
			}
		}
		t.Logf("%s: before=%s in=%s after=%s runs=%d err=%v stmts=%q", tc.name, before, in, after, runs, err, sets)
		db.Close()
	}
}

func a13Run(t *testing.T, db *sql.DB, h *commitHook, body func(ctx context.Context, tx *sql.Tx) error) (calls int, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			h.armed.Store(true)
		}
		return body(ctx, tx)
	})
	h.armed.Store(false)
	return calls, err
}

// DEFECT found: with wal_level=logical, a lost COMMIT followed by a crash
// restart is reported as ErrAmbiguousCommit (the transaction committed)
// when a savepoint whose subtransaction had no xid of its own is open at
// COMMIT; with wal_level=replica (A13_REPLICA=1) every shape resolves.
func TestAttack13LostCommitSavepointAndDecoding(t *testing.T) {
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	logical := os.Getenv("A13_REPLICA") == ""
	if logical {
		mustExec(t, plain, "ALTER SYSTEM SET wal_level = logical", "ALTER SYSTEM SET max_replication_slots = 4")
	}
	if err := srv.Crash(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	var wl string
	waitOK := time.Now().Add(10 * time.Second)
	for plain.QueryRow("SHOW wal_level").Scan(&wl) != nil && time.Now().Before(waitOK) {
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("wal_level %s", wl)
	if logical {
		mustExec(t, plain, "SELECT pg_create_logical_replication_slot('a13', 'test_decoding')")
	}
	mustExec(t, plain, "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
	var startLSN string
	plain.QueryRow("SELECT pg_current_wal_lsn()::text").Scan(&startLSN)
	h := &commitHook{}
	db := openHooked(t, h, srv.DSN)
	tbl := "a13ledger"
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	warmUp(t, db, tbl)
	ins := func(ctx context.Context, tx *sql.Tx, op string) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
		return err
	}
	ex := func(ctx context.Context, tx *sql.Tx, q string) error {
		_, err := tx.ExecContext(ctx, q)
		return err
	}
	cases := []struct {
		name string
		body func(op string) func(ctx context.Context, tx *sql.Tx) error
		want int
	}{
		{"no savepoint", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error { return ins(ctx, tx, op) }
		}, 1},
		{"top write + open savepoint with write", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				return ins(ctx, tx, op+"-sp")
			}
		}, 2},
		{"only write inside an open savepoint (two levels)", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s2"); err != nil {
					return err
				}
				return ins(ctx, tx, op)
			}
		}, 1},
		{"write in savepoint, rolled back to, then new savepoint open (no write)", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ins(ctx, tx, op+"-gone"); err != nil {
					return err
				}
				if err := ex(ctx, tx, "ROLLBACK TO SAVEPOINT s1"); err != nil {
					return err
				}
				return ex(ctx, tx, "SAVEPOINT s3")
			}
		}, 1},
		{"write in savepoint, rolled back to, released, no savepoint open", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ins(ctx, tx, op+"-gone"); err != nil {
					return err
				}
				if err := ex(ctx, tx, "ROLLBACK TO SAVEPOINT s1"); err != nil {
					return err
				}
				return ex(ctx, tx, "RELEASE SAVEPOINT s1")
			}
		}, 1},
		{"write in savepoint, rolled back to, s1 still open", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ins(ctx, tx, op+"-gone"); err != nil {
					return err
				}
				return ex(ctx, tx, "ROLLBACK TO SAVEPOINT s1")
			}
		}, 1},
		{"savepoint without write rolled back to, new savepoint open", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ex(ctx, tx, "ROLLBACK TO SAVEPOINT s1"); err != nil {
					return err
				}
				return ex(ctx, tx, "SAVEPOINT s3")
			}
		}, 1},
		{"top write, savepoint with write released (committed subxact), new open", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ins(ctx, tx, op); err != nil {
					return err
				}
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				if err := ins(ctx, tx, op+"-sp"); err != nil {
					return err
				}
				if err := ex(ctx, tx, "RELEASE SAVEPOINT s1"); err != nil {
					return err
				}
				return ex(ctx, tx, "SAVEPOINT s3")
			}
		}, 2},
		{"NOTIFY only inside open savepoint", func(op string) func(ctx context.Context, tx *sql.Tx) error {
			return func(ctx context.Context, tx *sql.Tx) error {
				if err := ex(ctx, tx, "SAVEPOINT s1"); err != nil {
					return err
				}
				return ex(ctx, tx, "NOTIFY a13")
			}
		}, 0},
	}
	for _, crash := range a13Modes {
		for i, tc := range cases {
			op := fmt.Sprintf("op-%v-%d-%d", crash, i, time.Now().UnixNano())
			h.fired.Store(0)
			h.after = func() {
				if tc.want > 0 {
					waitRow(t, plain, tc.want, "SELECT count(*) FROM "+tbl+" WHERE op LIKE $1", op+"%")
				} else {
					time.Sleep(300 * time.Millisecond)
				}
				if crash {
					if err := srv.Crash(); err != nil {
						t.Error(err)
					}
					if err := srv.Resume(); err != nil {
						t.Error(err)
					}
				}
			}
			calls, err := a13Run(t, db, h, tc.body(op))
			var n int
			for k := 0; k < 100; k++ {
				if plain.QueryRow("SELECT count(*) FROM "+tbl+" WHERE op LIKE $1", op+"%").Scan(&n) == nil {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			t.Logf("crash=%v %s: fired=%d calls=%d err=%v rows=%d want %d", crash, tc.name, h.fired.Load(), calls, err, n, tc.want)
			if err != nil || calls != 1 || n != tc.want {
				t.Errorf("crash=%v %s: calls=%d err=%v rows=%d", crash, tc.name, calls, err, n)
			}
		}
	}
	if wr, err := plain.Query("SELECT xid::text, start_lsn::text, end_lsn::text, record_length, coalesce(description,'') FROM pg_get_wal_records_info($1::pg_lsn, pg_current_wal_lsn()) WHERE resource_manager = 'LogicalMessage' OR (resource_manager = 'Transaction' AND record_type LIKE 'COMMIT%')", startLSN); err != nil {
		t.Log(err)
	} else {
		for wr.Next() {
			var x, a, b, dsc string
			var l int
			wr.Scan(&x, &a, &b, &l, &dsc)
			t.Logf("WAL xid=%s %s..%s len=%d %s", x, a, b, l, dsc)
		}
		wr.Close()
	}
	if !logical {
		return
	}
	rows, err := plain.Query("SELECT xid::text, data FROM pg_logical_slot_peek_changes('a13', NULL, NULL) ")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var lines []string
	for rows.Next() {
		var x, dd string
		rows.Scan(&x, &dd)
		lines = append(lines, x+" "+dd)
	}
	if len(lines) > 0 {
		t.Logf("decoding (%d lines)", len(lines))
	}
	mustExec(t, plain, "SELECT pg_drop_replication_slot('a13')")
}

var a13Modes = []bool{false, true}
