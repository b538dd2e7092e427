package integration

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// a5Delayer holds back the next write containing needle for delay.
type a5Delayer struct {
	mu     sync.Mutex
	needle []byte
	delay  time.Duration
	hits   atomic.Int32
}

type a5DelayConn struct {
	net.Conn
	d *a5Delayer
}

func (c *a5DelayConn) Write(p []byte) (int, error) {
	c.d.mu.Lock()
	hit := c.d.needle != nil && bytes.Contains(p, c.d.needle)
	delay := c.d.delay
	if hit {
		c.d.needle = nil
	}
	c.d.mu.Unlock()
	if hit {
		c.d.hits.Add(1)
		time.Sleep(delay)
	}
	return c.Conn.Write(p)
}

// The caller's deadline runs out while sqlretry's short-wait statement is
// on its way: that is the caller's deadline, not a server refusing the
// statement; short waits must stay on for the db's later calls.
func TestAttack5DeadlineOnTheShortWaitStatement(t *testing.T) {
	ensureProbe(t, atkPG) // a5ReplaySeen reads the bound through it
	cfg, err := pgx.ParseConfig(atkPG)
	if err != nil {
		t.Fatal(err)
	}
	d := &a5Delayer{}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var dl net.Dialer
		nc, err := dl.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &a5DelayConn{Conn: nc, d: d}, nil
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithShortLockWait(true))
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(2)
	for i := range 3 {
		d.mu.Lock()
		d.needle, d.delay = []byte("/* sqlretry */"), 300*time.Millisecond // the bound's statements
		d.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
		var n atomic.Int32
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if n.Add(1) == 1 {
				return a5FakeConflict(ctx, tx, "40001")
			}
			return nil
		})
		cancel()
		t.Logf("round %d: delayed %d, closure ran %d, err %v", i, d.hits.Load(), n.Load(), err)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("round %d: the deadline ran out on the short-wait statement, errors.Is(err, context.DeadlineExceeded) false: %v", i, err)
		}
	}
	if d.hits.Load() == 0 {
		t.Skip("the short-wait statement was never seen")
	}
	seen, _, err := a5ReplaySeen(t, a5Ctx(t, 10*time.Second), db)
	if err != nil || len(seen) < 2 || seen[1] == "0" {
		t.Errorf("DEFECT: after the caller's deadline ran out on the short-wait statement, short waits are off for the db: replay saw %v (err %v)", seen, err)
	}
}

// A nested RunInTx (the closure's ctx) in a bounded attempt: it runs once
// on another connection; the outer commits, and the nested one's work is
// there once.
func TestAttack5NestedInBoundedAttempt(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4)
	ctx := a5Ctx(t, 10*time.Second)
	var outer, inner atomic.Int32
	var innerLT string
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if outer.Add(1) == 1 {
			return a5FakeConflict(ctx, tx, "40P01")
		}
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			return err
		}
		return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
			inner.Add(1)
			innerLT, _ = a5Setting(ctx, tx2, "lock_timeout")
			_, err := tx2.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2")
			return err
		})
	})
	t.Logf("outer ran %d, inner %d (lock_timeout %s), err %v", outer.Load(), inner.Load(), innerLT, err)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"), atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 2"); a != 1 || b != 1 {
		t.Errorf("rows %d %d, want 1 1", a, b)
	}
	if after, _ := a5Setting(ctx, db, "lock_timeout"); after != "0" {
		t.Errorf("DEFECT: lock_timeout %s on a pooled connection after a nested call", after)
	}
}
