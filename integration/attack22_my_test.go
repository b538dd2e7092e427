package integration

// Hostile tests of sqlretry (attack22): the MariaDB commit marker's
// "table of another shape" path (resolve.go: markerShapeNumber,
// markerShadowed): a marker INSERT refused with 1054, 1048, 1364, 1366 or
// 1406 commits the transaction without a marker and makes the next
// transaction check the table again.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

// a22CountingConnector counts the connections sqlretry dials: the pool's
// and the marker check's side connections.
type a22CountingConnector struct {
	driver.Connector
	n atomic.Int64
}

func (c *a22CountingConnector) Connect(ctx context.Context) (driver.Conn, error) {
	c.n.Add(1)
	return c.Connector.Connect(ctx)
}

// a22Events records sqlretry's events.
type a22Events struct {
	mu  sync.Mutex
	evs []sqlretry.Event
}

func (o *a22Events) Observe(ctx context.Context, e sqlretry.Event) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.evs = append(o.evs, e)
}

func (o *a22Events) count(k sqlretry.EventKind) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, e := range o.evs {
		if e.Kind == k {
			n++
		}
	}
	return n
}

// a22MyOwnDB: a database of its own on the shared MariaDB (so that its
// default marker table, <db>.sqlretry_commit_marker, is this test's), a
// table w, and a sqlretry db on a counting connector, warmed up (the
// marker table created and checked).
func a22MyOwnDB(t *testing.T, opts ...sqlretry.Option) (db, plain *sql.DB, cc *a22CountingConnector, dbName string) {
	t.Helper()
	plain = atkPlain(t, "mysql")
	dbName = atkName("a22my")
	atkMust(t, plain, "CREATE DATABASE "+dbName)
	t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
	atkMust(t, plain, "CREATE TABLE "+dbName+".w (id int auto_increment primary key, v int) ENGINE=InnoDB")
	cfg, err := mysql.ParseDSN("root@tcp(127.0.0.1:3306)/" + dbName + "?parseTime=true")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cc = &a22CountingConnector{Connector: conn}
	db = sqlretry.OpenDB(cc, opts...)
	t.Cleanup(func() { db.Close() })
	db.SetMaxIdleConns(4)
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO w (v) VALUES (0)")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return db, plain, cc, dbName
}

// TestAttack22MyAlteredMarkerSideCheckEveryTx: another session (a DBA, a
// schema tool, another program sharing the table) adds a NOT NULL column
// without a default to the marker table, or drops its created_at column
// (the token is all a lookup needs). The marker check (markerShapeOK)
// looks only at the token column, the engine and triggers, so it passes
// the table; every marker INSERT then fails with 1364 under the server's
// STRICT_TRANS_TABLES, which the new path reads as "a table of another
// shape": commit without a marker, and the next transaction checks the
// table again, on a side connection, under the db-wide marker lock. So
// every writing transaction, for good, dials a side connection and runs
// the check's ~6 statements (serialised across the db), and every lost
// COMMIT is ErrAmbiguousCommit, and nothing is said to the observer (no
// EventResolutionOff). The plain driver: 40 commits on one pooled
// connection. sqlretry: 40 commits and ~40 side connections.
func TestAttack22MyAlteredMarkerSideCheckEveryTx(t *testing.T) {
	for _, alter := range []string{"ADD COLUMN host VARCHAR(64) NOT NULL", "DROP COLUMN created_at"} {
		t.Run(alter, func(t *testing.T) { a22AlteredMarker(t, alter) })
	}
}

func a22AlteredMarker(t *testing.T, alter string) {
	obs := &a22Events{}
	db, plain, cc, dbName := a22MyOwnDB(t, sqlretry.WithObserver(obs))
	const n = 40
	run := func() (time.Duration, int64, int) {
		m0 := atkCount(t, plain, "SELECT COUNT(*) FROM "+dbName+".sqlretry_commit_marker")
		before := cc.n.Load()
		start := time.Now()
		for i := 0; i < n; i++ {
			if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO w (v) VALUES (?)", i+1)
				return err
			}); err != nil {
				t.Fatal(err)
			}
		}
		return time.Since(start), cc.n.Load() - before, atkCount(t, plain, "SELECT COUNT(*) FROM "+dbName+".sqlretry_commit_marker") - m0
	}
	tookOK, dialsOK, markersOK := run()
	atkMust(t, plain, "ALTER TABLE "+dbName+".sqlretry_commit_marker "+alter)
	took, dials, markers := run()
	t.Logf("%d transactions before the ALTER: %d dials, %v, %d markers; after: %d dials, %v, %d markers, EventResolutionOff %d",
		n, dialsOK, tookOK, markersOK, dials, took, markers, obs.count(sqlretry.EventResolutionOff))
	if dials > 2 {
		t.Errorf("%d sequential transactions dialled %d connections (the plain driver: 0 after the first); every one re-checks the marker table on a side connection", n, dials)
	}
	if markers == 0 && obs.count(sqlretry.EventResolutionOff) == 0 {
		t.Errorf("no transaction wrote a marker (every lost COMMIT is ambiguous) and nothing said so to the observer")
	}
}

// TestAttack22MyLaxTempMarkerReplays: the path's claim is that a session
// whose marker INSERT lands in a table of another shape (a TEMPORARY table
// of the session's under the marker's name) commits without a marker, so
// that a lost COMMIT is ambiguous, never replayed. That holds only while
// the INSERT is refused, i.e. under a strict sql_mode. The same session
// with an empty sql_mode (a DSN's, a legacy application's): the INSERT into
// the temporary table (token VARBINARY(4)) succeeds, with a truncation
// warning; the token row lives in the session's temporary table and dies
// with it; after a lost COMMIT reply the lookup on a side connection finds
// no token in the real table (and its sentinel): "not committed", and
// RunInTx replays the closure. The committed row is written twice and
// RunInTx returns nil. The plain driver: one row, an error for the lost
// reply.
func TestAttack22MyLaxTempMarkerReplays(t *testing.T) {
	if os.Getenv("ATTACK22_DEFECTS") == "" {
		t.Skip("left: a temporary table under the marker's name that takes the marker's INSERT (here a narrower token, truncated under an empty sql_mode) hides it, as one of the same shape does (README, the marker table); run with ATTACK22_DEFECTS=1")
	}
	a22TempMarkerRun(t, "")
}

// TestAttack22MyStrictTempMarkerAmbiguousHolds: the same under the
// server's STRICT_TRANS_TABLES: the marker INSERT is refused (1406), the
// transaction commits without a marker, and the lost reply is
// ErrAmbiguousCommit with the row written once, as claimed.
func TestAttack22MyStrictTempMarkerAmbiguousHolds(t *testing.T) {
	a22TempMarkerRun(t, "STRICT_TRANS_TABLES")
}

func a22TempMarkerRun(t *testing.T, sqlMode string) {
	plain := atkPlain(t, "mysql")
	tbl := atkName("a22lax")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int auto_increment primary key, tag varchar(40)) ENGINE=InnoDB")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	db := a15OpenMyGate(t)
	db.SetMaxOpenConns(1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('warm-up')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// the session: lax sql_mode, and a temporary table of another shape
	// under the marker's name (the shape the path is for)
	atkMust(t, db, "SET SESSION sql_mode = '"+sqlMode+"'",
		"CREATE TEMPORARY TABLE test.sqlretry_commit_marker (token VARBINARY(4), created_at DATETIME(6))")
	tag := atkName("t")
	calls := 0
	// Lax: the block's INSERT passes and its COMMIT runs: cut its reply.
	// Strict: the block stops at the INSERT and sqlretry sends a plain
	// COMMIT (a COM_QUERY packet beginning with it): cut that one's.
	needle := "BEGIN NOT ATOMIC"
	if sqlMode != "" {
		needle = "\x03COMMIT"
	}
	a15MyGate.arm(needle)
	hit, release := a15MyGate.hit, a15MyGate.release
	defer a15MyGate.disarm()
	done := make(chan error, 1)
	go func() {
		done <- sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES (?)", tag)
			return err
		})
	}()
	select {
	case <-hit:
	case <-time.After(10 * time.Second):
		a15MyGate.disarm()
		t.Fatal("the COMMIT never went out")
	}
	a15MyGate.disarm()
	for start := time.Now(); atkCount(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'") == 0; time.Sleep(20 * time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			close(release)
			t.Fatal("the row never committed")
		}
	}
	close(release)
	err := <-done
	rows := atkCount(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE tag = '"+tag+"'")
	t.Logf("RunInTx: calls=%d err=%v; rows=%d", calls, err, rows)
	if rows != 1 {
		t.Errorf("the committed write is in the table %d times (closure ran %d times, RunInTx returned %v)", rows, calls, err)
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
		t.Errorf("want nil or ErrAmbiguousCommit, got %v", err)
	}
}

// a22Questions is the session's count of statements the client sent.
func a22Questions(t *testing.T, db *sql.DB) int {
	t.Helper()
	var name string
	var n int
	if err := db.QueryRow("SHOW SESSION STATUS LIKE 'Questions'").Scan(&name, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestAttack22MyOracleModeBlockHolds (held: MariaDB 10.11 takes the block
// under sql_mode = ORACLE too). Probe: one closure sets its
// session's sql_mode to ORACLE (MariaDB's mode for applications moved from
// Oracle; a DSN may set it too). MariaDB parses BEGIN NOT ATOMIC only in
// the default mode, so the marker block that carries this transaction's
// COMMIT is refused (1064); sqlretry rolls the transaction back, replays
// the closure (it runs twice; the plain driver commits it once) and turns
// the block off for the whole db, for good: every later transaction of the
// db, on every connection and in the default sql_mode, sends its marker
// INSERT and its COMMIT separately, one more statement and round trip
// each.
func TestAttack22MyOracleModeBlockHolds(t *testing.T) {
	db, _, _, _ := a22MyOwnDB(t)
	db.SetMaxOpenConns(1)
	one := func() int {
		q0 := a22Questions(t, db)
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO w (v) VALUES (1)")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return a22Questions(t, db) - q0 - 1
	}
	before := one()
	runs := 0
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "SET SESSION sql_mode = 'ORACLE'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO w (v) VALUES (2)")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	atkMust(t, db, "SET SESSION sql_mode = DEFAULT")
	after := one()
	t.Logf("statements per transaction before: %d, after: %d; the ORACLE-mode closure ran %d times", before, after, runs)
	if runs != 1 {
		t.Errorf("the closure that set sql_mode = ORACLE ran %d times (the plain driver: once)", runs)
	}
	if after > before {
		t.Errorf("after one session's ORACLE mode every transaction of the db sends %d statements, %d before", after, before)
	}
}
