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
// on a server that has run crash recovery since it started, with the same
// start time: a backend killed (SIGKILL, as the OOM killer does) makes the
// postmaster end every session and recover, keeping
// pg_postmaster_start_time. Without the proof, sqlretry cannot tell
// whether that recovery came after a lost COMMIT and handed its id out
// again, so a "committed" id is ErrAmbiguousCommit there, never success
// (the start time alone took it for the same life). Before any recovery
// the same lost COMMIT resolves as committed; a COMMIT that never reached
// the server is replayed in both.
func TestNoProofCrashCycleCommittedIsAmbiguous(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "npcc")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
		"CREATE ROLE appnp LOGIN", "GRANT ALL ON "+tbl+" TO appnp")
	cfg, err := pgx.ParseConfig(strings.Replace(srv.DSN, "postgres@", "appnp@", 1))
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{isCommit: pgCommit}
	cfg.DialFunc = c.dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(2)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n := 0
	run := func(mode int32) (op string, calls int, err error) {
		n++
		op = fmt.Sprintf("op-%d", n)
		err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if calls == 1 {
				c.mode.Store(mode)
			}
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
			return err
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
	life := func() (start string, recovered bool) {
		if err := plain.QueryRowContext(ctx, "SELECT pg_postmaster_start_time()::text, pg_last_wal_replay_lsn() IS NOT NULL").Scan(&start, &recovered); err != nil {
			t.Fatal(err)
		}
		return start, recovered
	}
	start0, rec0 := life()
	if rec0 {
		t.Fatal("a fresh private server reports a recovery: the test proves nothing")
	}
	check := func(when string, mode int32, wantAmbiguous bool) {
		op, calls, err := run(mode)
		rows := countRows(t, plain, tbl, op)
		t.Logf("%s, cut %d: calls %d, err %v, rows %d", when, mode, calls, err, rows)
		switch {
		case rows != 1:
			t.Errorf("%s: %d rows for one transaction (err %v, calls %d)", when, rows, err, calls)
		case wantAmbiguous && !errors.Is(err, sqlretry.ErrAmbiguousCommit):
			t.Errorf("%s: err %v after %d run(s), want ErrAmbiguousCommit (the id's status cannot be told ours)", when, err, calls)
		case !wantAmbiguous && err != nil:
			t.Errorf("%s: err %v, want success", when, err)
		}
	}
	check("no recovery yet, the COMMIT ran", cutAfterSend, false)
	check("no recovery yet, the COMMIT never arrived", cutMidMessage, false)

	killOneBackend(t, plain)
	start1, rec1 := life()
	if start1 != start0 || !rec1 {
		t.Fatalf("after a backend's SIGKILL: start time %s (before %s), recovered %v; want the same start time and a recovery", start1, start0, rec1)
	}
	check("after a crash cycle, the COMMIT ran", cutAfterSend, true)
	check("after a crash cycle, the COMMIT never arrived", cutMidMessage, false)
}
