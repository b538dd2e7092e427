package integration

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// Lost COMMITs across a crash restart and a promotion, on private servers
// (resolve_failover.go): the COMMIT reaches the server, and before its
// reply can be read the server crashes (and restarts, or its synchronous
// standby is promoted).

// commitHook is a layer under pgx: when armed, the next write that carries
// COMMIT is delivered whole and the socket is closed, so that the reply is
// lost; then, before the driver sees anything, after runs (it waits for
// the commit, and crashes, restarts or replaces the server). The close
// comes first: pgconn starts a background reader when a write takes long,
// which would read the reply.
type commitHook struct {
	armed atomic.Bool
	fired atomic.Int32
	after func()
}

func (h *commitHook) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &hookConn{Conn: c, h: h}, nil
}

type hookConn struct {
	net.Conn
	h *commitHook
}

func (hc *hookConn) Write(p []byte) (int, error) {
	if pgCancelRequest(p) {
		// pgx sends one when a connection breaks; lost, as a network cut
		// would lose it: the old backend's COMMIT runs to its end instead
		// of being cancelled midway (a test expecting it committed once
		// saw it cancelled and replayed, under load in a CI rehearsal).
		// Closed, so that pgx's read of the answer ends at once (it waited,
		// and the goroutine leak check failed a CI rehearsal).
		hc.Conn.Close()
		return len(p), nil
	}
	if pgCommit(p) && hc.h.armed.Swap(false) {
		n, err := hc.Conn.Write(p)
		hc.Conn.Close()
		hc.h.after()
		hc.h.fired.Add(1)
		return n, err
	}
	return hc.Conn.Write(p)
}

func openHooked(t *testing.T, h *commitHook, dsn string) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = h.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	t.Cleanup(func() { db.Close() })
	return db
}

func openPlain(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxIdleConns(0)
	t.Cleanup(func() { db.Close() })
	return db
}

// waitRow waits until query returns want on db.
func waitRow(t *testing.T, db *sql.DB, want int, query string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int
		err := db.QueryRow(query, args...).Scan(&n)
		if err == nil && n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: %d, %v after 20 s, want %d", query, n, err, want)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// warmUp runs one transaction: it tells sqlretry the server's version, so
// that the next ones carry the proof.
func warmUp(t *testing.T, db *sql.DB, tbl string) {
	t.Helper()
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm-up')")
		return err
	}); err != nil {
		t.Fatalf("warm-up: %v", err)
	}
}

// ledgerRun inserts op in one RunInTx whose COMMIT h cuts; extra runs in
// the closure after the INSERT.
func ledgerRun(t *testing.T, db *sql.DB, h *commitHook, tbl, op string, extra func(ctx context.Context, tx *sql.Tx) error) (calls int, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			h.armed.Store(true)
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op); err != nil {
			return err
		}
		if extra != nil && calls == 1 {
			return extra(ctx, tx)
		}
		return nil
	})
	h.armed.Store(false)
	if h.fired.Load() == 0 {
		t.Fatal("the COMMIT was never cut: the test proved nothing")
	}
	return calls, err
}

// The COMMIT took effect and reached the disk; the server crashed before
// its reply and restarted. Before, any restart made "committed"
// ambiguous; now the WAL proves the id is ours: success, no replay.
func TestPostgresLostCommitAcrossCrashRestartIsResolved(t *testing.T) {
	t.Parallel() // private servers; runs beside the other two
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	h := &commitHook{}
	db := openHooked(t, h, srv.DSN)
	tbl := table(t, plain, "ledger")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	warmUp(t, db, tbl)
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	h.after = func() {
		waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
		if err := srv.Crash(); err != nil {
			t.Error(err)
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
		}
	}
	calls, err := ledgerRun(t, db, h, tbl, op, nil)
	if err != nil || calls != 1 {
		t.Fatalf("err=%v calls=%d; want success after one run (the commit survived the crash)", err, calls)
	}
	waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
}

// The COMMIT took effect only in memory (synchronous_commit off, the WAL
// writer asleep) and the server crashed: after the restart the id is
// handed out again, and once another transaction committed with it,
// txid_status says "committed" for a transaction whose row is not there.
// A rule that trusted that answer would report success for a lost write;
// sqlretry's proof shows that the crash recovery ended before the id's
// record, so that our commit record, after it, was lost: it replays.
func TestPostgresReusedIDAfterCrashIsNotTakenAsCommitted(t *testing.T) {
	t.Parallel() // private servers; runs beside the other two
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	mustExec(t, plain, "ALTER SYSTEM SET wal_writer_delay = '10s'", "ALTER SYSTEM SET wal_writer_flush_after = 0", "SELECT pg_reload_conf()")
	h := &commitHook{}
	db := openHooked(t, h, srv.DSN)
	tbl := table(t, plain, "ledger")
	other := table(t, plain, "other")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)", "CREATE TABLE "+other+" (n int)")
	warmUp(t, db, tbl)
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	var xid int64
	h.after = func() {
		waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
		if err := srv.Crash(); err != nil {
			t.Error(err)
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
		}
		// Other transactions take ids until they are past ours.
		for i := 0; i < 10000; i++ {
			var got int64
			if err := plain.QueryRow("INSERT INTO " + other + " VALUES (1) RETURNING pg_current_xact_id()::text::bigint").Scan(&got); err != nil {
				t.Error(err)
				return
			}
			if got > xid {
				return
			}
		}
	}
	// Start the transaction's WAL near the start of a page: an asynchronous
	// commit wakes the WAL writer when the WAL fills a page, and it would
	// flush the filled page, with the id's records if they were on it. The
	// padding is a non-transactional message: nothing flushes it.
	mustExec(t, plain, "SELECT pg_logical_emit_message(false, 'pad', repeat('x', (8192 - (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint % 8192)::int))")
	calls, err := ledgerRun(t, db, h, tbl, op, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL synchronous_commit = off"); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, "SELECT pg_current_xact_id()::text::bigint").Scan(&xid)
	})
	var rows int
	if qerr := plain.QueryRow("SELECT count(*) FROM "+tbl+" WHERE op = $1", op).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	var status string
	if qerr := plain.QueryRow("SELECT pg_xact_status($1::text::xid8)", fmt.Sprint(xid)).Scan(&status); qerr != nil {
		t.Fatal(qerr)
	}
	t.Logf("xid %d (the first run's): status %q after the restart, ledger rows %d, calls %d, err %v", xid, status, rows, calls, err)
	if err == nil && rows != 1 {
		t.Fatalf("success with %d ledger rows: a lost or doubled write", rows)
	}
	// The reproduction: the first run's commit was lost and its id
	// committed by another transaction.
	if status != "committed" {
		t.Fatalf("not reproduced (status %q): the crash was meant to lose the in-memory commit and the id to be reused", status)
	}
	// The crash recovery ended before the id's record, so our commit
	// record (after it) is not in the history: replayed once, one row.
	if err != nil || calls != 2 || rows != 1 {
		t.Fatalf("err = %v, calls %d, rows %d; want success after one replay and one row", err, calls, rows)
	}
}

// Two crashes before sqlretry asks: the first loses the COMMIT in memory
// (and the id's record); the life after it hands the id out again to a
// transaction that commits, and writes WAL past where the id's record
// ended (L); a second crash; the third life's recovery ends past L. No
// question of sqlretry reached the middle life. The id's status is
// "committed" and the replay position is past L, so by those two alone
// the COMMIT is ours (a lost write: one in 14 runs of
// TestAttack3BackendKillChaos lost 3 writes that way). The WAL at L is
// the middle life's: no sqlretry message of our id ends there, so our
// commit record is not in this history: replayed once, one row. (The
// test's role is a superuser: it may read the WAL.)
func TestPostgresReusedIDAcrossTwoCrashesIsNotTakenAsCommitted(t *testing.T) {
	t.Parallel() // private servers; runs beside the other two
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	mustExec(t, plain, "ALTER SYSTEM SET wal_writer_delay = '10s'", "ALTER SYSTEM SET wal_writer_flush_after = 0", "SELECT pg_reload_conf()")
	h := &commitHook{}
	db := openHooked(t, h, srv.DSN)
	tbl := table(t, plain, "ledger")
	other := table(t, plain, "other")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)", "CREATE TABLE "+other+" (n int, pad text)")
	warmUp(t, db, tbl)
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	var xid int64
	var start, past string // WAL positions: before our transaction, and well past it
	h.after = func() {
		waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
		if err := srv.Crash(); err != nil {
			t.Error(err)
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
		}
		// The middle life: other transactions take ids until they are
		// past ours, then write on until the WAL is past where our record
		// ended, flushed (synchronous commits).
		for i := 0; i < 10000; i++ {
			var got int64
			if err := plain.QueryRow("INSERT INTO " + other + " VALUES (1, repeat('x', 200)) RETURNING pg_current_xact_id()::text::bigint").Scan(&got); err != nil {
				t.Error(err)
				return
			}
			if got > xid {
				break
			}
		}
		if err := plain.QueryRow("SELECT (pg_current_wal_insert_lsn() + 65536)::text").Scan(&past); err != nil {
			t.Error(err)
			return
		}
		for i := 0; i < 100000; i++ {
			var beyond bool
			if err := plain.QueryRow("WITH w AS (INSERT INTO "+other+" VALUES (2, repeat('y', 200))) SELECT pg_current_wal_insert_lsn() > $1::pg_lsn", past).Scan(&beyond); err != nil {
				t.Error(err)
				return
			}
			if beyond {
				break
			}
		}
		// The second crash: the third life's recovery replays the middle
		// life's WAL, past L.
		if err := srv.Crash(); err != nil {
			t.Error(err)
		}
		if err := srv.Resume(); err != nil {
			t.Error(err)
		}
	}
	// As in the test above: our WAL near the start of a page, so that the
	// first crash loses it.
	mustExec(t, plain, "SELECT pg_logical_emit_message(false, 'pad', repeat('x', (8192 - (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint % 8192)::int))")
	if err := plain.QueryRow("SELECT pg_current_wal_insert_lsn()::text").Scan(&start); err != nil {
		t.Fatal(err)
	}
	calls, err := ledgerRun(t, db, h, tbl, op, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL synchronous_commit = off"); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, "SELECT pg_current_xact_id()::text::bigint").Scan(&xid)
	})
	var rows int
	if qerr := plain.QueryRow("SELECT count(*) FROM "+tbl+" WHERE op = $1", op).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	var status, replay string
	if qerr := plain.QueryRow("SELECT pg_xact_status($1::text::xid8), coalesce(pg_last_wal_replay_lsn()::text, '')", fmt.Sprint(xid)).Scan(&status, &replay); qerr != nil {
		t.Fatal(qerr)
	}
	t.Logf("xid %d (the first run's): status %q after two crashes; WAL before it %s, the middle life wrote past %s, the last recovery ended at %s; ledger rows %d, calls %d, err %v", xid, status, start, past, replay, rows, calls, err)
	if err == nil && rows != 1 {
		t.Fatalf("success with %d ledger rows: a lost or doubled write", rows)
	}
	if status != "committed" {
		t.Fatalf("not reproduced (status %q): the first crash was meant to lose the in-memory commit and the middle life to reuse the id", status)
	}
	if err != nil || calls != 2 || rows != 1 {
		t.Fatalf("err = %v, calls %d, rows %d; want success after one replay and one row", err, calls, rows)
	}
}

// The COMMIT took effect on the primary and its synchronous standby; the
// primary crashed before its reply and the standby was promoted. The
// resolution reaches the promoted standby (multi-host DSN,
// target_session_attrs=read-write): its replay reached the id's record on
// the previous timeline, so "committed" is ours: success, no replay.
func TestPostgresLostCommitAcrossPromotionIsResolved(t *testing.T) {
	t.Parallel() // private servers; runs beside the other two
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(pair.Stop)
	multi := multiHostDSN(t, pair.Primary.DSN, pair.StandbyDSN)
	plain := openPlain(t, multi)
	h := &commitHook{}
	db := openHooked(t, h, multi)
	tbl := table(t, plain, "ledger")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	standby := openPlain(t, pair.StandbyDSN)
	// sqlretry trusts a promoted server's replay position only when it has
	// been running since (a clock margin of 1 s) before the connection
	// asked: a standby that has run for a while, as in production.
	waitRow(t, standby, 1, "SELECT (now() - pg_postmaster_start_time() > interval '1.5 s')::int")
	warmUp(t, db, tbl)
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	h.after = func() {
		waitRow(t, standby, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
		if err := pair.CrashPrimary(); err != nil {
			t.Error(err)
		}
		if err := pair.PromoteStandby(); err != nil {
			t.Error(err)
		}
	}
	calls, err := ledgerRun(t, db, h, tbl, op, nil)
	if err != nil || calls != 1 {
		t.Fatalf("err=%v calls=%d; want success after one run (the standby had the commit)\n%s", err, calls, tail(pair.PrimaryLog(), 3000))
	}
	waitRow(t, standby, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
}

// The COMMIT took effect; the primary crashed before its reply and was
// restarted as a standby, then promoted (a new timeline): what Patroni does
// with a leader whose postmaster died while it kept the leader lock. The
// promoted server started after the connection asked, so its start time
// cannot prove its replay position is where it left the old timeline (a
// promoted server that crashed since would look the same); the history
// file of its timeline says where it forked, past the id's record, so
// "committed" is ours: success, no replay.
func TestPostgresLostCommitAcrossCrashRestartAsStandbyAndPromotionIsResolved(t *testing.T) {
	t.Parallel() // private servers; runs beside the others
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(pair.Stop)
	plain := openPlain(t, pair.Primary.DSN)
	h := &commitHook{}
	db := openHooked(t, h, pair.Primary.DSN)
	tbl := table(t, plain, "ledger")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	warmUp(t, db, tbl)
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	h.after = func() {
		waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
		if err := pair.CrashPrimary(); err != nil {
			t.Error(err)
		}
		if err := pair.RestartPrimaryAsStandby(); err != nil {
			t.Error(err)
		}
		go func() {
			// Promoted while sqlretry asks: until then the server is in
			// recovery and is asked again.
			time.Sleep(700 * time.Millisecond)
			if err := pair.PromotePrimary(); err != nil {
				t.Error(err)
			}
		}()
	}
	calls, err := ledgerRun(t, db, h, tbl, op, nil)
	if err != nil || calls != 1 {
		t.Fatalf("err=%v calls=%d; want success after one run (the commit survived the crash)\n%s", err, calls, tail(pair.PrimaryLog(), 3000))
	}
	var tli string
	if err := plain.QueryRow("SELECT substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8)").Scan(&tli); err != nil || tli == "00000001" {
		t.Fatalf("timeline %q, %v: the primary was meant to be promoted to a new timeline", tli, err)
	}
	waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
}

// multiHostDSN joins two pgx URLs into one with both hosts and
// target_session_attrs=read-write.
func multiHostDSN(t *testing.T, a, b string) string {
	t.Helper()
	ua, err := url.Parse(a)
	if err != nil {
		t.Fatal(err)
	}
	ub, err := url.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	ua.Host = ua.Host + "," + ub.Host
	q := ua.Query()
	q.Set("target_session_attrs", "read-write")
	q.Set("connect_timeout", "5")
	ua.RawQuery = q.Encode()
	return ua.String()
}
