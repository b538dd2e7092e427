package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sqlretry/sqlretry"
)

// Issue 9, items 5 and 6, on the real servers: what a healthy server
// answered for a statement is that statement's error; read-only is the
// user's (permanent) unless the server is a standby or fenced (discard the
// connection, go elsewhere).

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func myNumber(err error) uint16 {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return me.Number
	}
	return 0
}

func retryStats(t *testing.T, db *sql.DB) sqlretry.Stats {
	t.Helper()
	s, ok := sqlretry.StatsOf(db)
	if !ok {
		t.Fatal("not a sqlretry db")
	}
	return s
}

// othersServed: the breaker is closed and another caller's SELECT 1 works.
func othersServed(t *testing.T, db *sql.DB) {
	t.Helper()
	if s := retryStats(t, db); s.Breaker != sqlretry.BreakerClosed {
		t.Errorf("breaker %v, want closed", s.Breaker)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var one int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Errorf("another caller's SELECT 1: %v", err)
	}
}

func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// Errors a healthy PostgreSQL answered for a statement: out of shared
// memory (53200), temp_file_limit (53400), dblink to a remote that is down
// (08001). Each costs one attempt, keeps its SQLSTATE, throws no
// connection away and leaves the breaker closed.
func TestClassifyPGServerAnswersAreTheStatements(t *testing.T) {
	d := needPrivate(t, "pgx")
	admin, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE EXTENSION IF NOT EXISTS dblink"); err != nil {
		t.Logf("no dblink: %v", err)
	}
	for _, tc := range []struct {
		name, code, dsnParams, query string
	}{
		// The shared lock table holds max_locks_per_transaction *
		// max_connections (64 * 200 here) entries.
		{"out of shared memory", "53200", "", "SELECT count(pg_advisory_xact_lock(i)) FROM generate_series(1, 100000) i"},
		{"temp_file_limit", "53400", "&temp_file_limit=256&work_mem=64",
			"SELECT count(*) FROM (SELECT g FROM generate_series(1, 1000000) g ORDER BY g DESC) s"},
		{"dblink to a remote that is down", "08001", "",
			fmt.Sprintf("SELECT * FROM dblink('host=127.0.0.1 port=%d dbname=postgres user=postgres connect_timeout=2', 'SELECT 1') AS t(a int)", closedPort(t))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, err := sqlretry.Open("pgx", d+tc.dsnParams)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			db.SetMaxIdleConns(4)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			start := time.Now()
			const n = 12
			for i := range n {
				_, err := db.QueryContext(ctx, tc.query)
				if pgCode(err) != tc.code {
					t.Fatalf("query %d: %v, want SQLSTATE %s", i, err, tc.code)
				}
				if errors.Is(err, sqlretry.ErrCircuitOpen) || strings.Contains(err.Error(), "bad connection") {
					t.Fatalf("query %d: %v: the server's answer was taken for unavailability", i, err)
				}
				_, err = db.ExecContext(ctx, tc.query)
				if pgCode(err) != tc.code {
					t.Fatalf("exec %d: %v, want SQLSTATE %s", i, err, tc.code)
				}
				runs := 0
				err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					runs++
					_, err := tx.ExecContext(ctx, tc.query)
					return err
				})
				if runs != 1 || pgCode(err) != tc.code {
					t.Fatalf("RunInTx %d: %d runs, %v; want 1 run and SQLSTATE %s", i, runs, err, tc.code)
				}
			}
			s := retryStats(t, db)
			t.Logf("%d calls in %v; stats %+v", 3*n, time.Since(start), s)
			if s.HandOffs != 0 || s.RetriesConnection != 0 || s.RetriesTransaction != 0 || s.Dials > 2 {
				t.Errorf("hand-offs %d, connection retries %d, replays %d, dials %d: the healthy connection was thrown away or the call replayed",
					s.HandOffs, s.RetriesConnection, s.RetriesTransaction, s.Dials)
			}
			othersServed(t, db)
		})
	}
}

// A write in a read-only transaction or session the user asked for:
// permanent, one attempt, never run on another connection, the breaker
// still closed (PostgreSQL and MariaDB).
func TestClassifyUsersReadOnlyIsPermanent(t *testing.T) {
	for _, engine := range []struct {
		driver, readOnlySession, readWriteSession, create string
		isReadOnly                                        func(error) bool
	}{
		{"pgx", "SET default_transaction_read_only = on", "SET default_transaction_read_only = off", "CREATE TABLE %s (n int)",
			func(err error) bool { return pgCode(err) == "25006" }},
		{"mysql", "SET SESSION TRANSACTION READ ONLY", "SET SESSION TRANSACTION READ WRITE", "CREATE TABLE %s (n int) ENGINE=InnoDB",
			func(err error) bool { return myNumber(err) == 1792 }},
	} {
		t.Run(engine.driver, func(t *testing.T) {
			d := need(t, engine.driver)
			admin, err := sql.Open(engine.driver, d)
			if err != nil {
				t.Fatal(err)
			}
			defer admin.Close()
			tbl := table(t, admin, "cls_ro")
			mustExec(t, admin, fmt.Sprintf(engine.create, tbl))
			insert := "INSERT INTO " + tbl + " VALUES (1)"
			rows := func() int {
				var n int
				if err := admin.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n
			}
			db, err := sqlretry.Open(engine.driver, d)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			// A transaction the caller declared read-only.
			start := time.Now()
			runs := 0
			err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{ReadOnly: true}, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				_, err := tx.ExecContext(ctx, insert)
				return err
			})
			if runs != 1 || !engine.isReadOnly(err) {
				t.Errorf("read-only transaction: %d runs, %v; want 1 run and the read-only error", runs, err)
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Errorf("read-only transaction took %v", el)
			}

			// A session the user made read-only (go-sql-driver/mysql's
			// TestRejectReadOnly does this): one connection, so every call
			// below is on that session.
			db.SetMaxOpenConns(1)
			mustExec(t, db, engine.readOnlySession)
			if _, err := db.ExecContext(ctx, insert); !engine.isReadOnly(err) {
				t.Errorf("autocommit write in a read-only session: %v; want the read-only error", err)
			}
			runs = 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				_, err := tx.ExecContext(ctx, insert)
				return err
			})
			if runs != 1 || !engine.isReadOnly(err) {
				t.Errorf("transaction in a read-only session: %d runs, %v; want 1 run and the read-only error", runs, err)
			}
			if n := rows(); n != 0 {
				t.Errorf("%d rows written: the user's read-only setting was bypassed", n)
			}
			s := retryStats(t, db)
			if s.HandOffs != 0 || s.RetriesTransaction != 0 || s.Dials != 1 {
				t.Errorf("hand-offs %d, replays %d, dials %d; want 0, 0, 1", s.HandOffs, s.RetriesTransaction, s.Dials)
			}
			othersServed(t, db)
			mustExec(t, db, engine.readWriteSession)
			mustExec(t, db, insert)
		})
	}
}

// PostgreSQL: read-only asked for in the DSN (a startup parameter, source
// "client") is the user's too.
func TestClassifyPGReadOnlyFromTheDSNIsPermanent(t *testing.T) {
	d := need(t, "pgx")
	admin, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	tbl := table(t, admin, "cls_rodsn")
	mustExec(t, admin, "CREATE TABLE "+tbl+" (n int)")
	sep := "?"
	if strings.Contains(d, "?") {
		sep = "&"
	}
	db, err := sqlretry.Open("pgx", d+sep+"default_transaction_read_only=on")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := db.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)"); pgCode(err) != "25006" {
		t.Errorf("write with default_transaction_read_only=on in the DSN: %v; want 25006", err)
	}
	runs := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)")
		return err
	})
	if runs != 1 || pgCode(err) != "25006" {
		t.Errorf("RunInTx: %d runs, %v; want 1 run and 25006", runs, err)
	}
	if s := retryStats(t, db); s.HandOffs != 0 || s.RetriesTransaction != 0 || s.Dials != 1 {
		t.Errorf("hand-offs %d, replays %d, dials %d; want 0, 0, 1", s.HandOffs, s.RetriesTransaction, s.Dials)
	}
	othersServed(t, db)
}

func pgBinDir(t *testing.T) string {
	t.Helper()
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if dir := strings.TrimSpace(string(out)); fileExists(filepath.Join(dir, "pg_basebackup")) {
			return dir
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(dirs) - 1; i >= 0; i-- {
		if fileExists(filepath.Join(dirs[i], "pg_basebackup")) {
			return dirs[i]
		}
	}
	unavailable(t, "no pg_basebackup")
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func asPostgres(name string, args ...string) *exec.Cmd {
	if os.Geteuid() == 0 {
		return exec.Command("runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	}
	return exec.Command(name, args...)
}

func dsnPort(t *testing.T, d string) int {
	t.Helper()
	u, err := url.Parse(d)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// startStandby makes a streaming standby of the private primary on
// primaryPort (pg_basebackup -R) and starts it; it returns its port and a
// function that promotes it.
func startStandby(t *testing.T, primaryPort int) (int, func() error) {
	t.Helper()
	bin := pgBinDir(t)
	dir, err := os.MkdirTemp("", "sqlretry-standby-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", "postgres:postgres", dir).CombinedOutput(); err != nil {
			t.Fatalf("chown: %v: %s", err, out)
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := asPostgres(filepath.Join(bin, "pg_basebackup"), "-h", "127.0.0.1", "-p", strconv.Itoa(primaryPort), "-U", "postgres",
		"-D", data, "-R", "-X", "stream", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("pg_basebackup: %v: %s", err, out)
	}
	port := closedPort(t)
	pgctl := func(args ...string) error {
		out, err := asPostgres(filepath.Join(bin, "pg_ctl"), append([]string{"-D", data}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("pg_ctl %v: %v: %s", args, err, out)
		}
		return nil
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", port, dir)
	if err := pgctl("-w", "-l", filepath.Join(dir, "log"), "-o", opts, "start"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pgctl("-m", "immediate", "stop") })
	return port, func() error { return pgctl("-w", "promote") }
}

// A write through sqlretry on a real standby is recognised as the wrong
// server: the connection is discarded and the call handed off (here every
// connection lands on the standby again, so database/sql's few re-runs end
// with an error that says so), reads go on, the breaker stays closed.
// After a failover (the standby promoted, the old primary fenced with
// default_transaction_read_only in its configuration) a multi-host pgx DSN
// with target_session_attrs=read-write lands the next attempt on the new
// primary, in autocommit and in RunInTx.
func TestClassifyPGStandby(t *testing.T) {
	primary := ownServer(t, "pgx")
	pPort := dsnPort(t, primary.DSN)
	admin, err := sql.Open("pgx", primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	mustExec(t, admin, "CREATE TABLE cls_standby (n int)")
	sPort, promote := startStandby(t, pPort)
	standbyDSN := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", sPort)
	sadmin, err := sql.Open("pgx", standbyDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer sadmin.Close()
	count := func(db *sql.DB, n int) int {
		var c int
		if err := db.QueryRow("SELECT COUNT(*) FROM cls_standby WHERE n = $1", n).Scan(&c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("single host: the standby is recognised", func(t *testing.T) {
		db, err := sqlretry.Open("pgx", standbyDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		_, err = db.ExecContext(ctx, "INSERT INTO cls_standby VALUES (1)")
		if pgCode(err) != "25006" || !strings.Contains(err.Error(), "standby") {
			t.Errorf("write on a standby: %v; want 25006 recognised as a standby", err)
		}
		s := retryStats(t, db)
		if s.HandOffs == 0 || s.HandOffs > 3 || s.Dials < 2 {
			t.Errorf("hand-offs %d, dials %d: want the connection discarded and the call handed off (database/sql re-runs it at most 3 times)", s.HandOffs, s.Dials)
		}
		othersServed(t, db)
	})

	t.Run("failover: lands on the new primary", func(t *testing.T) {
		multi := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write", pPort, sPort)
		// Two dbs, each with two pooled connections on the old primary: one
		// for an autocommit write, one for RunInTx.
		open := func() *sql.DB {
			db, err := sqlretry.Open("pgx", multi)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			db.SetMaxIdleConns(4)
			c1, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			c2, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []*sql.Conn{c1, c2} {
				var port int
				if err := c.QueryRowContext(ctx, "SELECT current_setting('port')::int").Scan(&port); err != nil || port != pPort {
					t.Fatalf("pooled connection on port %d (%v), want the primary's %d", port, err, pPort)
				}
				c.Close()
			}
			return db
		}
		db, dbTx := open(), open()
		if err := promote(); err != nil {
			t.Fatal(err)
		}
		mustExec(t, admin, "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()")
		time.Sleep(200 * time.Millisecond) // the sessions take the reload at their next command

		if _, err := db.ExecContext(ctx, "INSERT INTO cls_standby VALUES (2)"); err != nil {
			t.Fatalf("autocommit write after the failover: %v", err)
		}
		runs := 0
		err = sqlretry.RunInTx(ctx, dbTx, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			_, err := tx.ExecContext(ctx, "INSERT INTO cls_standby VALUES (3)")
			return err
		})
		if err != nil || runs < 2 {
			t.Fatalf("RunInTx after the failover: %d runs, %v; want a replay on the new primary", runs, err)
		}
		t.Logf("RunInTx ran %d times; stats %+v", runs, retryStats(t, dbTx))
		if count(sadmin, 2) != 1 || count(sadmin, 3) != 1 {
			t.Errorf("new primary has rows 2: %d, 3: %d; want 1 each", count(sadmin, 2), count(sadmin, 3))
		}
		if count(admin, 2) != 0 || count(admin, 3) != 0 {
			t.Error("the fenced old primary took a write")
		}
		othersServed(t, db)
		othersServed(t, dbTx)
	})
}

// A MariaDB server made read-only (read_only, as --read-only sets it) is
// the wrong server: 1290 is a hand-off, not permanent; once it is
// writable again the same db writes.
func TestClassifyMariaDBReadOnlyServer(t *testing.T) {
	srv := ownServer(t, "mysql")
	root, err := sql.Open("mysql", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	// root holds READ_ONLY ADMIN and may write on a read-only server.
	mustExec(t, root, "CREATE TABLE cls_rosrv (n int) ENGINE=InnoDB", "CREATE USER app@'%'", "GRANT ALL ON test.* TO app@'%'",
		"SET GLOBAL read_only = ON")
	appDSN := strings.Replace(srv.DSN, "root@", "app@", 1)
	db, err := sqlretry.Open("mysql", appDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = db.ExecContext(ctx, "INSERT INTO cls_rosrv VALUES (1)")
	if myNumber(err) != 1290 || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("write on a read-only server: %v; want 1290", err)
	}
	s := retryStats(t, db)
	if s.HandOffs == 0 || s.HandOffs > 3 || s.Dials < 2 {
		t.Errorf("hand-offs %d, dials %d: want the connection discarded and the call handed off", s.HandOffs, s.Dials)
	}
	othersServed(t, db)

	// rejectReadOnly=true: the driver itself turns 1290 into
	// driver.ErrBadConn (what that option is for); still a hand-off.
	rdb, err := sqlretry.Open("mysql", appDSN+"?rejectReadOnly=true")
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	_, err = rdb.ExecContext(ctx, "INSERT INTO cls_rosrv VALUES (1)")
	if rs := retryStats(t, rdb); err == nil || rs.HandOffs == 0 || rs.Dials < 2 {
		t.Errorf("rejectReadOnly=true on a read-only server: %v, %d hand-offs, %d dials; want hand-offs", err, rs.HandOffs, rs.Dials)
	}
	othersServed(t, rdb)

	mustExec(t, root, "SET GLOBAL read_only = OFF")
	if _, err := db.ExecContext(ctx, "INSERT INTO cls_rosrv VALUES (2)"); err != nil {
		t.Errorf("after the server became writable: %v", err)
	}
}

// A pinned *sql.Conn whose PostgreSQL session was terminated: the caller
// is told what happened; a prepared INSERT after that (the driver knows
// the connection is closed and sends nothing) is not ambiguous.
func TestClassifyPinnedConnTerminated(t *testing.T) {
	d := needPrivate(t, "pgx")
	admin, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	tbl := table(t, admin, "cls_pinned")
	mustExec(t, admin, "CREATE TABLE "+tbl+" (n int)")
	db, err := sqlretry.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	pinned := func() (*sql.Conn, *sql.Stmt) {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		var pid int
		if err := c.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			t.Fatal(err)
		}
		st, err := c.PrepareContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		mustExec(t, admin, fmt.Sprintf("SELECT pg_terminate_backend(%d)", pid))
		time.Sleep(100 * time.Millisecond)
		return c, st
	}

	c, _ := pinned()
	_, err = c.QueryContext(ctx, "SELECT n FROM "+tbl)
	t.Logf("read: %v", err)
	if err == nil || !strings.Contains(err.Error(), "connection was lost") || !strings.Contains(err.Error(), "pinned *sql.Conn") ||
		pgCode(err) != "57P01" {
		t.Errorf("read on a terminated pinned connection: %v; want what happened and the server's error", err)
	}

	// A write: the first error after the termination may follow a write
	// that was sent (ambiguous); the next call the driver refuses before
	// sending anything.
	c, st := pinned()
	_, err = c.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (0)")
	t.Logf("first write: %v", err)
	_, err = st.ExecContext(ctx, 1)
	t.Logf("prepared INSERT: %v", err)
	if errors.Is(err, sqlretry.ErrAmbiguousCommit) || err == nil || !strings.Contains(err.Error(), "nothing was sent") {
		t.Errorf("prepared INSERT on a connection known lost: %v; want \"nothing was sent\", not ambiguous", err)
	}
	var n int
	admin.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE n = 1").Scan(&n)
	if n != 0 {
		t.Errorf("%d rows", n)
	}
}
