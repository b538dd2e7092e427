package integration

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// herdHook cuts the COMMIT of the next n transactions (left); every cut
// then waits until done is closed (the test crashes the server once all n
// are cut) before its driver sees anything.
type herdHook struct {
	left atomic.Int32
	wg   sync.WaitGroup
	done chan struct{}
}

func (h *herdHook) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &herdConn{Conn: c, h: h}, nil
}

type herdConn struct {
	net.Conn
	h *herdHook
}

func (hc *herdConn) Write(p []byte) (int, error) {
	if pgCommit(p) && hc.h.left.Add(-1) >= 0 {
		n, err := hc.Conn.Write(p)
		hc.Conn.Close()
		hc.h.wg.Done()
		<-hc.h.done
		return n, err
	}
	return hc.Conn.Write(p)
}

// Attack 6 (attack3): many callers' COMMITs cut at once, then the server
// crashes and restarts, then other transactions take the ids handed out
// again. Half of the callers commit asynchronously (synchronous_commit
// off, the WAL writer asleep: their commits may be lost with the crash,
// unless a synchronous commit after theirs flushed them), half
// synchronously. Every caller must end with exactly one row on success,
// exactly one row after a replay, or ErrAmbiguousCommit.
func TestAttack3HerdCutThenCrash(t *testing.T) {
	t.Parallel()
	herd(t, func(i int) bool { return i%2 == 0 })
}

// The same with every commit asynchronous: all of them lost with the crash.
func TestAttack3HerdCutThenCrashAllAsync(t *testing.T) {
	t.Parallel()
	herd(t, func(int) bool { return true })
}

func herd(t *testing.T, async func(i int) bool) {
	const n = 12
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	mustExec(t, plain, "ALTER SYSTEM SET wal_writer_delay = '10s'", "ALTER SYSTEM SET wal_writer_flush_after = 0", "SELECT pg_reload_conf()")
	tbl := table(t, plain, "herd")
	other := table(t, plain, "other")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)", "CREATE TABLE "+other+" (n int)")
	cfg, err := pgx.ParseConfig(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	h := &herdHook{done: make(chan struct{})}
	cfg.DialFunc = h.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(n + 4)
	// Warm up every connection the herd will use.
	var warm sync.WaitGroup
	for i := 0; i < n; i++ {
		warm.Add(1)
		go func(i int) {
			defer warm.Done()
			if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm'); SELECT pg_sleep(0.2)")
				return err
			}); err != nil {
				t.Error(err)
			}
		}(i)
	}
	warm.Wait()
	var maxXid atomic.Int64
	h.wg.Add(n)
	h.left.Store(n)
	go func() {
		h.wg.Wait()
		if err := srv.Crash(); err != nil {
			t.Error(err)
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
		}
		burnXids(t, plain, other, maxXid.Load())
		close(h.done)
	}()
	type result struct {
		op    string
		calls int
		err   error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			op := fmt.Sprintf("op-%d-%d", i, time.Now().UnixNano())
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
			defer cancel()
			calls := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op); err != nil {
					return err
				}
				if async(i) {
					if _, err := tx.ExecContext(ctx, "SET LOCAL synchronous_commit = off"); err != nil {
						return err
					}
				}
				var xid int64
				if err := tx.QueryRowContext(ctx, "SELECT pg_current_xact_id()::text::bigint").Scan(&xid); err != nil {
					return err
				}
				for {
					m := maxXid.Load()
					if xid <= m || maxXid.CompareAndSwap(m, xid) {
						break
					}
				}
				return nil
			})
			results[i] = result{op, calls, err}
		}(i)
	}
	wg.Wait()
	var ok, replayed, ambiguous int
	for _, r := range results {
		rows := countRows(t, plain, tbl, r.op)
		if verdict(t, r.op, r.calls, r.err, rows) {
			ambiguous++
		} else if r.err == nil && r.calls == 1 {
			ok++
		} else if r.err == nil {
			replayed++
		}
	}
	t.Logf("FIGURES attack3/herd: %d callers: %d success after one run, %d replayed, %d ErrAmbiguousCommit", n, ok, replayed, ambiguous)
}
