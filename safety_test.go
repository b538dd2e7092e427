package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

var (
	errSerialization = &pgError{"40001", "could not serialize access due to concurrent update"}
	errDeadlockPG    = &pgError{"40P01", "deadlock detected"}
	errUnique        = &pgError{"23505", "duplicate key value violates unique constraint"}
	errDeadlockMy    = &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock; try restarting transaction"}
	errLockWaitMy    = &mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded; try restarting transaction"}
	errLost          = io.ErrUnexpectedEOF
	errRefused       = &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
)

// Row: dialing failed -> the Connector retries the dial with backoff.
func TestDialFailuresAreRetriedWithBackoff(t *testing.T) {
	srv := newFakeServer()
	srv.dialErrs = []error{errRefused, errRefused, &pgError{"57P03", "the database system is starting up"}}
	db, clock := testDB(t, srv)
	if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != nil {
		t.Fatalf("Exec: %v", err)
	}
	if srv.dials != 4 {
		t.Errorf("dials = %d, want 4 (3 failures, then success)", srv.dials)
	}
	if n := len(clock.Sleeps()); n != 3 {
		t.Errorf("backoff sleeps = %d, want 3", n)
	}
	if s := stats(t, db); s.DialFailures != 3 || s.Dials != 1 || s.RetriesConnection != 3 {
		t.Errorf("stats = %+v", s)
	}
}

func TestDialPermanentErrorIsNotRetried(t *testing.T) {
	srv := newFakeServer()
	auth := &pgError{"28P01", "password authentication failed"}
	srv.dialErrs = []error{fmtWrap(auth)}
	db, _ := testDB(t, srv)
	_, err := db.Exec("INSERT INTO t VALUES (1)")
	var pe *pgError
	if !errors.As(err, &pe) || pe.code != "28P01" {
		t.Fatalf("err = %v, want the 28P01 error", err)
	}
	if srv.dials != 1 {
		t.Errorf("dials = %d, want 1", srv.dials)
	}
}

func fmtWrap(err error) error { return &net.OpError{Op: "read", Err: err} }

// Row: a statement failed before anything was sent (ErrBadConn) -> database/sql
// re-runs it on another connection; it runs exactly once.
func TestBadConnIsHandedToDatabaseSQL(t *testing.T) {
	for _, tc := range []struct {
		name    string
		dialect Dialect
		query   string
	}{
		{"mysql write", DialectMySQL, "INSERT INTO t VALUES (1)"},
		{"postgres read", DialectPostgres, "SELECT n FROM t"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.query, step{err: driver.ErrBadConn})
			db, _ := testDB(t, srv, WithDialect(tc.dialect))
			var err error
			if tc.dialect == DialectPostgres {
				var rows *sql.Rows
				if rows, err = db.Query(tc.query); err == nil {
					rows.Close()
				}
			} else {
				_, err = db.Exec(tc.query)
			}
			if err != nil {
				t.Fatalf("%s: %v", tc.query, err)
			}
			if n := srv.ranCount(tc.query); n != 1 {
				t.Errorf("ran %d times, want 1", n)
			}
			if srv.dials != 2 {
				t.Errorf("dials = %d, want 2 (the bad connection was replaced)", srv.dials)
			}
			if s := stats(t, db); s.HandOffs != 1 {
				t.Errorf("HandOffs = %d, want 1", s.HandOffs)
			}
		})
	}
}

// pgx's stdlib turns every SafeToRetry error into driver.ErrBadConn, and
// pgx reports a connection lost after a simple-protocol statement was sent
// as SafeToRetry ("conn closed"): with the plain driver database/sql then
// runs the write twice (integration TestPostgresLostAutocommitWriteRunsOnce).
// On PostgreSQL an ErrBadConn on a write is therefore a lost connection.
func TestPostgresBadConnOnAWriteIsAmbiguous(t *testing.T) {
	srv := newFakeServer()
	srv.script("INSERT", step{err: driver.ErrBadConn, ran: true})
	db, _ := testDB(t, srv)
	_, err := db.Exec("INSERT INTO t VALUES (1)")
	if !errors.Is(err, ErrAmbiguousCommit) || errors.Is(err, driver.ErrBadConn) {
		t.Fatalf("err = %v, want ErrAmbiguousCommit that does not match ErrBadConn", err)
	}
	if n := srv.ranCount("INSERT"); n != 1 {
		t.Errorf("INSERT ran %d times, want 1", n)
	}
	srv.script("UPSERT", step{err: driver.ErrBadConn, ran: true})
	if _, err := db.ExecContext(Idempotent(context.Background()), "UPSERT INTO t VALUES (1)"); err != nil {
		t.Fatalf("an idempotent write is handed off: %v", err)
	}
}

// Row: autocommit statement rolled back by the server -> retry on the same
// connection after a backoff.
func TestAutocommitRollbacksAreRetriedOnTheSameConnection(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"pg serialization", errSerialization},
		{"pg deadlock", errDeadlockPG},
		{"pg lock_timeout", &pgError{"55P03", "canceling statement due to lock timeout"}},
		{"mysql deadlock", errDeadlockMy},
		{"mysql lock wait", errLockWaitMy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: tc.err}, step{err: tc.err})
			db, clock := testDB(t, srv)
			if _, err := db.Exec("UPDATE t SET n = n + 1"); err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if n := srv.ranCount("UPDATE"); n != 1 {
				t.Errorf("UPDATE took effect %d times, want 1", n)
			}
			if srv.dials != 1 {
				t.Errorf("dials = %d, want 1 (same connection)", srv.dials)
			}
			if n := len(clock.Sleeps()); n != 2 {
				t.Errorf("sleeps = %d, want 2", n)
			}
			if s := stats(t, db); s.RetriesStatement != 2 {
				t.Errorf("RetriesStatement = %d, want 2", s.RetriesStatement)
			}
		})
	}
}

// Row: autocommit statement lost its connection after it was sent -> a write
// is NOT retried (it may have run); the error says so; the connection goes.
func TestLostAutocommitWriteIsNotRetried(t *testing.T) {
	for _, lost := range []error{errLost, mysql.ErrInvalidConn, syscall.ECONNRESET, &pgError{"57P01", "terminating connection due to administrator command"}} {
		t.Run(lost.Error(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("INSERT", step{err: lost, ran: true})
			db, _ := testDB(t, srv)
			_, err := db.Exec("INSERT INTO ledger VALUES (42)")
			if err == nil {
				t.Fatal("Exec succeeded; a lost write must be reported")
			}
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Errorf("err = %v, want ErrAmbiguousCommit", err)
			}
			if !errors.Is(err, lost) {
				t.Errorf("err = %v does not unwrap to %v", err, lost)
			}
			if errors.Is(err, driver.ErrBadConn) {
				t.Error("err matches driver.ErrBadConn: database/sql would re-run the write")
			}
			if n := srv.ranCount("INSERT"); n != 1 {
				t.Errorf("INSERT ran %d times, want exactly 1", n)
			}
			// The connection is discarded: the next call dials again.
			if _, err := db.Exec("SELECT 1"); err != nil {
				t.Fatal(err)
			}
			if srv.dials != 2 {
				t.Errorf("dials = %d, want 2", srv.dials)
			}
		})
	}
}

// Row: ... retry only if it is a read or the caller marked it idempotent.
func TestLostReadOrIdempotentWriteIsRerun(t *testing.T) {
	t.Run("read", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("SELECT", step{err: errLost})
		db, _ := testDB(t, srv)
		var n int
		if err := db.QueryRow("SELECT n FROM t").Scan(&n); err != nil {
			t.Fatalf("QueryRow: %v", err)
		}
		if srv.dials != 2 {
			t.Errorf("dials = %d, want 2", srv.dials)
		}
	})
	t.Run("idempotent write", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPSERT", step{err: errLost, ran: true})
		db, _ := testDB(t, srv)
		if _, err := db.ExecContext(Idempotent(context.Background()), "UPSERT INTO t VALUES (1)"); err != nil {
			t.Fatalf("Exec: %v", err)
		}
		if n := srv.ranCount("UPSERT"); n != 2 {
			t.Errorf("UPSERT ran %d times, want 2 (the caller said it is idempotent)", n)
		}
	})
	t.Run("not idempotent read", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("SELECT", step{err: errLost, ran: true})
		db, _ := testDB(t, srv)
		_, err := db.QueryContext(NotIdempotent(context.Background()), "SELECT process_payment(1)")
		if !errors.Is(err, ErrAmbiguousCommit) {
			t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
		}
	})
	t.Run("select into is not a read", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("SELECT", step{err: errLost, ran: true})
		db, _ := testDB(t, srv)
		if _, err := db.Query("SELECT * INTO copy FROM t"); !errors.Is(err, ErrAmbiguousCommit) {
			t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
		}
	})
}

// Row: any error inside a transaction -> never retried statement by statement.
func TestNothingIsRetriedInsideATransaction(t *testing.T) {
	for _, e := range []error{errSerialization, errDeadlockMy, errLost, driver.ErrBadConn} {
		t.Run(e.Error(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: e})
			db, _ := testDB(t, srv)
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			_, err = tx.Exec("UPDATE t SET n = 1")
			if !errors.Is(err, e) {
				t.Fatalf("err = %v, want %v", err, e)
			}
			_ = tx.Rollback()
			if s := stats(t, db); s.RetriesStatement+s.HandOffs != 0 {
				t.Errorf("retried inside a transaction: %+v", s)
			}
			if n := len(srv.scripts["UPDATE"]); n != 0 {
				t.Errorf("script not consumed: %d left", n)
			}
		})
	}
}

// Row: the closure swallowed a retryable error and returned nil -> poisoned:
// later statements and COMMIT fail with the original error; nothing commits.
func TestSwallowedDeadlockPoisonsTheTransaction(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE a", step{err: errDeadlockMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("UPDATE a SET n = n - 1"); !errors.Is(err, errDeadlockMy) {
		t.Fatalf("first statement: %v", err)
	}
	// The application ignores the error and goes on.
	_, err = tx.Exec("UPDATE b SET n = n + 1")
	if !errors.Is(err, errDeadlockMy) {
		t.Fatalf("statement after the deadlock: err = %v, want the deadlock", err)
	}
	if err := tx.Commit(); !errors.Is(err, errDeadlockMy) {
		t.Fatalf("Commit: err = %v, want the deadlock", err)
	}
	if srv.committed != 0 || srv.ranCount("UPDATE b") != 0 {
		t.Errorf("a partial write reached the server: committed=%d ran=%v", srv.committed, srv.ran)
	}
	if s := stats(t, db); s.Poisoned != 1 {
		t.Errorf("Poisoned = %d, want 1", s.Poisoned)
	}
}

func TestRollbackToSavepointRevivesTheTransaction(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE a", step{err: errLockWaitMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	tx, _ := db.Begin()
	tx.Exec("SAVEPOINT s1")
	if _, err := tx.Exec("UPDATE a SET n = 1"); err == nil {
		t.Fatal("want the lock wait timeout")
	}
	if _, err := tx.Exec("ROLLBACK TO SAVEPOINT s1"); err != nil {
		t.Fatalf("ROLLBACK TO: %v", err)
	}
	if _, err := tx.Exec("UPDATE b SET n = 1"); err != nil {
		t.Fatalf("after ROLLBACK TO: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
}

// Row: a transaction-aborting error inside RunInTx -> roll back, back off,
// run the closure again from the start.
func TestRunInTxReplaysAbortedTransactions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		where   string
		err     error
		dialect Dialect
	}{
		{"pg serialization on statement", "UPDATE", errSerialization, DialectPostgres},
		{"pg deadlock", "UPDATE", errDeadlockPG, DialectPostgres},
		{"pg serialization at commit", "COMMIT", errSerialization, DialectPostgres},
		{"mysql deadlock", "UPDATE", errDeadlockMy, DialectMySQL},
		{"mysql lock wait", "UPDATE", errLockWaitMy, DialectMySQL},
		{"connection lost before commit", "UPDATE", errLost, DialectPostgres},
		{"begin on a dead server", "BEGIN", &pgError{"57P03", "the database system is starting up"}, DialectPostgres},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(tc.where, step{err: tc.err}, step{err: tc.err})
			db, clock := testDB(t, srv, WithDialect(tc.dialect))
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
				return err
			})
			if err != nil {
				t.Fatalf("RunInTx: %v", err)
			}
			if calls != 3 && tc.where != "BEGIN" {
				t.Errorf("closure ran %d times, want 3", calls)
			}
			if srv.committed != 1 || srv.ranCount("UPDATE") != 1 {
				t.Errorf("committed=%d, UPDATE ran %d times; want exactly once", srv.committed, srv.ranCount("UPDATE"))
			}
			if n := len(clock.Sleeps()); n != 2 {
				t.Errorf("sleeps = %d, want 2", n)
			}
		})
	}
}

func TestRunInTxReplaysWhenTheClosureSwallowedTheDeadlock(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE a", step{err: errDeadlockMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE a SET n = n - 1") // error swallowed
		_, err := tx.ExecContext(ctx, "UPDATE b SET n = n + 1")
		if err != nil {
			return errors.New("transfer failed") // and replaced by the closure's own
		}
		return nil
	})
	if err != nil {
		t.Fatalf("RunInTx: %v", err)
	}
	if calls != 2 || srv.committed != 1 || srv.ranCount("UPDATE b") != 1 || srv.ranCount("UPDATE a") != 1 {
		t.Errorf("calls=%d committed=%d ran=%v; want one clean replay", calls, srv.committed, srv.ran)
	}
}

func TestRunInTxReturnsPermanentErrorsUnchanged(t *testing.T) {
	srv := newFakeServer()
	srv.script("INSERT", step{err: errUnique})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	if err != errUnique {
		t.Fatalf("err = %#v, want the unique violation itself", err)
	}
	if calls != 1 {
		t.Errorf("calls = %d, want 1", calls)
	}
	errBusiness := errors.New("insufficient funds")
	if err := RunInTx(context.Background(), db, nil, func(context.Context, *sql.Tx) error { return errBusiness }); err != errBusiness {
		t.Fatalf("err = %v, want the closure's own error", err)
	}
}

// Row: the connection was lost while COMMIT was in flight -> resolve it,
// never guess.
func TestLostCommitIsResolvedOnPostgres(t *testing.T) {
	run := func(t *testing.T, srv *fakeServer, ctx context.Context) (int, error) {
		db, _ := testDB(t, srv)
		calls := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		return calls, err
	}
	t.Run("it committed: success, no replay", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost, ran: true})
		calls, err := run(t, srv, context.Background())
		if err != nil || calls != 1 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d inserts=%d; want success after one run", err, calls, srv.ranCount("INSERT"))
		}
	})
	t.Run("it did not commit: replay", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost})
		calls, err := run(t, srv, context.Background())
		if err != nil || calls != 2 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d inserts=%d; want one replay and one insert", err, calls, srv.ranCount("INSERT"))
		}
	})
	t.Run("in progress until the old backend is ended", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost, ran: true})
		srv.inflight[701] = 2 // two "in progress" answers, then "committed"
		calls, err := run(t, srv, context.Background())
		if err != nil || calls != 1 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d; want success once the backend finished", err, calls)
		}
		if len(srv.killed) == 0 {
			t.Error("the old backend was not asked to end")
		}
	})
	t.Run("cannot be found out: ErrAmbiguousCommit", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost, ran: true})
		srv.script("SELECT txid_status", step{err: errRefused}) // never reached: see below
		db, _ := testDB(t, srv, WithCommitResolution(false))
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		if !errors.Is(err, ErrAmbiguousCommit) {
			t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
		}
		if !errors.Is(err, errLost) {
			t.Errorf("err = %v does not unwrap to the driver's error", err)
		}
	})
	t.Run("side connection unavailable until the deadline", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost, ran: true})
		db, clock := testDB(t, srv)
		ctx, cancel := context.WithDeadline(context.Background(), clock.Now().Add(2*time.Second))
		defer cancel()
		calls := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')"); err != nil {
				return err
			}
			srv.mu.Lock()
			srv.dialErrs = make([]error, 10000) // every dial from now on fails
			for i := range srv.dialErrs {
				srv.dialErrs[i] = errRefused
			}
			srv.mu.Unlock()
			return nil
		})
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err = %v, calls = %d; want ErrAmbiguousCommit and no replay", err, calls)
		}
	})
}

// Plain users of db.BeginTx get the resolution too.
func TestLostCommitOfPlainTransactionIsResolved(t *testing.T) {
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	db, _ := testDB(t, srv)
	tx, _ := db.Begin()
	tx.Exec("INSERT INTO t VALUES (1)")
	if err := tx.Commit(); err != nil {
		t.Fatalf("Commit = %v; the transaction did commit", err)
	}
}

// Row: breaker open -> fail fast with ErrCircuitOpen, never driver.ErrBadConn.
func TestOpenBreakerFailsFast(t *testing.T) {
	srv := newFakeServer()
	for range 100 {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	db, clock := testDB(t, srv, WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second}), WithoutBudget())
	_, err := db.Exec("SELECT 1")
	if !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	if errors.Is(err, driver.ErrBadConn) {
		t.Fatal("ErrCircuitOpen must not match driver.ErrBadConn")
	}
	dials := srv.dials
	if dials != 5 {
		t.Errorf("dials before opening = %d, want 5", dials)
	}
	for range 10 {
		if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("err = %v, want ErrCircuitOpen", err)
		}
	}
	if srv.dials != dials {
		t.Errorf("the open breaker let %d dials through", srv.dials-dials)
	}
	if s := stats(t, db); s.Breaker != BreakerOpen || s.CircuitRejections < 10 {
		t.Errorf("stats = %+v", s)
	}
	// After the open timeout one probe goes through; its success closes it.
	srv.mu.Lock()
	srv.dialErrs = nil
	srv.mu.Unlock()
	clock.Advance(2 * time.Second)
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatalf("after the open timeout: %v", err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker = %v, want closed", s.Breaker)
	}
}

func TestDeadlocksDoNotOpenTheBreaker(t *testing.T) {
	srv := newFakeServer()
	for range 50 {
		srv.script("UPDATE", step{err: errDeadlockPG})
	}
	db, _ := testDB(t, srv, WithBreaker(Breaker{MinRequests: 5}), WithMaxAttempts(100))
	if _, err := db.Exec("UPDATE t SET n = 1"); err != nil {
		t.Fatal(err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker = %v after contention, want closed", s.Breaker)
	}
}

// Row: budget spent -> stop, return the last error wrapped with ErrBudgetExhausted.
func TestSpentBudgetStopsRetries(t *testing.T) {
	srv := newFakeServer()
	for range 100 {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	db, _ := testDB(t, srv, WithoutBreaker(), WithBudget(Budget{Max: 3, PerSecond: 0.001}), WithMaxAttempts(50))
	_, err := db.Exec("SELECT 1")
	if !errors.Is(err, ErrBudgetExhausted) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("err = %v, want ErrBudgetExhausted wrapping the dial error", err)
	}
	if errors.Is(err, driver.ErrBadConn) {
		t.Fatal("must not match driver.ErrBadConn")
	}
	if srv.dials != 4 {
		t.Errorf("dials = %d, want 4 (first + 3 budgeted retries)", srv.dials)
	}
}

// Row: the next backoff would end after the caller's deadline -> stop now.
func TestNeverSleepsPastTheDeadline(t *testing.T) {
	srv := newFakeServer()
	for range 20 {
		srv.script("UPDATE", step{err: errSerialization})
	}
	db, clock := testDB(t, srv, WithBackoff(Backoff{Initial: 100 * time.Millisecond, Max: time.Second, Jitter: NoJitter, MaxAttempts: 20}))
	ctx, cancel := context.WithDeadline(context.Background(), clock.Now().Add(350*time.Millisecond))
	defer cancel()
	start := clock.Now()
	_, err := db.ExecContext(ctx, "UPDATE t SET n = 1")
	if !errors.Is(err, errSerialization) {
		t.Fatalf("err = %v, want the serialization failure", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Attempts != 3 {
		t.Fatalf("err = %#v, want *Error after 3 attempts (sleeps 100ms, 200ms; 400ms would pass the deadline)", err)
	}
	if slept := clock.Now().Sub(start); slept != 300*time.Millisecond {
		t.Errorf("slept %v, want 300ms", slept)
	}
}

// Row: the caller's own context is cancelled -> stop at once.
func TestCancelledCallerStopsAtOnce(t *testing.T) {
	srv := newFakeServer()
	for range 5 {
		srv.script("UPDATE", step{err: errSerialization})
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	retries := 0
	db, clock := testDB(t, srv, WithObserver(ObserverFunc(func(_ context.Context, e Event) {
		if e.Kind == EventRetry {
			retries++
			cancel() // the caller goes away while sqlretry is about to sleep
		}
	})))
	_, err := db.ExecContext(ctx, "UPDATE t SET n = 1")
	if !errors.Is(err, errSerialization) {
		t.Fatalf("err = %v, want the last error", err)
	}
	if retries != 1 || len(clock.Sleeps()) != 0 {
		t.Errorf("retries=%d sleeps=%v; want a stop before sleeping", retries, clock.Sleeps())
	}
	if left := len(srv.scripts["UPDATE"]); left != 4 {
		t.Errorf("UPDATE was attempted %d times, want 1", 5-left)
	}
}

// An error from Rows.Next comes after rows were consumed: never retried.
func TestRowsErrorsAreNotRetried(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	conn, _ := db.Conn(context.Background())
	defer conn.Close()
	var fc *fakeConn
	conn.Raw(func(dc any) error { fc = UnwrapConn(dc).(*fakeConn); return nil })
	rows, err := db.Query("SELECT n FROM t")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
	}
	rows.Close()
	_ = fc
	if s := stats(t, db); s.RetriesStatement != 0 || s.HandOffs != 0 {
		t.Errorf("stats = %+v", s)
	}
}

// A transaction opened by hand through Exec("BEGIN") is invisible to
// database/sql; sqlretry must not retry statements inside it.
func TestManualTransactionsAreNotRetried(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE", step{err: errDeadlockMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	db.SetMaxOpenConns(1)
	db.Exec("BEGIN")
	if _, err := db.Exec("UPDATE t SET n = 1"); !errors.Is(err, errDeadlockMy) {
		t.Fatalf("err = %v, want the deadlock returned", err)
	}
	if n := srv.ranCount("UPDATE"); n != 0 {
		t.Errorf("UPDATE ran %d times after a deadlock in a manual transaction", n)
	}
	db.Exec("ROLLBACK")
	srv.script("UPDATE", step{err: errDeadlockMy})
	if _, err := db.Exec("UPDATE t SET n = 1"); err != nil {
		t.Fatalf("after ROLLBACK, autocommit retries apply again: %v", err)
	}
}

func TestNoRetryContext(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE", step{err: errSerialization})
	db, _ := testDB(t, srv)
	if _, err := db.ExecContext(NoRetry(context.Background()), "UPDATE t SET n = 1"); err != errSerialization {
		t.Fatalf("err = %v, want the raw error", err)
	}
}

func TestAttemptTimeoutTurnsAHungReadIntoARetry(t *testing.T) {
	srv := newFakeServer()
	srv.script("SELECT", step{err: context.DeadlineExceeded})
	db, _ := testDB(t, srv, WithAttemptTimeout(time.Nanosecond))
	// The fake server fails on a done context; the attempt timeout is ours, so
	// a read is re-run (on a new connection) and a write is ambiguous.
	_, err := db.Query("SELECT 1")
	var e *Error
	if err == nil || !errors.As(err, &e) && !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("read: %v", err)
	}
	_, err = db.Exec("INSERT INTO t VALUES (1)")
	if !errors.Is(err, ErrAmbiguousCommit) {
		t.Fatalf("write after our own timeout: err = %v, want ErrAmbiguousCommit", err)
	}
}

// An engine without txid_current (CockroachDB): the failed
// lookup aborted the transaction before COMMIT, so it is replayed once and
// the lookup is not asked again.
func TestCommitResolutionTurnsItselfOffWithoutTheFunction(t *testing.T) {
	srv := newFakeServer()
	srv.script(pgAskXID, step{err: &pgError{"42883", "function txid_current() does not exist"}})
	db, _ := testDB(t, srv)
	calls := 0
	for range 2 {
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			return err
		})
		if err != nil {
			t.Fatalf("RunInTx: %v", err)
		}
	}
	if calls != 3 || srv.committed != 2 {
		t.Errorf("calls=%d committed=%d; want one replay, then no more lookups", calls, srv.committed)
	}
	if !retrierOf(db).resolution.broken.Load() {
		t.Error("the lookup was not turned off")
	}
}

// A recovering database is not hit by every pooled connection at once.
func TestDialsInFlightAreBounded(t *testing.T) {
	var inFlight, most atomic.Int32
	release := make(chan struct{})
	c := connectorFunc(func(ctx context.Context) (driver.Conn, error) {
		n := inFlight.Add(1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		<-release
		inFlight.Add(-1)
		return &fakeConn{srv: newFakeServer()}, nil
	})
	db := OpenDB(c, WithDialConcurrency(2))
	defer db.Close()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); db.Conn(context.Background()) }()
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if m := most.Load(); m != 2 {
		t.Errorf("at most %d dials were in flight, want 2", m)
	}
}

type connectorFunc func(context.Context) (driver.Conn, error)

func (f connectorFunc) Connect(ctx context.Context) (driver.Conn, error) { return f(ctx) }
func (f connectorFunc) Driver() driver.Driver                            { return fakeDriver{} }

// pgx can report a COMMIT that was written as "conn closed" with
// SafeToRetry() == true (seen on a real server: integration
// TestPostgresLostCommitIsResolved). At COMMIT such a client-side error is
// resolved like a lost connection, never taken as "not sent".
func TestSafeToRetryAtCommitIsNotTrusted(t *testing.T) {
	t.Run("resolved: it committed", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: safeErr{}, ran: true})
		db, _ := testDB(t, srv)
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		if err != nil || calls != 1 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d inserts=%d; want success without a replay", err, calls, srv.ranCount("INSERT"))
		}
	})
	t.Run("no resolution: ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: safeErr{}, ran: true})
		db, _ := testDB(t, srv, WithCommitResolution(false))
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
		}
	})
	t.Run("ErrBadConn keeps the driver contract", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: driver.ErrBadConn})
		db, _ := testDB(t, srv, WithCommitResolution(false))
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		if err != nil || calls != 2 {
			t.Fatalf("err=%v calls=%d; want a replay (nothing was sent)", err, calls)
		}
	})
}

// A poisoned COMMIT is never sent, whatever poisoned it: replay, not ambiguity.
func TestPoisonedByALostConnectionIsReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE a", step{err: errLost})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE a SET n = 1") // error swallowed
		return nil
	})
	if err != nil || calls != 2 || srv.committed != 1 {
		t.Fatalf("err=%v calls=%d committed=%d; want one replay", err, calls, srv.committed)
	}
}

// driver.Tx.Commit takes no context, and go-sql-driver/mysql's COMMIT on a
// silent network blocks until TCP gives up. sqlretry returns at the
// caller's deadline with ErrAmbiguousCommit, and closes the connection only
// after the driver's COMMIT has returned.
func TestMySQLCommitEndsAtTheDeadline(t *testing.T) {
	srv := newFakeServer()
	srv.hangCommit = make(chan struct{})
	// The COMMIT hangs for 5 s: a sqlretry that waited for it fails on
	// the bound below instead of hanging the test; the bound is wide
	// enough for a loaded machine under -race.
	watchdog := time.AfterFunc(5*time.Second, func() { close(srv.hangCommit) })
	wc, _ := WrapConnector(&fakeConnector{srv: srv}, WithDialect(DialectMySQL))
	db := sql.OpenDB(wc)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	late := time.Since(start) - 100*time.Millisecond
	if !errors.Is(err, ErrAmbiguousCommit) {
		t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
	}
	if late > time.Second {
		t.Errorf("returned %v after the deadline", late)
	}
	if n := srv.openConns.Load(); n != 1 && watchdog.Stop() {
		t.Errorf("open connections = %d while the COMMIT is in flight, want 1", n)
	} else if n == 1 && watchdog.Stop() {
		close(srv.hangCommit)
	}
	db.Close()
	for i := 0; i < 100 && srv.openConns.Load() != 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if n := srv.openConns.Load(); n != 0 {
		t.Errorf("the connection was not closed after the COMMIT returned: %d open", n)
	}
}

// The same for ROLLBACK: a poisoned transaction's COMMIT rolls back, and
// on MySQL that ROLLBACK takes no context either.
func TestMySQLRollbackEndsAtTheDeadline(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE", step{err: errDeadlockMy})
	wc, _ := WrapConnector(&fakeConnector{srv: srv}, WithDialect(DialectMySQL))
	db := sql.OpenDB(wc)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	tx.ExecContext(ctx, "UPDATE t SET n = 1") // poisons
	srv.hangCommit = make(chan struct{})
	watchdog := time.AfterFunc(5*time.Second, func() { close(srv.hangCommit) }) // as above
	start := time.Now()
	err = tx.Commit()
	if !errors.Is(err, errDeadlockMy) {
		t.Fatalf("Commit = %v, want the deadlock", err)
	}
	if late := time.Since(start); late > time.Second {
		t.Errorf("Commit of a poisoned transaction took %v with a 100ms deadline", late)
	}
	if watchdog.Stop() {
		close(srv.hangCommit)
	}
}

// Row: breaker open and the caller's deadline reaches past the moment it
// lets a probe through -> wait for that moment (dialling nothing) instead of
// failing: the outage may end within the caller's patience. A deadline that
// ends first still fails fast, without waiting.
func TestOpenBreakerWaitsWhenTheDeadlineAllows(t *testing.T) {
	srv := newFakeServer()
	for range 5 {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	db, clock := testDB(t, srv, WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01}), WithoutBudget())
	if _, err := db.Exec("SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	dials, slept := srv.dials, len(clock.Sleeps())

	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := db.ExecContext(short, "SELECT 1"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("deadline before the probe: err = %v, want ErrCircuitOpen", err)
	}
	if n := len(clock.Sleeps()); n != slept {
		t.Errorf("a caller whose deadline ends first waited: %v", clock.Sleeps()[slept:])
	}

	long, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if _, err := db.ExecContext(long, "SELECT 1"); err != nil {
		t.Fatalf("deadline past the probe: %v", err)
	}
	var waited time.Duration
	for _, d := range clock.Sleeps()[slept:] {
		waited += d
	}
	if waited < 900*time.Millisecond || waited > 1100*time.Millisecond {
		t.Errorf("waited %v, want about the open timeout (1s)", waited)
	}
	if srv.dials != dials+1 {
		t.Errorf("dials while waiting: %d, want only the probe", srv.dials-dials)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed || s.CircuitWaits == 0 {
		t.Errorf("breaker = %v, waits = %d; want closed after one wait", s.Breaker, s.CircuitWaits)
	}
}
