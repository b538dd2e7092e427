package integration

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// Issue 15: the resolution of lost COMMITs, checked on the real servers.
// Each test cuts a COMMIT after it was sent (the server commits, the reply
// is lost) unless it says otherwise.

// settledCutter cuts a connection 100 ms after a PostgreSQL COMMIT was
// written: the server has committed by then, and its reply is never
// delivered. (Closing at once, while a reply is unread, makes the kernel
// reset the connection, and the server may then drop the COMMIT unread: a
// test that needs "it committed" would sometimes get "it did not".)
type settledCutter struct {
	armed atomic.Bool
	fired atomic.Int32
	delay time.Duration // instead of cutting, deliver the reply this late
	// dropCancels loses pgx's cancel requests (it sends one when a
	// connection breaks) as a real network cut would: the old backend's
	// COMMIT then runs to its end instead of being cancelled midway.
	dropCancels bool
}

// pgCancelRequest: a CancelRequest message (length 16, code 80877102).
func pgCancelRequest(p []byte) bool {
	return len(p) == 16 && binary.BigEndian.Uint32(p) == 16 && binary.BigEndian.Uint32(p[4:]) == 80877102
}

func (c *settledCutter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &settledConn{Conn: conn, c: c, closed: make(chan struct{})}, nil
}

type settledConn struct {
	net.Conn
	c       *settledCutter
	cutting atomic.Bool
	delayed atomic.Bool
	closed  chan struct{}
}

func (sc *settledConn) Write(p []byte) (int, error) {
	if sc.c.dropCancels && pgCancelRequest(p) {
		sc.Conn.Close() // pgx's read of the answer ends at once
		return len(p), nil
	}
	if sc.c.delay > 0 && pgCommit(p) && sc.c.armed.Swap(false) {
		sc.c.fired.Add(1)
		sc.delayed.Store(true)
		return sc.Conn.Write(p)
	}
	if pgCommit(p) && sc.c.armed.Swap(false) {
		sc.cutting.Store(true) // from now on nothing is read: pgx reads in the background while it writes
		n, err := sc.Conn.Write(p)
		time.Sleep(100 * time.Millisecond)
		sc.c.fired.Add(1)
		sc.Conn.Close()
		close(sc.closed)
		return n, err
	}
	return sc.Conn.Write(p)
}

func (sc *settledConn) Read(p []byte) (int, error) {
	if sc.delayed.Swap(false) {
		time.Sleep(sc.c.delay) // pgx's deadline on the socket, if it came meanwhile, ends the Read below
	}
	if !sc.cutting.Load() {
		n, err := sc.Conn.Read(p)
		if !sc.cutting.Load() {
			return n, err
		}
	}
	<-sc.closed
	return 0, net.ErrClosed
}

var pgRemoteOnce sync.Once

// pgRemote prepares, once per private server, a database "remote" with a
// table rt, reached through postgres_fdw (foreign table ft) and dblink.
func pgRemote(t *testing.T, dsn string) (connstr string) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	connstr = fmt.Sprintf("host=127.0.0.1 port=%d dbname=remote user=%s", cfg.Port, cfg.User)
	var setupErr error
	pgRemoteOnce.Do(func() {
		admin, err := sql.Open("pgx", dsn)
		if err != nil {
			setupErr = err
			return
		}
		defer admin.Close()
		for _, q := range []string{
			"CREATE EXTENSION IF NOT EXISTS postgres_fdw",
			"CREATE EXTENSION IF NOT EXISTS dblink",
			"CREATE DATABASE remote",
			fmt.Sprintf("CREATE SERVER rem FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '%d', dbname 'remote')", cfg.Port),
			fmt.Sprintf("CREATE USER MAPPING FOR %s SERVER rem OPTIONS (user '%s')", cfg.User, cfg.User),
			"CREATE FOREIGN TABLE ft (op text) SERVER rem OPTIONS (table_name 'rt')",
			"CREATE SEQUENCE resolve_seq",
		} {
			if _, err := admin.Exec(q); err != nil {
				setupErr = fmt.Errorf("%s: %w", q, err)
				return
			}
		}
		remote, err := pgx.Connect(context.Background(), strings.Replace(dsn, "/postgres?", "/remote?", 1))
		if err != nil {
			setupErr = err
			return
		}
		defer remote.Close(context.Background())
		// A row whose op starts with "slow-" makes the remote COMMIT
		// take 1.5 s (a deferred trigger): the local backend is then
		// busy in its own COMMIT, waiting for the remote one, when
		// sqlretry asks about it.
		for _, q := range []string{
			"CREATE TABLE rt (op text)",
			`CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
				$$BEGIN IF NEW.op LIKE 'slow-%' THEN PERFORM pg_sleep(1.5); END IF; RETURN NULL; END$$`,
			"CREATE CONSTRAINT TRIGGER rt_slow AFTER INSERT ON rt DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
		} {
			if _, setupErr = remote.Exec(context.Background(), q); setupErr != nil {
				return
			}
		}
	})
	if setupErr != nil {
		unavailable(t, "postgres_fdw/dblink (Debian's postgresql-15 contrib): "+setupErr.Error())
	}
	return connstr
}

// Issue 15.1: writes that take no local transaction id (through
// postgres_fdw, NOTIFY, dblink_exec, nextval alone) and a search_path that
// shadows sqlretry's functions: each transaction committed; it must be
// resolved as committed and run once, not taken for "wrote nothing".
func TestPostgresLostCommitOfWritesWithoutALocalIDIsResolved(t *testing.T) {
	dsn := needPrivate(t, "pgx")
	remoteConn := pgRemote(t, dsn)
	// pgx's cancel request on the broken connection is lost too: arriving,
	// it would cancel a COMMIT still running (under load, or with a slow
	// remote) after postgres_fdw sent the remote COMMIT, and the local
	// abort would leave the remote row committed: a replay then writes it
	// twice, whatever anyone asks afterwards (README, "Writes outside the
	// transaction").
	c := &settledCutter{dropCancels: true}
	pcfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.DialFunc = c.dial
	var events []string
	var evMu sync.Mutex
	db := sqlretry.OpenDB(stdlib.GetConnector(*pcfg), sqlretry.WithObserver(sqlretry.ObserverFunc(func(_ context.Context, e sqlretry.Event) {
		evMu.Lock()
		events = append(events, fmt.Sprintf("%v %s outcome=%v reason=%q err=%v", e.Kind, e.Op, e.Outcome, e.Reason, e.Err))
		evMu.Unlock()
	})))
	defer db.Close()
	ctx := context.Background()
	remoteCount := func(op string) (n int) {
		if err := db.QueryRow("SELECT count(*) FROM ft WHERE op = $1", op).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	mustExec(t, db, `CREATE SCHEMA IF NOT EXISTS shadow`,
		`CREATE OR REPLACE FUNCTION shadow.txid_current_if_assigned() RETURNS bigint LANGUAGE sql AS 'SELECT NULL::bigint'`,
		`CREATE OR REPLACE FUNCTION shadow.txid_current() RETURNS bigint LANGUAGE sql AS 'SELECT 1::bigint'`)
	local := table(t, db, "resolve_local")
	mustExec(t, db, "CREATE TABLE "+local+" (op text)")

	listener, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(ctx)
	if _, err := listener.Exec(ctx, "LISTEN resolve_ch"); err != nil {
		t.Fatal(err)
	}
	notifications := func(op string) (n int) {
		for {
			wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			note, err := listener.WaitForNotification(wctx)
			cancel()
			if err != nil {
				return n
			}
			if note.Payload == op {
				n++
			}
		}
	}

	cases := []struct {
		name  string
		stmts func(op string) []string
		count func(op string) int // how often op took effect, -1: not countable
	}{
		{"postgres_fdw", func(op string) []string { return []string{"INSERT INTO ft VALUES ('" + op + "')"} }, remoteCount},
		// The old backend is still in its COMMIT (waiting 1.5 s for the
		// remote one) when sqlretry asks: ending it then would abort the
		// local transaction after postgres_fdw sent the remote COMMIT,
		// which goes through, and the replay would write the row twice.
		{"postgres_fdw, the old backend still in its COMMIT", func(op string) []string {
			return []string{"INSERT INTO ft VALUES ('slow-" + op + "')"}
		}, func(op string) int { return remoteCount("slow-" + op) }},
		{"NOTIFY", func(op string) []string { return []string{"NOTIFY resolve_ch, '" + op + "'"} }, notifications},
		{"pg_notify", func(op string) []string { return []string{"SELECT pg_notify('resolve_ch', '" + op + "')"} }, notifications},
		{"dblink_exec", func(op string) []string {
			return []string{"SELECT dblink_exec('" + remoteConn + "', 'INSERT INTO rt VALUES (''" + op + "'')')"}
		}, remoteCount},
		// The first nextval after 32 values are used up logs WAL and takes
		// an id; the others take none (warmed up below).
		{"nextval only", func(string) []string { return []string{"SELECT nextval('resolve_seq')"} }, nil},
		{"search_path shadows the functions", func(op string) []string {
			return []string{"SET LOCAL search_path = shadow, pg_catalog, public", "INSERT INTO " + local + " VALUES ('" + op + "')"}
		}, func(op string) (n int) {
			if err := db.QueryRow("SELECT count(*) FROM "+local+" WHERE op = $1", op).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		}},
	}
	mustExec(t, db, "SELECT nextval('resolve_seq')")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			op := fmt.Sprintf("op-%d", rand.Uint64())
			evMu.Lock()
			events = events[:0]
			evMu.Unlock()
			calls := 0
			rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			err := sqlretry.RunInTx(rctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				for _, q := range tc.stmts(op) {
					if _, err := tx.ExecContext(ctx, q); err != nil { // Exec: not taken for a read
						return err
					}
				}
				if calls == 1 {
					c.armed.Store(true)
				}
				return nil
			})
			c.armed.Store(false)
			if c.fired.Swap(0) == 0 {
				t.Fatal("the COMMIT was never cut: the test proved nothing")
			}
			n := -1
			if tc.count != nil {
				n = tc.count(op)
			}
			if err != nil || calls != 1 || n > 1 {
				evMu.Lock()
				defer evMu.Unlock()
				t.Fatalf("err=%v calls=%d effects=%d; want success, one run, one effect (it committed); sqlretry's events:\n%s", err, calls, n, strings.Join(events, "\n"))
			}
		})
	}
}

// Issue 9.4: a deadline that expires while COMMIT is in flight. The
// server commits at once but its reply is delayed 600 ms; the caller's
// deadline is 200 ms. The row committed; the caller must hear
// ErrAmbiguousCommit (and the deadline), never a plain failure.
func TestPostgresDeadlineDuringCommitIsAmbiguous(t *testing.T) {
	c := &settledCutter{delay: 600 * time.Millisecond}
	pcfg, err := pgx.ParseConfig(needPrivate(t, "pgx"))
	if err != nil {
		t.Fatal(err)
	}
	pcfg.DialFunc = c.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*pcfg))
	defer db.Close()
	tbl := table(t, db, "slow_reply")
	mustExec(t, db, "CREATE TABLE "+tbl+" (op text)")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('op-1')")
		c.armed.Store(true)
		return err
	})
	var rows int
	if qerr := db.QueryRow("SELECT count(*) FROM " + tbl).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
	if c.fired.Load() == 0 || rows != 1 {
		t.Fatalf("delayed=%d rows=%d: the test proved nothing", c.fired.Load(), rows)
	}
	if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || !errors.Is(err, context.DeadlineExceeded) || calls != 1 {
		t.Fatalf("err=%v calls=%d rows=%d; want ErrAmbiguousCommit and context.DeadlineExceeded after one run", err, calls, rows)
	}
}

// Issue 9.9: a burst of calls with tiny deadlines (0.2-3 ms) must not turn
// the resolution off: a later lost COMMIT that committed is still resolved.
func TestPostgresTinyDeadlinesKeepTheResolution(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	db := openCutPostgres(t, c)
	defer db.Close()
	tbl := table(t, db, "tiny")
	mustExec(t, db, "CREATE TABLE "+tbl+" (n int)")
	for i := range 400 {
		d := 200*time.Microsecond + time.Duration(i%30)*100*time.Microsecond
		ctx, cancel := context.WithTimeout(context.Background(), d)
		_ = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)")
			return err
		})
		cancel()
	}
	calls, n, err := lostCommit(t, db, c, cutAfterSend, "$1")
	if err != nil || calls != 1 || n != 1 {
		t.Fatalf("err=%v calls=%d rows=%d; want the lost COMMIT resolved as committed", err, calls, n)
	}
}

// openCutMariaDBAs is openCutMariaDB for another user and database ("" for
// none).
func openCutMariaDBAs(t *testing.T, user, dbName string, opts ...sqlretry.Option) *sql.DB {
	cfg, err := mysql.ParseDSN(needPrivate(t, "mysql"))
	if err != nil {
		t.Fatal(err)
	}
	openCutMariaDB(t).Close() // registers the cutting dialer
	cfg.Net, cfg.User, cfg.DBName = "cut", user, dbName
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return sqlretry.OpenDB(conn, opts...)
}

func mariaRoot(t *testing.T) *sql.DB {
	t.Helper()
	root, err := sql.Open("mysql", needPrivate(t, "mysql")+"?multiStatements=true")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return root
}

const markerTableDDL = `CREATE TABLE %s (
	token BINARY(16) NOT NULL PRIMARY KEY,
	created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	KEY (created_at)
) ENGINE=InnoDB`

// cutMariaDBCommit runs one RunInTx whose closure runs stmts and then
// inserts op into ledger (qualified), with COMMIT cut after it was sent.
func cutMariaDBCommit(t *testing.T, db *sql.DB, ledger string, stmts ...string) (calls, rows int, err error) {
	t.Helper()
	op := fmt.Sprintf("op-%d", rand.Uint64())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		for _, q := range stmts {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+ledger+" VALUES (?)", op); err != nil {
			return err
		}
		if calls == 1 {
			mysqlCutter.mode.Store(cutAfterSend)
		}
		return nil
	})
	mysqlCutter.mode.Store(0)
	if mysqlCutter.fired.Swap(0) == 0 && calls > 0 && err == nil {
		t.Fatal("the COMMIT was never cut: the test proved nothing")
	}
	if qerr := mariaRoot(t).QueryRow("SELECT COUNT(*) FROM "+ledger+" WHERE op = ?", op).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	return calls, rows, err
}

// Issue 15.2: the marker's place is fixed when the db is opened, whatever
// the session's current database: USE in the closure (into a database with
// or without a table of the marker's name) must not move it.
func TestMariaDBMarkerIsFixedAcrossUSE(t *testing.T) {
	root := mariaRoot(t)
	marker := fmt.Sprintf("m_%d", rand.Uint32())
	other := fmt.Sprintf("other_%d", rand.Uint32())
	mustExec(t, root, "CREATE DATABASE "+other, fmt.Sprintf(markerTableDDL, other+"."+marker),
		"CREATE TABLE test.ledger_use (op varchar(40) PRIMARY KEY)")
	t.Cleanup(func() { root.Exec("DROP DATABASE " + other); root.Exec("DROP TABLE test.ledger_use, test." + marker) })
	bare := fmt.Sprintf("bare_%d", rand.Uint32())
	mustExec(t, root, "CREATE DATABASE "+bare)
	t.Cleanup(func() { root.Exec("DROP DATABASE " + bare) })

	db := openCutMariaDBAs(t, "root", "test", sqlretry.WithMySQLCommitMarker(marker))
	defer db.Close()
	for _, into := range []string{other, bare} {
		t.Run("USE "+into, func(t *testing.T) {
			calls, rows, err := cutMariaDBCommit(t, db, "test.ledger_use", "USE "+into)
			if err != nil || calls != 1 || rows != 1 {
				t.Fatalf("err=%v calls=%d rows=%d; want success, one run, one row", err, calls, rows)
			}
		})
	}
}

// Issue 15.5: no default database and an unqualified marker: a
// configuration error at once that says what to do, never replays.
func TestMariaDBMarkerWithoutADatabaseIsAConfigurationError(t *testing.T) {
	root := mariaRoot(t)
	mustExec(t, root, "CREATE TABLE IF NOT EXISTS test.ledger_nodb (op varchar(40))")
	db := openCutMariaDBAs(t, "root", "", sqlretry.WithMySQLCommitMarker("m"))
	defer db.Close()
	calls := 0
	start := time.Now()
	err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO test.ledger_nodb VALUES ('x')")
		return err
	})
	took := time.Since(start)
	t.Logf("err=%v calls=%d took=%v", err, calls, took)
	if err == nil || calls != 1 || !strings.Contains(err.Error(), "WithMySQLCommitMarker") || took > time.Second {
		t.Fatalf("err=%v calls=%d took=%v; want a configuration error naming the fix, one run, at once", err, calls, took)
	}
}

// Issue 15.4 and its class: the privileges an application user may have on
// a marker table a DBA created. With SELECT, INSERT, UPDATE, DELETE and no
// CREATE (nor PROCESS, nor CONNECTION ADMIN) a lost COMMIT is resolved;
// without SELECT or DELETE, or with no table and no CREATE, every writing
// transaction fails at once with a configuration error, never replays.
func TestMariaDBMarkerPrivileges(t *testing.T) {
	root := mariaRoot(t)
	ledger := fmt.Sprintf("test.ledger_priv_%d", rand.Uint32())
	mustExec(t, root, "CREATE TABLE "+ledger+" (op varchar(40) PRIMARY KEY)")
	t.Cleanup(func() { root.Exec("DROP TABLE " + ledger) })
	cases := []struct {
		name     string
		create   bool   // the DBA created the table
		grants   string // on the marker table
		resolved bool
	}{
		{"SELECT INSERT UPDATE DELETE, no CREATE", true, "SELECT, INSERT, UPDATE, DELETE", true},
		{"no DELETE", true, "SELECT, INSERT, UPDATE", false},
		{"no SELECT", true, "INSERT, UPDATE, DELETE", false},
		{"no table, no CREATE", false, "", false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user, marker := fmt.Sprintf("app%d_%d", i, rand.Uint32()), fmt.Sprintf("m_%d", rand.Uint32())
			mustExec(t, root, "CREATE USER "+user+"@'%'", "GRANT SELECT, INSERT ON "+ledger+" TO "+user+"@'%'")
			t.Cleanup(func() { root.Exec("DROP USER " + user + "@'%'"); root.Exec("DROP TABLE IF EXISTS test." + marker) })
			if tc.create { // a grant on a table that does not exist would need CREATE
				mustExec(t, root, fmt.Sprintf(markerTableDDL, "test."+marker), "GRANT "+tc.grants+" ON test."+marker+" TO "+user+"@'%'")
			}
			db := openCutMariaDBAs(t, user, "test", sqlretry.WithMySQLCommitMarker(marker))
			defer db.Close()
			start := time.Now()
			calls, rows, err := cutMariaDBCommit(t, db, ledger)
			took := time.Since(start)
			t.Logf("err=%v calls=%d rows=%d took=%v", err, calls, rows, took)
			if tc.resolved {
				if err != nil || calls != 1 || rows != 1 {
					t.Fatalf("err=%v calls=%d rows=%d; want success, one run, one row", err, calls, rows)
				}
				return
			}
			var my *mysql.MySQLError
			if calls != 1 || rows != 0 || !errors.As(err, &my) || !strings.Contains(err.Error(), "grant") || took > 2*time.Second {
				t.Fatalf("err=%v calls=%d rows=%d took=%v; want a configuration error with the server's error, one run, at once", err, calls, rows, took)
			}
			if s, _ := sqlretry.StatsOf(db); s.RetriesTransaction != 0 || s.ContentionCuts != 0 {
				t.Errorf("stats %+v: a configuration error counted as contention", s)
			}
		})
	}
}

// Issue 15.6: a READ ONLY transaction, declared or made so by the session,
// needs no marker; a statement that is not a plain read must not make it
// write one (1792) and run 30 times.
func TestMariaDBReadOnlyTransactionsGetNoMarker(t *testing.T) {
	marker := fmt.Sprintf("m_%d", rand.Uint32())
	root := mariaRoot(t)
	t.Cleanup(func() { root.Exec("DROP TABLE IF EXISTS test." + marker) })
	run := func(t *testing.T, db *sql.DB, opts *sql.TxOptions) {
		for _, q := range []string{"SET @x := 1", "SELECT 1 FROM DUAL WHERE @x := 2"} {
			calls := 0
			err := sqlretry.RunInTx(context.Background(), db, opts, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, q)
				return err
			})
			if err != nil || calls != 1 {
				t.Fatalf("%s: err=%v calls=%d; want success in one run", q, err, calls)
			}
		}
	}
	t.Run("declared", func(t *testing.T) {
		db := openCutMariaDBAs(t, "root", "test", sqlretry.WithMySQLCommitMarker(marker))
		defer db.Close()
		run(t, db, &sql.TxOptions{ReadOnly: true})
	})
	t.Run("by the session", func(t *testing.T) {
		cfg, err := mysql.ParseDSN(needPrivate(t, "mysql"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Params = map[string]string{"tx_read_only": "1"}
		conn, err := mysql.NewConnector(cfg)
		if err != nil {
			t.Fatal(err)
		}
		db := sqlretry.OpenDB(conn, sqlretry.WithMySQLCommitMarker(marker))
		defer db.Close()
		run(t, db, nil)
	})
}

// Issue 15.7: the clean-up of old marker rows keeps the caller's deadline:
// another session holds a lock on an old marker row, and 300 commits (one
// clean-up) with a 1 s deadline each must each end within it.
func TestMariaDBMarkerCleanupKeepsTheDeadline(t *testing.T) {
	marker := fmt.Sprintf("m_%d", rand.Uint32())
	root := mariaRoot(t)
	mustExec(t, root, fmt.Sprintf(markerTableDDL, "test."+marker),
		"INSERT INTO test."+marker+" VALUES (UNHEX(MD5('old')), NOW(6) - INTERVAL 2 HOUR)",
		"CREATE TABLE IF NOT EXISTS test.ledger_clean (n int)")
	t.Cleanup(func() { root.Exec("DROP TABLE IF EXISTS test." + marker) })
	locker, err := root.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer locker.Close()
	if _, err := locker.ExecContext(context.Background(), "BEGIN"); err != nil {
		t.Fatal(err)
	}
	if _, err := locker.ExecContext(context.Background(), "SELECT * FROM test."+marker+" WHERE token = UNHEX(MD5('old')) FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	defer locker.ExecContext(context.Background(), "ROLLBACK")

	db := openCutMariaDBAs(t, "root", "test", sqlretry.WithMySQLCommitMarker(marker))
	defer db.Close()
	var slowest time.Duration
	for i := range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		start := time.Now()
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO test.ledger_clean VALUES (1)")
			return err
		})
		slowest = max(slowest, time.Since(start))
		cancel()
		if err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
	}
	t.Logf("slowest of 300 commits: %v", slowest)
	if slowest > 1100*time.Millisecond {
		t.Fatalf("slowest commit took %v with a 1 s deadline: the clean-up is on the caller's path", slowest)
	}
	// Once the lock is gone, a later round deletes the old row.
	if _, err := locker.ExecContext(context.Background(), "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	for range 256 {
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO test.ledger_clean VALUES (1)")
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	old := -1
	for i := 0; i < 50 && old != 0; i++ {
		time.Sleep(100 * time.Millisecond)
		if err := root.QueryRow("SELECT COUNT(*) FROM test." + marker + " WHERE created_at < NOW(6) - INTERVAL 1 HOUR").Scan(&old); err != nil {
			t.Fatal(err)
		}
	}
	if old != 0 {
		t.Fatalf("%d old marker rows left after the lock was released", old)
	}
}

// On a standby no transaction gets an id and none can commit anything (no
// writes, no NOTIFY): asking for an id must not fail there (txid_current
// does: "cannot execute pg_current_xact_id() during recovery"), and a lost
// COMMIT is replayed, not ambiguous. This guards the new way of asking for
// the id; the code before it passed too.
func TestPostgresStandbyTransactionsNeedNoID(t *testing.T) {
	primary, err := sql.Open("pgx", needPrivate(t, "pgx"))
	if err != nil {
		t.Fatal(err)
	}
	// pg_basebackup waits for a spread checkpoint: after the other tests'
	// writes that took two minutes. A forced one first leaves it nothing.
	mustExec(t, primary, "CHECKPOINT")
	primary.Close()
	port, _ := startStandby(t, dsnPort(t, needPrivate(t, "pgx"))) // classify_test.go
	dsn := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	c := &settledCutter{}
	pcfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.DialFunc = c.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*pcfg))
	defer db.Close()
	for _, cut := range []bool{false, true} {
		calls := 0
		err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			var inRecovery bool
			if err := tx.QueryRowContext(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil || !inRecovery {
				return fmt.Errorf("not a standby: %v", err)
			}
			_, err := tx.ExecContext(ctx, "SELECT pg_sleep(0)") // Exec: not provably a read
			c.armed.Store(cut && calls == 1)
			return err
		})
		c.armed.Store(false)
		want := 1
		if cut {
			want = 2
			if c.fired.Swap(0) == 0 {
				t.Fatal("the COMMIT was never cut: the test proved nothing")
			}
		}
		if err != nil || calls != want {
			t.Fatalf("cut=%v: err=%v calls=%d; want success after %d runs", cut, err, calls, want)
		}
	}
}
