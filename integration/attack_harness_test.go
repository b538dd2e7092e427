package integration

// Hostile-tester harness: a net.Conn layer under the driver that, once armed
// with a needle, lets the next write containing it through, waits for the
// server to finish (and, in autocommit, commit) the statement, then cuts the
// socket so the reply is lost. A statement that sqlretry re-runs after this
// ran twice on the server.

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

const (
	atkPG    = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	atkMySQL = "root@tcp(127.0.0.1:3306)/test?parseTime=true&multiStatements=true"
)

type atkCutter struct {
	mu     sync.Mutex
	needle []byte
	wait   time.Duration
	cuts   atomic.Int32
}

func (c *atkCutter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &atkConn{Conn: nc, c: c}, nil
}

type atkConn struct {
	net.Conn
	c           *atkCutter
	cut         atomic.Bool
	pendingWait atomic.Int64
}

func (a *atkConn) Write(p []byte) (int, error) {
	if a.cut.Load() {
		return 0, &net.OpError{Op: "write", Net: "tcp", Source: a.LocalAddr(), Addr: a.RemoteAddr(), Err: os.NewSyscallError("write", syscall.EPIPE)}
	}
	a.c.mu.Lock()
	hit := a.c.needle != nil && bytes.Contains(p, a.c.needle)
	wait := a.c.wait
	if hit {
		a.c.needle = nil
	}
	a.c.mu.Unlock()
	n, err := a.Conn.Write(p)
	if hit {
		a.c.cuts.Add(1)
		a.pendingWait.Store(int64(wait))
	}
	return n, err
}

func (a *atkConn) Read(p []byte) (int, error) {
	if w := a.pendingWait.Swap(0); w != 0 {
		time.Sleep(time.Duration(w))
		a.cut.Store(true)
		a.Conn.Close()
	}
	if a.cut.Load() {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: a.LocalAddr(), Addr: a.RemoteAddr(), Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	}
	return a.Conn.Read(p)
}

var atkMyCutter = &atkCutter{}
var atkMyOnce sync.Once

func atkOpenPG(t *testing.T, c *atkCutter, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(atkPG)
	if err != nil {
		t.Fatal(err)
	}
	if c != nil {
		cfg.DialFunc = c.dial
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), opts...)
	t.Cleanup(func() { db.Close() })
	return db
}

func atkOpenMy(t *testing.T, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	atkMyOnce.Do(func() {
		mysql.RegisterDialContext("atkcut", func(ctx context.Context, addr string) (net.Conn, error) {
			return atkMyCutter.dial(ctx, "tcp", addr)
		})
	})
	cfg, err := mysql.ParseDSN("root@atkcut(127.0.0.1:3306)/test?parseTime=true&multiStatements=true")
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

func atkPlain(t *testing.T, driverName string) *sql.DB {
	t.Helper()
	d := atkPG
	if driverName == "mysql" {
		d = atkMySQL
	}
	db, err := sql.Open(driverName, d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func atkName(prefix string) string { return fmt.Sprintf("%s_%d", prefix, rand.Uint32()) }

func atkMust(t *testing.T, db *sql.DB, qs ...string) {
	t.Helper()
	for _, q := range qs {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

func atkCount(t *testing.T, db *sql.DB, q string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(q).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return n
}
