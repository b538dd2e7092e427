package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// Attack 7 (attack3): PgBouncer in transaction mode (a setup the README
// supports) keeps a client connection across a server crash restart: the
// pooler dials the server again, the client connection goes on. What
// sqlretry learned "once per connection" (the server's start time, its
// backend pid, ...) then describes a server life that is gone. Later a
// transaction commits on the restarted server and only its reply is lost
// (the client's link to the pooler is cut; the server stays up). Right:
// committed, one run. Wrong: a replay of a committed transaction (two
// rows), or success with no row.
func TestAttack3PoolerKeepsConnectionAcrossRestart(t *testing.T) {
	t.Parallel()
	poolerLostCommit(t, "crash")
}

// The same after one backend is killed (SIGKILL, as the OOM killer does):
// the postmaster ends every session and runs crash recovery, without
// restarting itself.
func TestAttack3PoolerKeepsConnectionAcrossBackendKill(t *testing.T) {
	t.Parallel()
	poolerLostCommit(t, "backend")
}

// The control: the same without the restart (one run expected).
func TestAttack3PoolerLostCommitNoRestart(t *testing.T) {
	t.Parallel()
	poolerLostCommit(t, "")
}

func poolerLostCommit(t *testing.T, restart string) {
	if dbserver.PgBouncerBinary() == "" {
		unavailable(t, "no pgbouncer binary (Debian package pgbouncer)")
	}
	srv := ownServer(t, "pgx")
	bouncer, err := dbserver.StartPgBouncer(dsnPort(t, srv.DSN))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bouncer.Stop)
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "pooled")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)")

	h := &commitHook{}
	var dials atomic.Int32
	cfg, err := pgx.ParseConfig(bouncer.DSN + "&default_query_exec_mode=exec&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return h.dial(ctx, network, addr)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithObserver(sqlretry.SlogObserver(slog.New(slog.NewTextHandler(tWriter{t}, nil)))))
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	warmUp(t, db, tbl)
	warmUp(t, db, tbl)

	// The server crashes (its WAL on disk: nothing lost) and restarts;
	// the pooler's client connection stays open.
	switch restart {
	case "backend":
		var pid int
		var start0, start1 time.Time
		// A connection held open while its backend is killed: the plain
		// pool keeps no idle connection, and a backend whose connection
		// was closed may be gone before the kill ("no such process",
		// once in a CI rehearsal).
		pinned, err := plain.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := pinned.QueryRowContext(context.Background(), "SELECT pg_backend_pid(), pg_postmaster_start_time()").Scan(&pid, &start0); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		pinned.Raw(func(any) error { return driver.ErrBadConn }) // it died with its backend: not back to the pool
		pinned.Close()
		// The postmaster starts its crash cycle (every backend ended,
		// recovery, 57P03 meanwhile) when it reaps the killed backend: wait
		// for that first. A SELECT 1 on a new session could succeed before
		// it, and the next one fail with 57P03 (a CI rehearsal, 2026-12-02).
		for deadline := time.Now().Add(20 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the killed backend %d was not reaped within 20 s", pid)
			}
		}
		waitRow(t, plain, 1, "SELECT 1")
		if err := plain.QueryRow("SELECT pg_postmaster_start_time()").Scan(&start1); err != nil {
			t.Fatal(err)
		}
		t.Logf("postmaster start time before the kill %v, after %v", start0, start1)
	case "crash":
		if err := srv.Crash(); err != nil {
			t.Fatal(err)
		}
		if err := srv.Resume(); err != nil {
			t.Fatal(err)
		}
	}
	before := dials.Load()
	// The client connection survives: transactions go on through it.
	for i := 0; i < 3; i++ {
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('after-restart')")
			return err
		}); err != nil {
			t.Logf("after the restart: %v", err)
		}
	}
	t.Logf("dials before the restart %d, after the transactions that followed it %d", before, dials.Load())
	if dials.Load() != before {
		t.Logf("the client connection did not survive the restart (sqlretry or the pooler replaced it): the attack needs it to")
	}
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	h.after = func() {
		waitRow(t, plain, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
	}
	calls, err := ledgerRun(t, db, h, tbl, op, nil)
	rows := countRows(t, plain, tbl, op)
	t.Logf("dials in all %d", dials.Load())
	if verdict(t, t.Name(), calls, err, rows) {
		t.Logf("ErrAmbiguousCommit for a COMMIT that committed on a server that never went down after it")
	}
	if calls != 1 {
		t.Errorf("a committed transaction was run %d times (rows %d)", calls, rows)
	}
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// Attack 9 (attack3): a connection opened to a standby outlives the
// standby's promotion (PostgreSQL keeps sessions across promote; pgx with
// the default target_session_attrs=any connects to a standby). The
// connection first ran a read-only transaction on the standby; after the
// promotion a writing transaction commits through it on the new timeline
// and only its reply is lost. Right: committed, one run. Wrong: a replay
// (two rows) or success with no row.
func TestAttack3ConnectionOutlivesPromotion(t *testing.T) {
	t.Parallel()
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(pair.Stop)
	primary := openPlain(t, pair.Primary.DSN)
	standby := openPlain(t, pair.StandbyDSN)
	tbl := table(t, primary, "ledger")
	mustExec(t, primary, "CREATE TABLE "+tbl+" (op text)")
	waitRow(t, standby, 1, "SELECT count(*) FROM pg_class WHERE relname = $1", tbl)
	mustExec(t, primary, "ALTER SYSTEM SET synchronous_standby_names = ''", "SELECT pg_reload_conf()")

	h := &commitHook{after: func() {}}
	var dials atomic.Int32
	cfg, err := pgx.ParseConfig(pair.StandbyDSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return h.dial(ctx, network, addr)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithObserver(sqlretry.SlogObserver(slog.New(slog.NewTextHandler(tWriter{t}, nil)))))
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	// Reads on the standby, through the connection that will write later.
	for i := 0; i < 2; i++ {
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			var n int
			return tx.QueryRowContext(ctx, "SELECT count(*) FROM "+tbl).Scan(&n)
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := pair.CrashPrimary(); err != nil {
		t.Fatal(err)
	}
	if err := pair.PromoteStandby(); err != nil {
		t.Fatal(err)
	}
	before := dials.Load()
	for i := 0; i < 2; i++ {
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('after-promotion')")
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("dials before the promotion %d, after the writes that followed %d", before, dials.Load())
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	h.after = func() {
		waitRow(t, standby, 1, "SELECT count(*) FROM "+tbl+" WHERE op = $1", op)
	}
	calls, err := ledgerRun(t, db, h, tbl, op, nil)
	rows := countRows(t, standby, tbl, op)
	verdict(t, t.Name(), calls, err, rows)
	if calls != 1 {
		t.Errorf("a committed transaction was run %d times (rows %d)", calls, rows)
	}
}
