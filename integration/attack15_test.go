package integration

// Hostile tests of sqlretry (attack15), written from the README and go doc
// only. Each Test below fails on the code it was written against and shows
// a promise broken; the probes that held are described in the report, not
// kept as tests.

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

// a15Gate is a net.Conn layer under the driver: once armed with a needle,
// the next write containing it goes through, and the connection's next read
// waits until the test releases it, then the socket is cut, so the
// statement runs on the server and its reply is lost.
type a15Gate struct {
	mu      sync.Mutex
	needle  []byte
	hit     chan struct{} // closed when the needle went out
	release chan struct{} // close to cut the held connection
}

func (g *a15Gate) arm(needle string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.needle = []byte(needle)
	g.hit = make(chan struct{})
	g.release = make(chan struct{})
}

func (g *a15Gate) disarm() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.needle = nil
}

type a15GateConn struct {
	net.Conn
	g    *a15Gate
	mu   sync.Mutex
	held chan struct{}
	cut  bool
}

func (c *a15GateConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	cut := c.cut
	c.mu.Unlock()
	if cut {
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.EPIPE)}
	}
	c.g.mu.Lock()
	var hit, rel chan struct{}
	if c.g.needle != nil && bytes.Contains(p, c.g.needle) {
		c.g.needle = nil
		hit, rel = c.g.hit, c.g.release
	}
	c.g.mu.Unlock()
	n, err := c.Conn.Write(p)
	if hit != nil {
		c.mu.Lock()
		c.held = rel
		c.mu.Unlock()
		close(hit)
	}
	return n, err
}

func (c *a15GateConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	held := c.held
	c.held = nil
	c.mu.Unlock()
	if held != nil {
		<-held
		c.mu.Lock()
		c.cut = true
		c.mu.Unlock()
		c.Conn.Close()
	}
	c.mu.Lock()
	cut := c.cut
	c.mu.Unlock()
	if cut {
		return 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	}
	return c.Conn.Read(p)
}

var (
	a15MyGate     = &a15Gate{}
	a15MyGateOnce sync.Once
)

// a15OpenMyGate opens sqlretry on the shared MariaDB through a15MyGate.
func a15OpenMyGate(t *testing.T, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	return a15OpenMyGateAs(t, "root", opts...)
}

// a15OpenMyGateAs is a15OpenMyGate for another user.
func a15OpenMyGateAs(t *testing.T, user string, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	a15MyGateOnce.Do(func() {
		mysql.RegisterDialContext("a15gate", func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			return &a15GateConn{Conn: nc, g: a15MyGate}, nil
		})
	})
	cfg, err := mysql.ParseDSN(user + "@a15gate(127.0.0.1:3306)/test?parseTime=true")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(conn, opts...)
	t.Cleanup(func() { db.Close() })
	return db
}

// TestAttack15MyTimestampMarkerCleanedThenReplayed: MariaDB's session
// variable `timestamp` (set by mysqlbinlog's output before every event, by
// data loads that replay history, by tests that pin "now") is what
// CURRENT_TIMESTAMP returns. The commit marker's created_at takes its
// default from it, so the marker of a transaction whose closure set
// `timestamp` to an hour or more ago is born "older than an hour", and
// sqlretry's own background clean-up (of this db, or of any other replica
// that shares the table) deletes it at its next round. A COMMIT that took
// effect and whose reply was lost is then looked up, finds no marker,
// counts as not committed, and RunInTx replays the closure: its write is
// committed twice and RunInTx returns nil. The plain driver's COMMIT
// would return an error for the lost reply and write the row once.
func TestAttack15MyTimestampMarkerCleanedThenReplayed(t *testing.T) {
	plain := atkPlain(t, "mysql")
	tbl := atkName("a15ts")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40))")
	db := a15OpenMyGate(t)
	// a first writing transaction, so that the marker table is checked and the clean-up scheduled
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('warm-up')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	tag := atkName("t")
	past := time.Now().Add(-2 * time.Hour).Unix()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	calls := 0
	done := make(chan error, 1)
	a15MyGate.arm("BEGIN NOT ATOMIC")
	hit, release := a15MyGate.hit, a15MyGate.release
	defer a15MyGate.disarm()
	go func() {
		done <- sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES (?)", tag); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, fmt.Sprintf("SET SESSION timestamp = %d", past))
			return err
		}, sqlretry.WithBackoff(sqlretry.Backoff{MaxElapsed: 10 * time.Minute})) // the COMMIT is held until a clean-up round ran
	}()
	select {
	case <-hit:
	case <-time.After(20 * time.Second):
		t.Fatal("the COMMIT never went out")
	}
	a15MyGate.disarm()
	// the block ran on the server: the row is committed, its marker dated two hours ago
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for start := time.Now(); !cond(); time.Sleep(100 * time.Millisecond) {
			if time.Since(start) > 150*time.Second {
				close(release)
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	waitFor("the row to commit", func() bool {
		return atkCount(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'") == 1
	})
	pastTS := time.Unix(past, 0).UTC().Format("2006-01-02 15:04:05")
	markers := func() int {
		return atkCount(t, plain, "SELECT COUNT(*) FROM sqlretry_commit_marker WHERE created_at BETWEEN CONVERT_TZ('"+pastTS+"', '+00:00', @@session.time_zone) - INTERVAL 1 SECOND AND CONVERT_TZ('"+pastTS+"', '+00:00', @@session.time_zone) + INTERVAL 1 SECOND")
	}
	t.Logf("committed; markers dated %s: %d", pastTS, markers())
	// keep this db busy on other connections, as an application would, until a clean-up round ran
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('other')")
				return err
			})
		}
	}()
	// a marker dated now (not by the session's timestamp) is not the clean-up's: do not wait for it
	if markers() != 0 {
		for start := time.Now(); markers() != 0 && time.Since(start) < 150*time.Second; time.Sleep(100 * time.Millisecond) {
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("markers dated %s left: %d; now the COMMIT's reply is lost", pastTS, markers())
	close(release)
	err := <-done
	rows := atkCount(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'")
	t.Logf("RunInTx: calls=%d err=%v (ErrAmbiguousCommit: %v); rows with the tag: %d", calls, err, errors.Is(err, sqlretry.ErrAmbiguousCommit), rows)
	if rows != 1 {
		t.Errorf("the transaction's write is in the table %d times (closure ran %d times, RunInTx returned %v); a committed transaction must not be replayed", rows, calls, err)
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
		t.Errorf("a committed transaction reported failed: %v", err)
	}
}

// TestAttack15MyResultCharsetFailsCommit: a closure may set the session's
// character_set_results (any charset MariaDB accepts there: utf16, utf32,
// ucs2, ...); it changes how the server sends result text, nothing about
// the COMMIT. sqlretry's own question before COMMIT (the process-list id
// of the session, asked on each new connection's first writing
// transaction) reads its answer as ASCII digits, fails to parse the UTF-16
// text, and RunInTx rolls the transaction back and returns a permanent
// error about a statement the caller never ran. The plain driver commits.
func TestAttack15MyResultCharsetFailsCommit(t *testing.T) {
	ctx := context.Background()
	for _, cs := range []string{"utf16", "utf32", "ucs2"} {
		for _, drv := range []string{"mysql", "sqlretry"} {
			t.Run(cs+"/"+drv, func(t *testing.T) {
				var db *sql.DB
				if drv == "mysql" {
					db = atkPlain(t, "mysql")
				} else {
					db = atkOpenMy(t)
				}
				tbl := atkName("a15cs")
				atkMust(t, db, "CREATE TABLE "+tbl+" (id int auto_increment primary key, v int)")
				db.SetMaxIdleConns(0) // every transaction on a new connection
				failed := 0
				var first error
				const n = 5
				for i := 0; i < n; i++ {
					fn := func(ctx context.Context, tx *sql.Tx) error {
						if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (v) VALUES (1)"); err != nil {
							return err
						}
						_, err := tx.ExecContext(ctx, "SET SESSION character_set_results = "+cs)
						return err
					}
					var err error
					if drv == "mysql" {
						tx, e := db.BeginTx(ctx, nil)
						if e != nil {
							t.Fatal(e)
						}
						if err = fn(ctx, tx); err == nil {
							err = tx.Commit()
						} else {
							tx.Rollback()
						}
					} else {
						err = sqlretry.RunInTx(ctx, db, nil, fn)
					}
					if err != nil {
						failed++
						if first == nil {
							first = err
						}
					}
				}
				rows := atkCount(t, db, "SELECT COUNT(*) FROM "+tbl)
				t.Logf("%s: %d of %d failed, %d rows; first error: %v", drv, failed, n, rows, first)
				if failed != 0 || rows != n {
					t.Errorf("%d of %d transactions failed (%d rows committed); the plain driver commits them all", failed, n, rows)
				}
			})
		}
	}
}

// TestAttack15MyKillQueryChainCommittedButError: a closure sets
// completion_type = 1 (CHAIN: every COMMIT opens the next transaction at
// once; a legitimate session setting, the plain COMMIT honours it). Another
// session's KILL QUERY that lands while sqlretry's marker block is in its
// COMMIT stops the block after the COMMIT took effect (1317). sqlretry then
// asks the session whether its transaction is still open: under CHAIN the
// COMMIT opened a new one, so the answer is yes, and the committed
// transaction is taken for one the kill stopped before its COMMIT:
// RunInTx returns the bare 1317 (not ErrAmbiguousCommit) and the row is
// committed. The plain driver, same closure, same kills at the same
// moments after the closure returns, never returned an error for a
// committed transaction (its COMMIT is one statement, not a block). About
// 1 transaction in 1,000 with kills spread over 0–1.2 ms; with
// completion_type = 0 none in 6,600. The same with autocommit = 0 (a
// closure that turns autocommit off for what the session does next; the
// transaction it is in goes on): about 1 in 3,000 (the question that asks
// the session reads the marker table, which under autocommit = 0 opens a
// transaction of its own, it seems).
func TestAttack15MyKillQueryChainCommittedButError(t *testing.T) {
	for _, setting := range []string{"SET SESSION completion_type = 1", "SET SESSION autocommit = 0"} {
		for _, drv := range []string{"mysql", "sqlretry"} {
			t.Run(setting[12:]+"/"+drv, func(t *testing.T) {
				var db *sql.DB
				if drv == "mysql" {
					db = atkPlain(t, "mysql")
				} else {
					db = a15OpenMyGate(t)
				}
				killer := atkPlain(t, "mysql")
				killer.SetMaxIdleConns(4)
				tbl := atkName("a15kq")
				atkMust(t, killer, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40))")
				// 150 s and 20 s in the hostile tester's runs; the suite
				// runs 15 s and 8 s (about 3,000 transactions through
				// sqlretry: at the 1 in 1,000 found before the fix, a
				// regression shows in most runs), and the longer runs
				// with SQLRETRY_ATTACK15_LONG=1.
				limit := 15 * time.Second
				if drv == "mysql" {
					limit = 8 * time.Second
				}
				if os.Getenv("SQLRETRY_ATTACK15_LONG") != "" {
					limit = 150 * time.Second
					if drv == "mysql" {
						limit = 20 * time.Second
					}
				}
				deadline := time.Now().Add(limit)
				n, failed := 0, 0
				for ; time.Now().Before(deadline); n++ {
					tag := atkName("t")
					kills := make(chan struct{})
					fn := func(ctx context.Context, tx *sql.Tx) error {
						if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES (?)", tag); err != nil {
							return err
						}
						var cid int64
						if err := tx.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&cid); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, setting); err != nil {
							return err
						}
						d := time.Duration(rand.IntN(1200)) * time.Microsecond
						go func() {
							defer close(kills)
							time.Sleep(d)
							killer.Exec(fmt.Sprintf("KILL QUERY %d", cid))
						}()
						return nil
					}
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					var err error
					if drv == "mysql" {
						tx, e := db.BeginTx(ctx, nil)
						if e != nil {
							cancel()
							t.Fatal(e)
						}
						if err = fn(ctx, tx); err == nil {
							err = tx.Commit()
						} else {
							tx.Rollback()
						}
					} else {
						err = sqlretry.RunInTx(ctx, db, nil, fn)
					}
					cancel()
					<-kills
					rows := atkCount(t, killer, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'")
					if err != nil {
						failed++
					}
					if err != nil && rows != 0 && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
						t.Fatalf("transaction %d: RunInTx returned %v (not ErrAmbiguousCommit) and its row is committed (%d)", n+1, err, rows)
					}
					if rows > 1 {
						t.Fatalf("transaction %d: its row is committed %d times (err %v)", n+1, rows, err)
					}
				}
				t.Logf("%s: %d transactions, %d returned an error, none reported failed while committed", drv, n, failed)
			})
		}
	}
}

// TestAttack15PgSavedAndRestoredSettingLeaksTheBound: a common helper
// pattern saves a setting, changes it for one piece of work and restores
// it: `SHOW lock_timeout` (or current_setting), `SET lock_timeout = ...`,
// the work, `SET lock_timeout = <saved>`. Inside a replay that sqlretry
// bounds, the value the closure saves is sqlretry's SET LOCAL bound
// ("20ms"), not the session's, and its session-level restore makes that
// bound the session's own: it outlives the transaction, and every later
// statement on that pooled connection (autocommit ones, other callers'
// transactions, unbounded attempts) runs with a 20 ms lock_timeout (or a
// 20 ms deadlock_timeout: short deadlock checks are on by default), where
// the plain driver's session is back to its value (0 / 1s). Shown here by
// SHOW on the same connection afterwards and by a later autocommit UPDATE
// that waits 300 ms for a row: the plain driver's waits and succeeds,
// sqlretry's fails with 55P03 (NoRetry, as a caller that does not want
// its write re-run would mark it).
func TestAttack15PgSavedAndRestoredSettingLeaksTheBound(t *testing.T) {
	for _, c := range []struct {
		setting, value string
		opts           []sqlretry.Option
	}{
		{"lock_timeout", "5s", []sqlretry.Option{sqlretry.WithShortLockWait(true)}},
		{"deadlock_timeout", "2s", nil},
	} {
		for _, drv := range []string{"pgx", "sqlretry"} {
			t.Run(c.setting+"/"+drv, func(t *testing.T) {
				var db *sql.DB
				if drv == "pgx" {
					db = atkPlain(t, "pgx")
				} else {
					db = atkOpenPG(t, nil, c.opts...)
				}
				db.SetMaxOpenConns(1) // the next statement runs on the same session
				tbl := atkName("a15rs")
				atkMust(t, db, "CREATE TABLE "+tbl+" (id int primary key, v int)", "INSERT INTO "+tbl+" VALUES (1, 0)")
				var before string
				if err := db.QueryRow("SHOW " + c.setting).Scan(&before); err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				runs := 0
				fn := func(ctx context.Context, tx *sql.Tx) error {
					runs++
					if drv == "sqlretry" && runs == 1 { // a conflict: the replay is bounded
						_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack15 conflict' USING ERRCODE = '40001'; END$$`)
						return err
					}
					var saved string
					if err := tx.QueryRowContext(ctx, "SELECT current_setting('"+c.setting+"')").Scan(&saved); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+c.value+"'"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SET "+c.setting+" = '"+saved+"'")
					return err
				}
				var err error
				if drv == "pgx" {
					tx, e := db.BeginTx(ctx, nil)
					if e != nil {
						t.Fatal(e)
					}
					if err = fn(ctx, tx); err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				} else {
					err = sqlretry.RunInTx(ctx, db, nil, fn)
				}
				if err != nil {
					t.Fatal(err)
				}
				var after string
				if err := db.QueryRow("SHOW " + c.setting).Scan(&after); err != nil {
					t.Fatal(err)
				}
				t.Logf("%s: session's %s before the transaction %q, after it %q", drv, c.setting, before, after)
				if after != before {
					t.Errorf("the session's %s is %q after the transaction, was %q: the closure restored what it read, sqlretry's bound", c.setting, after, before)
				}
				if c.setting == "lock_timeout" {
					done := a14HoldRow(t, "pgx", tbl, 1, 300*time.Millisecond)
					time.Sleep(50 * time.Millisecond)
					_, err := db.ExecContext(sqlretry.NoRetry(context.Background()), "UPDATE "+tbl+" SET v = v + 1 WHERE id = 1")
					<-done
					t.Logf("%s: a later autocommit UPDATE waiting 300 ms for its row: %v", drv, err)
					if err != nil {
						t.Errorf("a later statement on the same connection failed where the plain driver waits: %v", err)
					}
				}
			})
		}
	}
}

// TestAttack15MySetRoleTurnsResolutionOff: MariaDB roles. The application
// user works through a default role (a15rw: all on the database) and has a
// read-only role (a15ro) it switches to with SET ROLE once its writes are
// done (least privilege for what follows, e.g. a report query). SET ROLE
// does not touch the transaction: the plain driver's COMMIT commits it.
// sqlretry's marker INSERT, sent with the COMMIT after the closure
// returned, now runs under the read-only role and is refused (1142), and
// sqlretry takes that for "the user may not use the marker table": it
// turns the commit marker off for the whole db (a warning blames the
// grants), so from then on every transaction of every caller of that db
// commits without a marker and a lost COMMIT is ErrAmbiguousCommit where
// it was resolved. Shown by a lost COMMIT of a later, ordinary
// transaction on a new connection: resolved (committed) without the SET
// ROLE transaction before it, ErrAmbiguousCommit after it.
func TestAttack15MySetRoleTurnsResolutionOff(t *testing.T) {
	root := atkPlain(t, "mysql")
	u := atkName("a15u")
	tbl := atkName("a15r")
	atkMust(t, root, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40))",
		"CREATE ROLE IF NOT EXISTS a15rw", "CREATE ROLE IF NOT EXISTS a15ro",
		"GRANT ALL ON test.* TO a15rw", "GRANT SELECT ON test.* TO a15ro",
		"CREATE USER "+u+"@'%'", "GRANT a15rw TO "+u+"@'%'", "GRANT a15ro TO "+u+"@'%'", "SET DEFAULT ROLE a15rw FOR "+u+"@'%'")
	t.Cleanup(func() { root.Exec("DROP USER " + u + "@'%'") })
	for _, setRole := range []bool{false, true} {
		t.Run(fmt.Sprintf("setRoleBefore=%v", setRole), func(t *testing.T) {
			db := a15OpenMyGateAs(t, u)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('first')"); err != nil {
					return err
				}
				if setRole {
					_, err := tx.ExecContext(ctx, "SET ROLE a15ro")
					return err
				}
				return nil
			}); err != nil {
				t.Fatalf("first transaction: %v", err)
			}
			db.SetMaxIdleConns(0) // the next transaction on a new connection, under the default role
			db.SetMaxIdleConns(2)
			tag := atkName("t")
			calls := 0
			a15MyGate.arm("COMMIT")
			hit, release := a15MyGate.hit, a15MyGate.release
			defer a15MyGate.disarm()
			go func() {
				select {
				case <-hit:
					time.Sleep(300 * time.Millisecond)
				case <-time.After(20 * time.Second):
				}
				close(release)
			}()
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES (?)", tag)
				return err
			})
			rows := atkCount(t, root, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'")
			t.Logf("lost COMMIT of a later transaction: calls=%d err=%v rows=%d", calls, err, rows)
			if rows != 1 {
				t.Fatalf("rows %d", rows)
			}
			if err != nil {
				t.Errorf("a lost COMMIT that took effect was not resolved (%v): the commit marker was turned off for the db by an earlier closure's SET ROLE", err)
			}
		})
	}
}

// TestAttack15MyFlushTablesWithReadLockCommittedButError: `FLUSH TABLES t
// WITH READ LOCK` (and `FLUSH TABLES t FOR EXPORT`, the first step of
// copying a table's files out) commits the open transaction implicitly and
// locks the named tables for the session until UNLOCK TABLES. The plain
// driver's COMMIT after it succeeds (nothing left to commit): no error,
// the row is there. sqlretry's marker INSERT, sent with its COMMIT, touches
// a table the session did not lock and is refused (1100 "was not locked
// with LOCK TABLES"): RunInTx returns that error (not ErrAmbiguousCommit)
// for a transaction whose write is committed. (LOCK TABLES in the same
// place is recognised and works.) A caller that runs a failed transaction
// again writes it twice.
func TestAttack15MyFlushTablesWithReadLockCommittedButError(t *testing.T) {
	ctx := context.Background()
	for _, stmt := range []string{"FLUSH TABLES %s WITH READ LOCK", "FLUSH TABLES %s FOR EXPORT"} {
		for _, drv := range []string{"mysql", "sqlretry"} {
			name := "with-read-lock"
			if stmt == "FLUSH TABLES %s FOR EXPORT" {
				name = "for-export"
			}
			t.Run(name+"/"+drv, func(t *testing.T) {
				var db *sql.DB
				if drv == "mysql" {
					db = atkPlain(t, "mysql")
				} else {
					db = atkOpenMy(t)
				}
				db.SetMaxOpenConns(1)
				tbl := atkName("a15fl")
				atkMust(t, db, "CREATE TABLE "+tbl+" (id int auto_increment primary key, v int) ENGINE=InnoDB")
				fn := func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (v) VALUES (1)"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, fmt.Sprintf(stmt, tbl))
					return err
				}
				var err error
				if drv == "mysql" {
					tx, e := db.BeginTx(ctx, nil)
					if e != nil {
						t.Fatal(e)
					}
					if err = fn(ctx, tx); err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				} else {
					err = sqlretry.RunInTx(ctx, db, nil, fn)
				}
				if _, e := db.ExecContext(ctx, "UNLOCK TABLES"); e != nil {
					t.Fatal(e)
				}
				rows := atkCount(t, db, "SELECT COUNT(*) FROM "+tbl)
				t.Logf("%s: err=%v (ErrAmbiguousCommit: %v), rows=%d", drv, err, errors.Is(err, sqlretry.ErrAmbiguousCommit), rows)
				if rows != 1 {
					t.Fatalf("rows %d", rows)
				}
				if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
					t.Errorf("the transaction's row is committed and yet RunInTx returned %v; the plain driver returns nil", err)
				}
			})
		}
	}
}
