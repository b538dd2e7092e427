package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
)

// Found by a hostile review of this round's change (2026-12-02), each
// failing before its fix; the comments say what happened then.

// 1. noteEscape ignores NotIdempotent: a SELECT of a side-effecting
// function, marked NotIdempotent as the code's own comment asks, run
// through the outer *sql.DB inside the closure, is taken for a read; the
// outer attempt is replayed and the function runs twice.
func TestNotIdempotentSelectInClosureIsNotReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		rows, err := db.QueryContext(NotIdempotent(ctx), "SELECT audit_insert(1)")
		if err != nil {
			return err
		}
		rows.Close()
		_, err = tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	})
	if n := srv.ranCount("SELECT audit_insert"); n != 1 {
		t.Errorf("err=%v calls=%d: the NotIdempotent SELECT committed %d times (replayed)", err, calls, n)
	}
}

// 2. A write through the outer db that committed part of its work and then
// failed (a CALL whose procedure COMMITs inside and then raises) is not an
// escape because err != nil: the closure logs the audit failure and goes
// on, its own transaction deadlocks, and the replay runs the CALL again.
func TestFailedCallThatCommittedInsideIsNotReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("CALL audit_then_check", step{err: &pgError{"P0001", "check failed"}, ran: true})
	srv.script("UPDATE", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := db.ExecContext(ctx, "CALL audit_then_check()"); err != nil {
			_ = err // best-effort audit: logged, not fatal
		}
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	})
	if n := srv.ranCount("CALL audit_then_check"); n != 1 {
		t.Errorf("err=%v calls=%d: the CALL (committed inside) ran %d times", err, calls, n)
	}
}

// 2b. The same with NoRetry on the audit call: a write lost after it was
// sent comes back as the driver's bare error (no ErrAmbiguousCommit), so
// noteEscape does not see that it may have committed.
func TestNoRetryLostWriteInClosureIsNotReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("INSERT INTO audit", step{err: io.ErrUnexpectedEOF, ran: true})
	srv.script("UPDATE", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, _ = db.ExecContext(NoRetry(ctx), "INSERT INTO audit VALUES (1)") // best effort
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	})
	if n := srv.ranCount("INSERT INTO audit"); n != 1 {
		t.Errorf("err=%v calls=%d: the audit row committed %d times", err, calls, n)
	}
}

// 3. The question before COMMIT now carries pg_last_wal_replay_lsn() even
// without the proof. A role refused EXECUTE on it (42501) had working
// commits before the change; now every COMMIT on a new connection fails
// (resolutionFailed -> Permanent), and the connection never learns its
// server, so every transaction on it fails.
func TestReplayLSNRefusedStillCommits(t *testing.T) {
	srv := newFakeServer()
	for i := 0; i < 10; i++ {
		srv.script(pgAskXIDAndServer, step{err: &pgError{"42501", "permission denied for function pg_last_wal_replay_lsn"}})
	}
	db, _ := testDB(t, srv)
	for i := 0; i < 3; i++ {
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
			return err
		})
		if err != nil {
			t.Errorf("tx %d: %v (the plain driver commits; only sqlretry's new column is refused)", i, err)
		}
	}
	if n := srv.ranCount("UPDATE t"); n != 3 {
		t.Errorf("committed %d of 3 transactions", n)
	}
}

// 3b. On a server without the function (PostgreSQL 9.6 names it
// pg_last_xlog_replay_location; the question is asked there on every
// connection), the new column's 42883 turns resolution off for the whole
// db: a lost COMMIT that committed is then ErrAmbiguousCommit instead of
// resolved.
func TestReplayLSNMissingKeepsResolution(t *testing.T) {
	srv := newFakeServer()
	srv.script(pgAskXIDAndServer, step{err: &pgError{"42883", "function pg_catalog.pg_last_wal_replay_lsn() does not exist"}})
	db, _ := testDB(t, srv)
	run := func() error {
		return RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
			return err
		})
	}
	if err := run(); err != nil {
		t.Fatalf("first tx: %v", err)
	}
	srv.script("COMMIT", step{err: errLost, ran: true})
	if err := run(); err != nil {
		t.Errorf("lost COMMIT that committed: %v (resolution was turned off by the new column)", err)
	}
}

// 4. Many closures writing through the outer db at once (race detector).
func TestConcurrentEscapes(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := db.ExecContext(ctx, fmt.Sprintf("INSERT INTO audit VALUES (%d)", g)); err != nil {
						return err
					}
					st, err := db.PrepareContext(ctx, "INSERT INTO audit2 VALUES (1)")
					if err != nil {
						return err
					}
					defer st.Close()
					if _, err := st.ExecContext(ctx); err != nil {
						return err
					}
					_, err = tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
					return err
				})
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Error(err)
				}
			}
		}(g)
	}
	wg.Wait()
}

// 5. Hot path: every autocommit statement now asks inClosure(). While any
// closure anywhere sits in closureOverflow (curG()==0 off amd64/arm64, or
// four colliding slots), that is a runtime.Callers stack walk per
// statement of every goroutine, closures or not.
func TestAutocommitStatementNoStackWalkOnOverflow(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	ctx := context.Background()
	exec := func() {
		if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
	}
	exec()
	base := testing.AllocsPerRun(200, exec)
	closureOverflow.Add(1) // a closure on some other goroutine overflowed
	defer closureOverflow.Add(-1)
	over := testing.AllocsPerRun(200, exec)
	if over > base {
		t.Errorf("allocs per autocommit INSERT: %.1f normally, %.1f while another goroutine's closure overflowed (a stack walk per statement)", base, over)
	}
}
