package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// beforeHook runs before on the next COMMIT write (the COMMIT not sent
// yet), then sends it whole, closes the socket and runs after (if set)
// before the driver sees anything.
type beforeHook struct {
	armed  atomic.Bool
	fired  atomic.Int32
	before func()
	after  func()
}

func (h *beforeHook) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &beforeConn{Conn: c, h: h}, nil
}

type beforeConn struct {
	net.Conn
	h *beforeHook
}

func (bc *beforeConn) Write(p []byte) (int, error) {
	if pgCommit(p) && bc.h.armed.Swap(false) {
		bc.h.before()
		n, err := bc.Conn.Write(p)
		bc.Conn.Close()
		if bc.h.after != nil {
			bc.h.after()
		}
		bc.h.fired.Add(1)
		return n, err
	}
	return bc.Conn.Write(p)
}

// Attack 8 (attack3): the synchronous standby has everything up to the
// WAL position sqlretry recorded before COMMIT (its logical message), but
// not the commit record: its WAL receiver is frozen just before the
// COMMIT is sent. The README: a lost COMMIT counts as committed only once
// the synchronous standbys have it. Right: ErrAmbiguousCommit (the standby
// never gets it before the deadline). Wrong: success while the standby
// lacks the commit (a failover then loses the write).
func TestAttack3SyncStandbyHasTheRecordButNotTheCommit(t *testing.T) {
	t.Parallel()
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(pair.Stop)
	primary := openPlain(t, pair.Primary.DSN)
	standby := openPlain(t, pair.StandbyDSN)
	tbl := table(t, primary, "ledger")
	mustExec(t, primary, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	h := &beforeHook{}
	cfg, err := pgx.ParseConfig(pair.Primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = h.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	t.Cleanup(func() { db.Close() })
	warmUp(t, db, tbl)
	h.before = func() {
		// The message and the writes are in the WAL; wait until the
		// standby has received all of it (the WAL writer flushes it
		// within wal_writer_delay), then freeze its receiver.
		var insert string
		if err := primary.QueryRow("SELECT pg_current_wal_insert_lsn()::text").Scan(&insert); err != nil {
			t.Error(err)
			return
		}
		waitRow(t, standby, 1, "SELECT (pg_last_wal_receive_lsn() >= $1::pg_lsn)::int", insert)
		if err := pair.FreezeStandby(); err != nil {
			t.Error(err)
		}
		t.Logf("standby received up to %s, frozen before the COMMIT", insert)
	}
	defer pair.ThawStandby()
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			h.armed.Store(true)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
		return err
	})
	if h.fired.Load() == 0 {
		t.Fatal("the COMMIT was never cut")
	}
	onStandby := countRows(t, standby, tbl, op)
	onPrimary := countRows(t, primary, tbl, op)
	t.Logf("calls %d, err %v, rows on the primary %d, on the standby %d", calls, err, onPrimary, onStandby)
	if err == nil && onStandby == 0 {
		t.Fatal("sqlretry said committed while the synchronous standby lacks the commit: a failover now loses it")
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
		t.Fatalf("unexpected error %v", err)
	}
	if err == nil && calls > 1 && onPrimary > 1 {
		t.Fatal("a doubled write")
	}
}
