package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// A role that may not run pg_logical_emit_message (the WAL proof refused)
// and a crash cycle that keeps pg_postmaster_start_time: a backend killed
// (SIGKILL, as the OOM killer does) makes the postmaster end every session
// and run crash recovery. Here the COMMIT is cut before the server gets
// it, a backend is killed, the transaction's records (never flushed:
// wal_writer_delay 10s) are lost with the crash, and new transactions take
// its id again and commit. The start time alone called that "committed":
// the caller was told a write that is not there succeeded. The replay
// position, recorded when the connection asked and asked again after the
// loss, shows the recovery: ErrAmbiguousCommit (or a replay), never
// success without the row. A crash cycle before the transaction changes
// nothing: a lost COMMIT that took effect is committed, one that never
// arrived is replayed.
func TestNoProofCrashCycleCommittedIsAmbiguous(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "npcc")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)", "CREATE TABLE npcc_other (n int)",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
		"CREATE ROLE appnp LOGIN", "GRANT ALL ON "+tbl+" TO appnp",
		// Keep the WAL writer from flushing the transaction's records
		// before the crash, so that its id is handed out again.
		"ALTER SYSTEM SET wal_writer_delay = '10s'", "SELECT pg_reload_conf()")
	cfg, err := pgx.ParseConfig(strings.Replace(srv.DSN, "postgres@", "appnp@", 1))
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{isCommit: pgCommit}
	cfg.DialFunc = c.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	t.Cleanup(func() { db.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n := 0
	var xid int64
	run := func(mode int32) (op string, calls int, err error) {
		n++
		op = fmt.Sprintf("op-%d", n)
		err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op); err != nil {
				return err
			}
			if calls == 1 {
				if err := tx.QueryRowContext(ctx, "SELECT txid_current()").Scan(&xid); err != nil {
					return err
				}
				c.mode.Store(mode)
			}
			return nil
		})
		c.mode.Store(0)
		if mode != 0 && c.fired.Swap(0) == 0 {
			t.Fatal("the COMMIT was never cut: the test proved nothing")
		}
		return op, calls, err
	}
	// The first transactions learn the version, meet the refusal and go
	// on without the proof.
	for i := 0; i < 3; i++ {
		if _, _, err := run(0); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string, mode int32) {
		op, calls, err := run(mode)
		rows := countRows(t, plain, tbl, op)
		t.Logf("%s, cut %d: calls %d, err %v, rows %d", when, mode, calls, err, rows)
		if rows != 1 || err != nil {
			t.Errorf("%s: err %v, %d rows after %d run(s); want success and one row", when, err, rows, calls)
		}
	}
	check("no recovery yet, the COMMIT ran", cutAfterSend)
	check("no recovery yet, the COMMIT never arrived", cutMidMessage)
	life := func() (start string, recovered bool) {
		if err := plain.QueryRowContext(ctx, "SELECT pg_postmaster_start_time()::text, pg_last_wal_replay_lsn() IS NOT NULL").Scan(&start, &recovered); err != nil {
			t.Fatal(err)
		}
		return start, recovered
	}
	start0, _ := life()
	killOneBackend(t, plain)
	if start1, rec := life(); start1 != start0 || !rec {
		t.Fatalf("after a backend's SIGKILL: start time %s (before %s), recovered %v; want the same start time and a recovery", start1, start0, rec)
	}
	check("after a crash cycle, the COMMIT ran", cutAfterSend)
	check("after a crash cycle, the COMMIT never arrived", cutMidMessage)

	// The crash cycle between the question and the answer.
	reused := false
	c.afterCut = func() {
		killOneBackend(t, plain)
		for range 20 { // new transactions take the ids again, and commit
			var id int64
			if err := plain.QueryRow("INSERT INTO npcc_other VALUES (1) RETURNING txid_current()").Scan(&id); err != nil {
				t.Error(err)
				return
			}
			reused = reused || id == xid
		}
	}
	op, calls, err := run(cutMidMessage)
	rows := countRows(t, plain, tbl, op)
	t.Logf("a crash cycle after the cut COMMIT, id %d handed out again %v: calls %d, err %v, rows %d", xid, reused, calls, err, rows)
	if !reused {
		t.Fatalf("id %d was not handed out again: the test proved nothing", xid)
	}
	switch {
	case err == nil && rows == 0:
		t.Error("LOST WRITE: the caller was told the transaction committed, and it is not there")
	case err == nil && rows != 1:
		t.Errorf("%d rows after success", rows)
	case err != nil && (!errors.Is(err, sqlretry.ErrAmbiguousCommit) || rows != 0):
		t.Errorf("err %v, %d rows; want ErrAmbiguousCommit and no row (the id now names another transaction), or a replay", err, rows)
	}
}

// A role refused pg_last_wal_replay_lsn as well as the proof (both revoked
// from PUBLIC): the question before COMMIT falls back without the replay
// position, once, and every transaction commits, as with the plain driver
// (a hostile review found each COMMIT failing once the question carried
// it, 2026-12-02).
func TestNoProofReplayPositionRefusedCommits(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "nprr")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
		"REVOKE EXECUTE ON FUNCTION pg_last_wal_replay_lsn() FROM PUBLIC",
		"CREATE ROLE appnr LOGIN", "GRANT ALL ON "+tbl+" TO appnr")
	db, err := sqlretry.Open("pgx", strings.Replace(srv.DSN, "postgres@", "appnr@", 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := 0; i < 5; i++ {
		op := fmt.Sprintf("op-%d", i)
		if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
			return err
		}); err != nil {
			t.Fatalf("transaction %d: %v", i, err)
		}
		if n := countRows(t, plain, tbl, op); n != 1 {
			t.Fatalf("transaction %d: %d rows", i, n)
		}
	}
}
