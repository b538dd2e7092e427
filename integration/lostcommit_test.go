package integration

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
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

// cutter is a test-only layer under the driver: when armed, the next write
// that carries COMMIT is delivered whole and the socket is then closed
// (the server commits, the reply is lost), or only half of it is delivered
// before the close (the server never sees a COMMIT).
type cutter struct {
	mode     atomic.Int32 // 0 off, cutAfterSend, cutMidMessage
	isCommit func([]byte) bool
	fired    atomic.Int32
	afterCut func() // when set, runs after a cut, before the driver sees it
}

const (
	cutAfterSend  = 1
	cutMidMessage = 2
)

func (c *cutter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &cutConn{Conn: conn, c: c}, nil
}

type cutConn struct {
	net.Conn
	c *cutter
}

func (cc *cutConn) Write(p []byte) (int, error) {
	if cc.c.isCommit(p) {
		switch mode := cc.c.mode.Swap(0); mode {
		case cutAfterSend:
			n, err := cc.Conn.Write(p)
			cc.c.fired.Add(1)
			cc.Conn.Close()
			return n, err
		case cutMidMessage:
			cc.Conn.Write(p[:len(p)/2])
			cc.c.fired.Add(1)
			cc.Conn.Close()
			if cc.c.afterCut != nil {
				cc.c.afterCut()
			}
			return len(p), nil
		}
	}
	return cc.Conn.Write(p)
}

func pgCommit(p []byte) bool { return bytes.Contains(bytes.ToLower(p), []byte("commit\x00")) }
func mysqlCommit(p []byte) bool {
	// COMMIT alone, or the MariaDB block that carries the commit marker
	// with it (commitWithMarker).
	return bytes.HasSuffix(p, []byte{0x03, 'C', 'O', 'M', 'M', 'I', 'T'}) ||
		len(p) > 4 && p[4] == 0x03 && bytes.HasSuffix(p, []byte("; COMMIT; END"))
}

func openCutPostgres(t *testing.T, c *cutter) *sql.DB {
	return openCutPostgresAt(t, c, needPrivate(t, "pgx"))
}

func openCutPostgresAt(t *testing.T, c *cutter, dsn string, opts ...sqlretry.Option) *sql.DB {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = c.dial
	return sqlretry.OpenDB(stdlib.GetConnector(*cfg), opts...)
}

var registerCutOnce sync.Once
var mysqlCutter = &cutter{isCommit: mysqlCommit}

func openCutMariaDB(t *testing.T, opts ...sqlretry.Option) *sql.DB {
	cfg, err := mysql.ParseDSN(needPrivate(t, "mysql"))
	if err != nil {
		t.Fatal(err)
	}
	registerCutOnce.Do(func() {
		mysql.RegisterDialContext("cut", func(ctx context.Context, addr string) (net.Conn, error) { return mysqlCutter.dial(ctx, "tcp", addr) })
	})
	cfg.Net = "cut"
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return sqlretry.OpenDB(conn, opts...)
}

// lostCommit runs one RunInTx that inserts op into a ledger with COMMIT cut
// as mode says, and reports the error, how often the closure ran, and how
// often op is in the ledger.
func lostCommit(t *testing.T, db *sql.DB, c *cutter, mode int32, placeholder string) (calls, rows int, err error) {
	t.Helper()
	tbl := table(t, db, "ledger")
	mustExec(t, db, "CREATE TABLE "+tbl+" (op varchar(40) PRIMARY KEY)")
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			c.mode.Store(mode)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ("+placeholder+")", op)
		return err
	})
	c.mode.Store(0)
	if qerr := db.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = "+placeholder, op).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	if c.fired.Load() == 0 {
		t.Fatal("the COMMIT was never cut: the test proved nothing")
	}
	c.fired.Store(0)
	return calls, rows, err
}

func TestPostgresLostCommitIsResolved(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	db := openCutPostgres(t, c)
	defer db.Close()
	t.Run("server committed: success, closure ran once", func(t *testing.T) {
		calls, n, err := lostCommit(t, db, c, cutAfterSend, "$1")
		if err != nil || calls != 1 || n != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success, 1 run, 1 row", err, calls, n)
		}
	})
	t.Run("server never got COMMIT: replayed, one row", func(t *testing.T) {
		calls, n, err := lostCommit(t, db, c, cutMidMessage, "$1")
		if err != nil || calls != 2 || n != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success after 1 replay, 1 row", err, calls, n)
		}
	})
	s, _ := sqlretry.StatsOf(db)
	t.Logf("stats: %+v", s)
	if s.CommitsResolved != 2 || s.CommitsAmbiguous != 0 {
		t.Errorf("resolved=%d ambiguous=%d, want 2 and 0", s.CommitsResolved, s.CommitsAmbiguous)
	}
}

func TestPostgresLostCommitWithoutResolutionIsAmbiguous(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	cfg, _ := pgx.ParseConfig(needPrivate(t, "pgx"))
	cfg.DialFunc = c.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithCommitResolution(false))
	defer db.Close()
	calls, n, err := lostCommit(t, db, c, cutAfterSend, "$1")
	if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 {
		t.Fatalf("err=%v calls=%d rows=%d; want ErrAmbiguousCommit and no replay", err, calls, n)
	}
}

func TestMariaDBLostCommitIsResolvedWithTheMarker(t *testing.T) {
	t.Run("named marker", func(t *testing.T) { mariaDBLostCommitIsResolved(t, sqlretry.WithMySQLCommitMarker("sqlretry_marker")) })
	t.Run("default marker", func(t *testing.T) { mariaDBLostCommitIsResolved(t) })
}

func mariaDBLostCommitIsResolved(t *testing.T, opts ...sqlretry.Option) {
	// What sqlretry decided, for the failure message: a closure run twice
	// says which attempt failed and why.
	var mu sync.Mutex
	var events []string
	opts = append(opts, sqlretry.WithObserver(sqlretry.ObserverFunc(func(_ context.Context, e sqlretry.Event) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, fmt.Sprintf("%v %s attempt %d class %v: %v (%s)", e.Kind, e.Op, e.Attempt, e.Class, e.Err, e.Reason))
	})))
	seen := func() string {
		mu.Lock()
		defer mu.Unlock()
		s := strings.Join(events, "\n\t")
		events = events[:0]
		return s
	}
	db := openCutMariaDB(t, opts...)
	defer db.Close()
	t.Run("server committed", func(t *testing.T) {
		calls, n, err := lostCommit(t, db, mysqlCutter, cutAfterSend, "?")
		if err != nil || calls != 1 || n != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success, 1 run, 1 row; sqlretry's events:\n\t%s", err, calls, n, seen())
		}
		seen()
	})
	t.Run("server never got COMMIT", func(t *testing.T) {
		calls, n, err := lostCommit(t, db, mysqlCutter, cutMidMessage, "?")
		if err != nil || calls != 2 || n != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success after 1 replay, 1 row; sqlretry's events:\n\t%s", err, calls, n, seen())
		}
	})
}

func TestMariaDBLostCommitWithoutMarkerIsAmbiguous(t *testing.T) {
	db := openCutMariaDB(t, sqlretry.WithMySQLCommitMarker(""))
	defer db.Close()
	calls, _, err := lostCommit(t, db, mysqlCutter, cutAfterSend, "?")
	if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 {
		t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
	}
}

// After a crash PostgreSQL hands out again the transaction ids whose WAL
// never reached the disk: txid_status of a lost COMMIT's id may then
// describe another transaction. Here the COMMIT is cut before the server
// gets it, the server crashes, and new transactions take the same id and
// commit; asked naively, txid_status says "committed" and the caller would
// be told that a write which is not there succeeded.
func TestPostgresLostCommitAcrossACrashIsNotMistaken(t *testing.T) {
	srv := ownServer(t, "pgx") // this test crashes it
	admin, err := sql.Open("pgx", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the WAL writer from flushing the transaction's records before
	// the crash, so that its id is handed out again.
	mustExec(t, admin, "ALTER SYSTEM SET wal_writer_delay = '10s'")
	mustExec(t, admin, "SELECT pg_reload_conf()")
	mustExec(t, admin, "CREATE TABLE reuse_ledger (op text PRIMARY KEY)")
	mustExec(t, admin, "CREATE TABLE reuse_other (n int)")
	admin.Close()

	var xid int64
	reused := false
	c := &cutter{isCommit: pgCommit}
	c.afterCut = func() {
		if err := srv.Crash(); err != nil {
			t.Error(err)
			return
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
			return
		}
		other, err := sql.Open("pgx", srv.DSN)
		if err != nil {
			t.Error(err)
			return
		}
		defer other.Close()
		for range 20 { // new transactions take the ids again, and commit
			var id int64
			if err := other.QueryRow("INSERT INTO reuse_other VALUES (1) RETURNING txid_current()").Scan(&id); err != nil {
				t.Error(err)
				return
			}
			reused = reused || id == xid
		}
	}
	db := openCutPostgresAt(t, c, srv.DSN)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO reuse_ledger VALUES ('op-1')"); err != nil {
			return err
		}
		if calls == 1 {
			if err := tx.QueryRowContext(ctx, "SELECT txid_current()").Scan(&xid); err != nil {
				return err
			}
			c.mode.Store(cutMidMessage)
		}
		return nil
	})
	var rows int
	if qerr := db.QueryRow("SELECT COUNT(*) FROM reuse_ledger").Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	if c.fired.Load() == 0 || !reused {
		t.Fatalf("cut=%d, id %d handed out again=%v: the test proved nothing", c.fired.Load(), xid, reused)
	}
	t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
	if err == nil && rows == 0 {
		t.Fatal("the caller was told the transaction committed, and it is not there")
	}
	if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || rows != 0 {
		t.Fatalf("err=%v rows=%d; want ErrAmbiguousCommit and no row (the id now names another transaction)", err, rows)
	}
}
