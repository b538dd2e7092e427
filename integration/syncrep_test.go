package integration

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// Lost COMMITs under synchronous replication. A COMMIT on a primary with a
// synchronous standby is durable only once the standby has it; until then
// the backend waits in SyncRep, txid_status already says "committed", and
// ending the backend makes the row visible on the primary alone. sqlretry
// may say "committed" only when the standby has the commit: it waits for
// that within the caller's deadline, and otherwise answers
// ErrAmbiguousCommit.

func syncPair(t *testing.T) *dbserver.PostgresSyncPair {
	t.Helper()
	p, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(p.Stop)
	return p
}

// onStandby counts op in tbl on the standby, waiting up to wait for it to
// appear (synchronous_commit=on waits for the flush, not for the replay).
func onStandby(t *testing.T, standby *sql.DB, tbl, op string, wait time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		var n int
		err := standby.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op).Scan(&n)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			// The table itself may not have been replayed yet.
			n = 0
		}
		if n > 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dropCancels wraps a dialer: a PostgreSQL cancel request written on a
// connection it made is swallowed, as on a network that is partitioned
// between client and server (pgx sends one on a separate connection when a
// connection breaks; it would end the old backend's SyncRep wait).
func dropCancels(dial func(context.Context, string, string) (net.Conn, error)) func(context.Context, string, string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &cancelDropConn{Conn: c}, nil
	}
}

type cancelDropConn struct{ net.Conn }

func (c *cancelDropConn) Write(p []byte) (int, error) {
	if len(p) == 16 && binary.BigEndian.Uint32(p) == 16 && binary.BigEndian.Uint32(p[4:]) == 80877102 {
		c.Conn.Close()
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// blackhole is a dialer whose connections, once armed, swallow the next
// COMMIT and everything after it, keeping the socket open: the server's
// backend stays idle in its transaction and never learns that the client
// has gone. The driver is told the connection broke after the write.
type blackhole struct {
	isCommit func([]byte) bool // pgCommit when nil
	armed    atomic.Bool
	fired    atomic.Int32
	mu       sync.Mutex
	held     []net.Conn
}

func (b *blackhole) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &blackholeConn{Conn: c, b: b}, nil
}

// release closes the held sockets.
func (b *blackhole) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.held {
		c.Close()
	}
	b.held = nil
}

type blackholeConn struct {
	net.Conn
	b    *blackhole
	held atomic.Bool
}

func (c *blackholeConn) Write(p []byte) (int, error) {
	if c.held.Load() {
		return len(p), nil
	}
	isCommit := c.b.isCommit
	if isCommit == nil {
		isCommit = pgCommit
	}
	if isCommit(p) && c.b.armed.CompareAndSwap(true, false) {
		c.held.Store(true)
		c.b.mu.Lock()
		c.b.held = append(c.b.held, c.Conn)
		c.b.mu.Unlock()
		c.b.fired.Add(1)
		return len(p), io.ErrUnexpectedEOF // all of it "sent": not safe to retry
	}
	return c.Conn.Write(p)
}

func (c *blackholeConn) Read(p []byte) (int, error) {
	if c.held.Load() {
		return 0, io.ErrUnexpectedEOF
	}
	return c.Conn.Read(p)
}

func (c *blackholeConn) Close() error {
	if c.held.Load() {
		return nil // released by the test
	}
	return c.Conn.Close()
}

// afterCommitSent wraps a dialer: after a write that carries COMMIT, fn
// runs before the driver sees the write's result.
func afterCommitSent(dial func(context.Context, string, string) (net.Conn, error), fn func()) func(context.Context, string, string) (net.Conn, error) {
	return afterCommitSentBy(pgCommit, dial, fn)
}

func afterCommitSentBy(isCommit func([]byte) bool, dial func(context.Context, string, string) (net.Conn, error), fn func()) func(context.Context, string, string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &commitHookConn{Conn: c, isCommit: isCommit, fn: fn}, nil
	}
}

type commitHookConn struct {
	net.Conn
	isCommit func([]byte) bool
	fn       func()
}

func (c *commitHookConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if c.isCommit(p) {
		c.fn()
	}
	return n, err
}

type syncRepCase struct {
	mode      int32         // cutAfterSend or cutMidMessage
	partition bool          // pgx's cancel request never arrives
	deadline  time.Duration // the caller's
	thawAfter time.Duration // 0: stays frozen
	cancel    bool          // a DBA cancels the old backend's SyncRep wait (pg_cancel_backend; that backend only, not sqlretry's probe)
	role      string        // connect as this role (created here, no pg_read_all_stats) instead of the superuser
	freeze    bool
}

// syncRepLostCommit runs one RunInTx inserting op with its COMMIT cut as
// sc says, the standby frozen or not. It returns the table, the op,
// sqlretry's error, the closure's runs and how long RunInTx took.
func syncRepLostCommit(t *testing.T, p *dbserver.PostgresSyncPair, admin *sql.DB, sc syncRepCase) (tbl, op string, calls int, elapsed time.Duration, err error) {
	t.Helper()
	c := &cutter{isCommit: pgCommit}
	cfg, perr := pgx.ParseConfig(p.Primary.DSN)
	if perr != nil {
		t.Fatal(perr)
	}
	if sc.role != "" {
		mustExec(t, admin, "DO $$ BEGIN CREATE ROLE "+sc.role+" LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
		cfg.User = sc.role
	}
	cfg.DialFunc = c.dial
	if sc.partition {
		cfg.DialFunc = dropCancels(cfg.DialFunc)
	}
	if sc.freeze && sc.mode == cutAfterSend {
		// Let the old backend read its COMMIT before sqlretry looks: a
		// backend still idle in its transaction when sqlretry ends it never
		// commits, and the replay is right but proves nothing here.
		cfg.DialFunc = afterCommitSent(cfg.DialFunc, func() {
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
				var n int
				if err := admin.QueryRow("SELECT COUNT(*) FROM pg_stat_activity WHERE query ILIKE 'commit%' AND state = 'active'").Scan(&n); err == nil && n > 0 {
					return
				}
			}
		})
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	defer db.Close()
	tbl = fmt.Sprintf("syncrep_%d", time.Now().UnixNano())
	mustExec(t, admin, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	if sc.role != "" {
		mustExec(t, admin, "GRANT ALL ON "+tbl+" TO "+sc.role)
	}
	op = "op-1"
	if sc.freeze {
		if err := p.FreezeStandby(); err != nil {
			t.Fatal(err)
		}
	}
	thawed := make(chan struct{})
	if sc.freeze && sc.thawAfter > 0 {
		go func() {
			defer close(thawed)
			for c.fired.Load() == 0 {
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(sc.thawAfter)
			if err := p.ThawStandby(); err != nil {
				t.Error(err)
			}
		}()
	} else if sc.cancel {
		go func() {
			defer close(thawed)
			for deadline := time.Now().Add(sc.deadline); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				var n int
				if err := admin.QueryRow("SELECT COUNT(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query ILIKE 'commit%'").Scan(&n); err != nil {
					t.Error(err)
					return
				}
				if n > 0 {
					return
				}
			}
			t.Error("no backend ever waited in SyncRep to be canceled")
		}()
	} else {
		close(thawed)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sc.deadline)
	defer cancel()
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			c.mode.Store(sc.mode)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
		return err
	})
	elapsed = time.Since(start)
	c.mode.Store(0)
	<-thawed
	if c.fired.Load() == 0 {
		t.Fatal("the COMMIT was never cut: the test proved nothing")
	}
	return tbl, op, calls, elapsed, err
}

// TestPostgresSyncRepLostCommit: a primary with a synchronous standby whose
// WAL receiver is frozen, so that COMMITs wait in SyncRep; the COMMIT's
// reply is lost. While the standby has not got the commit the only right
// answers are to wait or ErrAmbiguousCommit, never success (a failover
// would lose the write); once it has, success.
func TestPostgresSyncRepLostCommit(t *testing.T) {
	p := syncPair(t)
	admin, err := sql.Open("pgx", p.Primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	standby, err := sql.Open("pgx", p.StandbyDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Close()
	inSyncRep := func() int {
		var n int
		if err := admin.QueryRow("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	for _, tc := range []struct {
		name              string
		partition, cancel bool
	}{
		// The old backend keeps waiting in SyncRep: sqlretry must not end it.
		{"standby frozen past the deadline, network partitioned", true, false},
		// pgx's cancel request may end the wait (if it comes after the
		// COMMIT): the commit is then visible on the primary alone.
		{"standby frozen past the deadline, pgx cancels the wait", false, false},
		// The same, for certain: the backend lets go of the id, txid_status
		// says committed, and the standby still lacks the commit.
		{"standby frozen past the deadline, a DBA cancels the wait", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer p.ThawStandby()
			tbl, op, calls, elapsed, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutAfterSend, partition: tc.partition, cancel: tc.cancel, deadline: 2 * time.Second, freeze: true})
			waiting := inSyncRep()
			replicated := onStandby(t, standby, tbl, op, 0)
			t.Logf("err=%v calls=%d elapsed=%v backends in SyncRep=%d on standby=%d", err, calls, elapsed, waiting, replicated)
			if err == nil && replicated == 0 {
				t.Fatal("sqlretry said committed, and the synchronous standby does not have the commit: a failover now loses it")
			}
			if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 {
				t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
			}
			if tc.partition && !tc.cancel && waiting == 0 {
				t.Errorf("the old backend no longer waits in SyncRep: it was ended, and its commit is visible on the primary alone\n%s", p.PrimaryLog())
			}
			if tc.cancel && waiting != 0 {
				t.Error("the DBA's cancel did not end the SyncRep wait: the test proved nothing")
			}
			if elapsed > 3*time.Second {
				t.Errorf("took %v past a 2 s deadline", elapsed)
			}
			if err := p.ThawStandby(); err != nil {
				t.Fatal(err)
			}
			if n := onStandby(t, standby, tbl, op, 5*time.Second); n != 1 {
				t.Errorf("after the thaw the standby has %d rows, want 1 (the commit was waiting, not lost)", n)
			}
		})
	}

	for _, partition := range []bool{true, false} {
		t.Run(fmt.Sprintf("standby thawed within the deadline, partition=%v", partition), func(t *testing.T) {
			defer p.ThawStandby()
			tbl, op, calls, elapsed, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutAfterSend, partition: partition, deadline: 10 * time.Second, freeze: true, thawAfter: 700 * time.Millisecond})
			t.Logf("err=%v calls=%d elapsed=%v", err, calls, elapsed)
			if err != nil || calls != 1 {
				t.Fatalf("err=%v calls=%d; want success once the standby has the commit, without a replay", err, calls)
			}
			if elapsed < 700*time.Millisecond {
				t.Errorf("answered after %v, before the standby was thawed (700ms)", elapsed)
			}
			if n := onStandby(t, standby, tbl, op, 5*time.Second); n != 1 {
				t.Fatalf("sqlretry said committed; the standby has %d rows, want 1", n)
			}
		})
	}

	// A role that cannot read pg_stat_replication's positions (no
	// superuser, no pg_read_all_stats), as applications usually connect.
	t.Run("plain role, standby frozen past the deadline", func(t *testing.T) {
		defer p.ThawStandby()
		tbl, op, calls, elapsed, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutAfterSend, partition: true, cancel: true, deadline: 2 * time.Second, freeze: true, role: "app"})
		replicated := onStandby(t, standby, tbl, op, 0)
		t.Logf("err=%v calls=%d elapsed=%v on standby=%d", err, calls, elapsed, replicated)
		if err == nil && replicated == 0 {
			t.Fatal("sqlretry said committed, and the synchronous standby does not have the commit")
		}
		if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
		}
	})
	t.Run("plain role, standby thawed within the deadline", func(t *testing.T) {
		defer p.ThawStandby()
		tbl, op, calls, elapsed, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutAfterSend, partition: true, deadline: 10 * time.Second, freeze: true, thawAfter: 700 * time.Millisecond, role: "app"})
		t.Logf("err=%v calls=%d elapsed=%v", err, calls, elapsed)
		if err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d; want success once the standby has the commit, without a replay", err, calls)
		}
		if n := onStandby(t, standby, tbl, op, 5*time.Second); n != 1 {
			t.Fatalf("sqlretry said committed; the standby has %d rows, want 1", n)
		}
	})

	t.Run("standby up: resolved at once", func(t *testing.T) {
		tbl, op, calls, elapsed, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutAfterSend, partition: true, deadline: 10 * time.Second})
		t.Logf("err=%v calls=%d elapsed=%v", err, calls, elapsed)
		if err != nil || calls != 1 || onStandby(t, standby, tbl, op, 5*time.Second) != 1 {
			t.Fatalf("err=%v calls=%d; want success without a replay, and the row on the standby", err, calls)
		}
	})

	// The COMMIT is lost on the way and the socket stays open: the old
	// backend sits idle in its transaction, and under synchronous
	// replication sqlretry may (and must, to answer) end it, then replay.
	t.Run("COMMIT blackholed, old backend idle in transaction: ended, replayed once", func(t *testing.T) {
		b := &blackhole{}
		defer b.release()
		cfg, err := pgx.ParseConfig(p.Primary.DSN)
		if err != nil {
			t.Fatal(err)
		}
		cfg.DialFunc = dropCancels(b.dial)
		db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
		defer db.Close()
		tbl := fmt.Sprintf("syncrep_%d", time.Now().UnixNano())
		mustExec(t, admin, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
		calls, rows, err := insertWithCommitBlackholed(t, db, admin, b, tbl)
		if err != nil || calls != 2 || rows != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want the idle backend ended and one replay", err, calls, rows)
		}
	})

	t.Run("COMMIT never reached the server: replayed once", func(t *testing.T) {
		tbl, op, calls, _, err := syncRepLostCommit(t, p, admin, syncRepCase{mode: cutMidMessage, partition: true, deadline: 10 * time.Second})
		var rows int
		if qerr := admin.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op).Scan(&rows); qerr != nil {
			t.Fatal(qerr)
		}
		if err != nil || calls != 2 || rows != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success after one replay, one row", err, calls, rows)
		}
	})
}

// MariaDB semi-synchronous replication: a COMMIT waits for a replica's ACK
// ("Waiting for semi-sync ACK from slave"); with the wait point
// AFTER_COMMIT (MariaDB's default) the commit is already visible on the
// primary while it waits, with AFTER_SYNC it becomes visible when the wait
// ends, by the ACK or by a KILL. A KILLed waiter leaves a commit the
// replica may not have: sqlretry must not report it as committed.

func semiSyncPair(t *testing.T) *dbserver.MariaDBSemiSyncPair {
	t.Helper()
	p, err := dbserver.StartMariaDBSemiSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(p.Stop)
	return p
}

type semiSyncCase struct {
	mode      int32
	deadline  time.Duration
	freeze    bool
	thawAfter time.Duration // 0: stays frozen
	kill      bool          // a DBA KILLs the session waiting for the ACK
	// noWaiter, with kill: set when no session was seen waiting for the
	// ACK before the deadline (the case did not happen; the caller runs
	// it again) instead of failing the test.
	noWaiter *atomic.Bool
}

func semiSyncLostCommit(t *testing.T, p *dbserver.MariaDBSemiSyncPair, admin *sql.DB, sc semiSyncCase) (tbl, op string, calls int, elapsed time.Duration, err error) {
	t.Helper()
	cfg, perr := mysql.ParseDSN(p.Primary.DSN)
	if perr != nil {
		t.Fatal(perr)
	}
	c := &cutter{isCommit: mysqlCommit}
	netName := fmt.Sprintf("semisync-%d", time.Now().UnixNano())
	dial := c.dial
	if sc.freeze && sc.mode == cutAfterSend {
		// Let the old session read its COMMIT before sqlretry looks (see
		// syncRepLostCommit).
		dial = afterCommitSentBy(mysqlCommit, dial, func() {
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
				var n int
				if err := admin.QueryRow("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND = 'Query' AND INFO = 'COMMIT'").Scan(&n); err == nil && n > 0 {
					return
				}
			}
		})
	}
	mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) })
	defer mysql.DeregisterDialContext(netName)
	cfg.Net = netName
	conn, perr := mysql.NewConnector(cfg)
	if perr != nil {
		t.Fatal(perr)
	}
	db := sqlretry.OpenDB(conn, sqlretry.WithMySQLCommitMarker("sqlretry_marker"))
	defer db.Close()
	tbl = fmt.Sprintf("semisync_%d", time.Now().UnixNano())
	mustExec(t, admin, "CREATE TABLE "+tbl+" (op varchar(40) PRIMARY KEY)")
	// The marker table exists (created by an earlier case, or now) before
	// the replica is frozen: its DDL would wait for the ACK too.
	mustExec(t, admin, "CREATE TABLE IF NOT EXISTS sqlretry_marker (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB")
	// The db checks the table (and puts its sentinel row in, a write that
	// would wait for the ACK too) before the replica is frozen.
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	op = "op-1"
	if sc.freeze {
		if err := p.FreezeReplica(); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan struct{})
	switch {
	case sc.freeze && sc.thawAfter > 0:
		go func() {
			defer close(done)
			for c.fired.Load() == 0 {
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(sc.thawAfter)
			if err := p.ThawReplica(); err != nil {
				t.Error(err)
			}
		}()
	case sc.kill:
		go func() {
			defer close(done)
			for deadline := time.Now().Add(sc.deadline); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				var id int64
				err := admin.QueryRow("SELECT ID FROM information_schema.PROCESSLIST WHERE STATE LIKE '%semi-sync%' AND COMMAND = 'Query' LIMIT 1").Scan(&id)
				if err == nil {
					_, err = admin.Exec(fmt.Sprintf("KILL %d", id))
					if err != nil {
						t.Error(err)
					}
					return
				}
			}
			if sc.noWaiter != nil {
				sc.noWaiter.Store(true)
				return
			}
			t.Error("no session ever waited for the semi-sync ACK to be KILLed")
		}()
	default:
		close(done)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sc.deadline)
	defer cancel()
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			c.mode.Store(sc.mode)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op)
		return err
	})
	elapsed = time.Since(start)
	c.mode.Store(0)
	<-done
	if c.fired.Load() == 0 {
		t.Fatal("the COMMIT was never cut: the test proved nothing")
	}
	return tbl, op, calls, elapsed, err
}

// onReplica counts op in tbl on the replica, waiting up to wait for it.
func onReplica(replica *sql.DB, tbl, op string, wait time.Duration) int {
	deadline := time.Now().Add(wait)
	for {
		var n int
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := replica.QueryRowContext(ctx, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op).Scan(&n); err != nil {
			n = 0
		}
		cancel()
		if n > 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestMariaDBSemiSyncLostCommit(t *testing.T) {
	p := semiSyncPair(t)
	admin, err := sql.Open("mysql", p.Primary.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	replica, err := sql.Open("mysql", p.ReplicaDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer replica.Close()
	waitingForAck := func() int {
		var n int
		if err := admin.QueryRow("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE LIKE '%semi-sync%' AND COMMAND = 'Query'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	for _, point := range []string{"AFTER_COMMIT", "AFTER_SYNC"} {
		mustExec(t, admin, "SET GLOBAL rpl_semi_sync_master_wait_point = "+point)
		for _, kill := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, replica frozen past the deadline, DBA kills the waiter=%v", point, kill), func(t *testing.T) {
				defer p.ThawReplica()
				// With kill, a run in which no session was seen waiting
				// for the ACK within the deadline (once in a CI rehearsal
				// under load, 2026-12-02: the COMMIT replicated after the
				// thaw, but the DBA's poll never saw it wait) is run again,
				// up to three times: it tested no KILL.
				var noWaiter atomic.Bool
				sc := semiSyncCase{mode: cutAfterSend, deadline: 2 * time.Second, freeze: true, kill: kill, noWaiter: &noWaiter}
				tbl, op, calls, elapsed, err := semiSyncLostCommit(t, p, admin, sc)
				for try := 2; kill && noWaiter.Load(); try++ {
					if try > 3 {
						t.Fatal("no session ever waited for the semi-sync ACK to be KILLed, in 3 runs")
					}
					t.Logf("run %d: no session was seen waiting for the ACK (err=%v calls=%d): running the case again", try-1, err, calls)
					if err := p.ThawReplica(); err != nil {
						t.Fatal(err)
					}
					if n := onReplica(replica, tbl, op, 10*time.Second); n > 1 {
						t.Fatalf("run %d: %d rows for one operation", try-1, n)
					}
					noWaiter.Store(false)
					tbl, op, calls, elapsed, err = semiSyncLostCommit(t, p, admin, sc)
				}
				waiting := waitingForAck()
				replicated := onReplica(replica, tbl, op, 0)
				t.Logf("err=%v calls=%d elapsed=%v sessions waiting for the ACK=%d on replica=%d", err, calls, elapsed, waiting, replicated)
				if err == nil && replicated == 0 {
					t.Fatal("sqlretry said committed, and the semi-synchronous replica does not have the commit: a failover now loses it")
				}
				if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 {
					t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
				}
				if !kill && waiting == 0 {
					t.Error("the old session no longer waits for the ACK: it was KILLed, and its commit is on the primary alone")
				}
				if elapsed > 3*time.Second {
					t.Errorf("took %v past a 2 s deadline", elapsed)
				}
				if err := p.ThawReplica(); err != nil {
					t.Fatal(err)
				}
				if n := onReplica(replica, tbl, op, 10*time.Second); n != 1 {
					t.Errorf("after the thaw the replica has %d rows, want 1", n)
				}
			})
		}
		t.Run(point+", replica thawed within the deadline", func(t *testing.T) {
			defer p.ThawReplica()
			tbl, op, calls, elapsed, err := semiSyncLostCommit(t, p, admin, semiSyncCase{mode: cutAfterSend, deadline: 10 * time.Second, freeze: true, thawAfter: 700 * time.Millisecond})
			t.Logf("err=%v calls=%d elapsed=%v", err, calls, elapsed)
			if err != nil || calls != 1 {
				t.Fatalf("err=%v calls=%d; want success once the replica has the commit, without a replay", err, calls)
			}
			if elapsed < 700*time.Millisecond {
				t.Errorf("answered after %v, before the replica was thawed (700ms)", elapsed)
			}
			if n := onReplica(replica, tbl, op, 5*time.Second); n != 1 {
				t.Fatalf("sqlretry said committed; the replica has %d rows, want 1", n)
			}
		})
	}
	t.Run("replica up: resolved at once", func(t *testing.T) {
		tbl, op, calls, elapsed, err := semiSyncLostCommit(t, p, admin, semiSyncCase{mode: cutAfterSend, deadline: 10 * time.Second})
		t.Logf("err=%v calls=%d elapsed=%v", err, calls, elapsed)
		if err != nil || calls != 1 || onReplica(replica, tbl, op, 5*time.Second) != 1 {
			t.Fatalf("err=%v calls=%d; want success without a replay, and the row on the replica", err, calls)
		}
	})
	// The COMMIT is lost on the way and the socket stays open: the old
	// session sleeps in its transaction (Command Sleep), and under
	// semi-sync sqlretry may (and must, to answer) KILL it, then replay.
	t.Run("COMMIT blackholed, old session idle in transaction: KILLed, replayed once", func(t *testing.T) {
		b := &blackhole{isCommit: mysqlCommit}
		defer b.release()
		cfg, err := mysql.ParseDSN(p.Primary.DSN)
		if err != nil {
			t.Fatal(err)
		}
		netName := fmt.Sprintf("blackhole-%d", time.Now().UnixNano())
		mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return b.dial(ctx, "tcp", addr) })
		defer mysql.DeregisterDialContext(netName)
		cfg.Net = netName
		conn, err := mysql.NewConnector(cfg)
		if err != nil {
			t.Fatal(err)
		}
		db := sqlretry.OpenDB(conn, sqlretry.WithMySQLCommitMarker("sqlretry_marker"))
		defer db.Close()
		tbl := fmt.Sprintf("semisync_%d", time.Now().UnixNano())
		mustExec(t, admin, "CREATE TABLE "+tbl+" (op varchar(40) PRIMARY KEY)")
		calls, rows, err := insertWithCommitBlackholed(t, db, admin, b, tbl)
		if err != nil || calls != 2 || rows != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want the idle session KILLed and one replay", err, calls, rows)
		}
	})
	t.Run("COMMIT never reached the server: replayed once", func(t *testing.T) {
		tbl, op, calls, _, err := semiSyncLostCommit(t, p, admin, semiSyncCase{mode: cutMidMessage, deadline: 10 * time.Second})
		var rows int
		if qerr := admin.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op).Scan(&rows); qerr != nil {
			t.Fatal(qerr)
		}
		if err != nil || calls != 2 || rows != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want success after one replay, one row", err, calls, rows)
		}
	})
}

// insertWithCommitBlackholed runs one RunInTx inserting 'op-1' into tbl
// through db, with b arming on the first attempt so that its COMMIT is
// lost on the way, and returns the attempts, the rows admin then sees and
// RunInTx's error. It fails the test when the COMMIT was never blackholed.
func insertWithCommitBlackholed(t *testing.T, db, admin *sql.DB, b *blackhole, tbl string) (calls, rows int, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			b.armed.Store(true)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('op-1')")
		return err
	})
	if qerr := admin.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
	if b.fired.Load() == 0 {
		t.Fatal("the COMMIT was never blackholed: the test proved nothing")
	}
	return calls, rows, err
}
