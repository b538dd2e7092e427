package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// Issue 9, bad input: every float and duration field of the options
// refuses NaN, infinities and values that overflow, like the other values
// out of range (Backoff{Multiplier: NaN} removed all backoff; Budget{Max:
// +Inf} overflowed to no retries at all).
func TestOptionsRejectNonFiniteAndOverflowingValues(t *testing.T) {
	nan, inf := math.NaN(), math.Inf(1)
	huge := time.Duration(math.MaxInt64)
	bad := map[string]Option{}
	for name, f := range map[string]float64{"NaN": nan, "+Inf": inf, "-Inf": -inf, "1e300": 1e300} {
		bad["Backoff.Multiplier="+name] = WithBackoff(Backoff{Multiplier: f})
		bad["Budget.Ratio="+name] = WithBudget(Budget{Ratio: f})
		bad["Budget.PerSecond="+name] = WithBudget(Budget{PerSecond: f})
		bad["Budget.Max="+name] = WithBudget(Budget{Max: f})
		bad["Breaker.FailureRatio="+name] = WithBreaker(Breaker{FailureRatio: f})
		bad["Breaker.OpenJitter="+name] = WithBreaker(Breaker{OpenJitter: f})
	}
	delete(bad, "Backoff.Multiplier=1e300") // finite and at least 1: fine, capped by Max
	for name, f := range map[string]float64{"0.5": 0.5, "-1": -1} {
		bad["Backoff.Multiplier="+name] = WithBackoff(Backoff{Multiplier: f})
	}
	for name, f := range map[string]float64{"1.5": 1.5, "-0.1": -0.1} {
		bad["Budget.Ratio="+name] = WithBudget(Budget{Ratio: f})
		bad["Breaker.FailureRatio="+name] = WithBreaker(Breaker{FailureRatio: f})
		bad["Breaker.OpenJitter="+name] = WithBreaker(Breaker{OpenJitter: f})
	}
	for name, d := range map[string]time.Duration{"-1ns": -1, "MaxInt64": huge, "1000h": 1000 * time.Hour} {
		bad["Backoff.Initial="+name] = WithBackoff(Backoff{Initial: d, Max: max(d, time.Second)})
		bad["Backoff.Max="+name] = WithBackoff(Backoff{Max: d})
		bad["Backoff.MaxElapsed="+name] = WithBackoff(Backoff{MaxElapsed: d})
		bad["Breaker.Window="+name] = WithBreaker(Breaker{Window: d})
		bad["Breaker.OpenTimeout="+name] = WithBreaker(Breaker{OpenTimeout: d})
		bad["WithAttemptTimeout="+name] = WithAttemptTimeout(d)
	}
	bad["WithDialConcurrency=MaxInt"] = WithDialConcurrency(math.MaxInt)
	for name, o := range bad {
		t.Run(name, func(t *testing.T) {
			if _, err := Open("pgx", "", o); err == nil || !strings.Contains(err.Error(), "sqlretry") {
				t.Errorf("Open: err = %v, want an option error", err)
			}
			if _, err := WrapConnector(&fakeConnector{srv: newFakeServer()}, o); err == nil {
				t.Error("WrapConnector: no error")
			}
			db := OpenDB(&fakeConnector{srv: newFakeServer()}, o)
			defer db.Close()
			if _, err := db.Exec("SELECT 1"); err == nil {
				t.Error("OpenDB: a call succeeded")
			}
		})
	}
	// The largest values that are still sensible are accepted.
	for name, o := range map[string]Option{
		"Backoff":  WithBackoff(Backoff{Initial: time.Second, Max: time.Hour, Multiplier: 1e300, MaxElapsed: 24 * time.Hour}),
		"Budget":   WithBudget(Budget{Ratio: 1, PerSecond: 1e9, Max: 1e9}),
		"Breaker":  WithBreaker(Breaker{Window: 24 * time.Hour, OpenTimeout: time.Hour, FailureRatio: 1, OpenJitter: 1}),
		"Attempt":  WithAttemptTimeout(24 * time.Hour),
		"Dialling": WithDialConcurrency(1024),
	} {
		if _, err := Open("pgx", "", o); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestRunInTxWithNilContextIsAnError(t *testing.T) {
	db, _ := testDB(t, newFakeServer())
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("RunInTx panicked: %v", p)
		}
	}()
	//lint:ignore SA1012 the nil context is the point of the test
	err := RunInTx(nil, db, nil, func(context.Context, *sql.Tx) error { return nil }) //nolint:staticcheck
	if err == nil || !strings.Contains(err.Error(), "context") {
		t.Fatalf("err = %v, want an error about the nil context", err)
	}
}

// engage puts the db's contention control in its engaged state with room
// for one transaction at a time.
func engage(t *testing.T, db *sql.DB) *txLimiter {
	t.Helper()
	l := retrierOf(db).txLimit
	if l == nil {
		t.Fatal("no contention control")
	}
	l.mu.Lock()
	l.limit, l.ceiling, l.running = 1, 1000, 0
	l.gen++
	l.engaged.Store(true)
	l.mu.Unlock()
	return l
}

// Item 7: a closure that panics gives its contention-control slot back
// (and the panic goes on with its own value); later RunInTx calls run.
func TestRunInTxPanicReleasesTheContentionSlot(t *testing.T) {
	db, _ := testDB(t, newFakeServer())
	l := engage(t, db)
	type boom struct{ n int }
	for i := range 3 {
		func() {
			defer func() {
				if p := recover(); p != (boom{i}) {
					t.Errorf("recovered %v, want the closure's own panic value", p)
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				tx.ExecContext(ctx, "UPDATE t SET n = 1")
				panic(boom{i})
			})
			t.Errorf("RunInTx %d returned %v instead of running the closure", i, err)
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 2")
		return err
	})
	if err != nil {
		t.Fatalf("RunInTx after the panics: %v (contention waits %d)", err, l.queued.Load())
	}
	if n := l.inflight.Load(); n != 0 {
		t.Errorf("transactions in flight after all returned: %d", n)
	}
	l.mu.Lock()
	running := l.running
	l.mu.Unlock()
	if l.engaged.Load() && running != 0 {
		t.Errorf("slots held after all returned: %d", running)
	}
}

// Item 8: one RunInTx that keeps replaying on a lock held outside the db
// (lock_timeout, 55P03) is one caller's trouble, not transactions
// colliding with each other: contention control does not engage, and the
// others never queue behind it.
func TestStuckCallerDoesNotEngageContentionControl(t *testing.T) {
	for _, tc := range []struct {
		name    string
		dialect Dialect
		err     error
	}{
		{"postgres lock_timeout", DialectPostgres, &pgError{"55P03", "canceling statement due to lock timeout"}},
		{"mysql lock wait timeout", DialectMySQL, errLockWaitMy},
		{"postgres serialization failure against an outside writer", DialectPostgres, errSerialization},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			db, clock := testDB(t, srv, WithDialect(tc.dialect), WithMaxAttempts(8))
			db.SetMaxIdleConns(10)
			worker := func() error {
				// A real deadline, far above a transaction's real time even on
				// a loaded machine (20 ms failed there): a worker queued behind
				// the stuck caller's slot would wait for it, and fail.
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				return RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "UPDATE own SET n = n + 1")
					clock.Advance(time.Millisecond)
					return err
				})
			}
			// The others have been committing for a while: 1 ms each, then
			// 20 ms of thinking.
			for range 100 {
				if err := worker(); err != nil {
					t.Fatal(err)
				}
				clock.Advance(20 * time.Millisecond)
			}
			for range 8 {
				srv.script("UPDATE stuck", step{err: tc.err})
			}
			var others, failed int
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				// While the stuck caller waits for the lock, the others
				// commit beside it.
				for range 10 {
					if err := worker(); err != nil {
						failed++
					}
					others++
				}
				clock.Advance(500 * time.Millisecond) // the lock timeout
				_, err := tx.ExecContext(ctx, "UPDATE stuck SET n = n + 1")
				return err
			})
			if !errors.Is(err, tc.err) {
				t.Fatalf("the stuck caller got %v, want its lock timeout", err)
			}
			s := stats(t, db)
			if failed > 0 || s.ContentionCuts != 0 || s.ContentionWaits != 0 {
				t.Errorf("one stuck caller engaged contention control: %d of %d other transactions failed, cuts %d, waits %d",
					failed, others, s.ContentionCuts, s.ContentionWaits)
			}
		})
	}
}

// Item 10: on PostgreSQL any error aborts the transaction, so the first
// error decides, not the 25P02 or the rollback-at-COMMIT that follows a
// swallowed one. A unique violation is not retryable: one run, that error.
func TestRunInTxFirstErrorDecidesOnPostgres(t *testing.T) {
	for _, tc := range []struct {
		name string
		body func(ctx context.Context, tx *sql.Tx) error
	}{
		{"the closure returns the 25P02", func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "INSERT INTO t VALUES (1)") // unique violation, swallowed
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = 2")
			return err
		}},
		{"the closure wraps the 25P02", func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			if _, err := tx.ExecContext(ctx, "UPDATE t SET n = 2"); err != nil {
				return fmt.Errorf("update: %w", err)
			}
			return nil
		}},
		{"the closure ignores the 25P02 and commits", func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			tx.ExecContext(ctx, "UPDATE t SET n = 2")
			return nil
		}},
		{"the closure commits after the swallowed error", func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			return nil
		}},
		{"a query's error", func(ctx context.Context, tx *sql.Tx) error {
			tx.QueryContext(ctx, "INSERT INTO t VALUES (1) RETURNING id")
			var n int
			return tx.QueryRowContext(ctx, "SELECT n FROM t").Scan(&n)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.pgAborts = true
			for range 40 {
				srv.script("INSERT", step{err: errUnique})
			}
			db, _ := testDB(t, srv)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				return tc.body(ctx, tx)
			})
			if calls != 1 || !errors.Is(err, errUnique) {
				t.Fatalf("calls = %d, err = %v; want one run and the unique violation", calls, err)
			}
		})
	}
}

// On MySQL a unique violation does not abort the transaction: a deadlock
// after it is still a replay cause.
func TestRunInTxDeadlockAfterAUniqueViolationOnMySQL(t *testing.T) {
	srv := newFakeServer()
	srv.script("INSERT", step{err: &mysql.MySQLError{Number: 1062, Message: "Duplicate entry '1' for key 'PRIMARY'"}})
	srv.script("UPDATE", step{err: errDeadlockMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "INSERT IGNORE-ish INTO t VALUES (1)") // the caller expects duplicates
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 2")
		return err
	})
	if err != nil || calls != 2 {
		t.Fatalf("calls = %d, err = %v; want the deadlock replayed once", calls, err)
	}
}

// Item 11: only errors the database raised in this attempt are replay
// causes; the closure's own errors come back unchanged after one run.
func TestRunInTxReturnsTheClosuresOwnErrorsUnchanged(t *testing.T) {
	httpErr := &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"truncated JSON", io.ErrUnexpectedEOF},
		{"wrapped truncated JSON", fmt.Errorf("decode order: %w", io.ErrUnexpectedEOF)},
		{"an HTTP call's reset", httpErr},
		{"an HTTP call's dial", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}},
		{"a deadlock error made up by the closure", errDeadlockPG},
		{"sqlretry's own give-up from elsewhere", newError("exec", 30, RetryStatement, nil, errSerialization)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			db, _ := testDB(t, srv)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "UPDATE t SET n = 1"); err != nil {
					return err
				}
				return tc.err
			})
			if calls != 1 || err != tc.err {
				t.Fatalf("calls = %d, err = %v; want one run and the closure's error unchanged", calls, err)
			}
		})
	}
	t.Run("a wrapped database error is still replayed", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPDATE", step{err: errDeadlockPG})
		db, _ := testDB(t, srv)
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "UPDATE t SET n = 1"); err != nil {
				return fmt.Errorf("transfer: %w", err)
			}
			return nil
		})
		if err != nil || calls != 2 {
			t.Fatalf("calls = %d, err = %v; want one replay", calls, err)
		}
	})
}

// Item 12: a give-up is final. A RunInTx nested in another runs inside the
// outer's attempts (5 runs with MaxAttempts 5, not 5x5), and the outer does
// not replay a give-up of something else.
func TestNestedRunInTxDoesNotMultiplyAttempts(t *testing.T) {
	t.Run("inner deadlocks every time", func(t *testing.T) {
		srv := newFakeServer()
		for range 100 {
			srv.script("UPDATE inner", step{err: errDeadlockPG})
		}
		db, _ := testDB(t, srv, WithMaxAttempts(5))
		var outer, inner int
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			outer++
			if _, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1"); err != nil {
				return err
			}
			return RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				inner++
				_, err := tx.ExecContext(ctx, "UPDATE inner SET n = 1")
				return err
			})
		})
		if !errors.Is(err, errDeadlockPG) {
			t.Errorf("err = %v, want the deadlock", err)
		}
		if outer > 5 || inner > 5 {
			t.Errorf("outer ran %d times, inner %d; want at most 5 runs in all", outer, inner)
		}
	})
	t.Run("inner deadlocks once", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPDATE inner", step{err: errDeadlockPG})
		db, _ := testDB(t, srv, WithMaxAttempts(5))
		var outer, inner int
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			outer++
			return RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				inner++
				_, err := tx.ExecContext(ctx, "UPDATE inner SET n = 1")
				return err
			})
		})
		if err != nil || outer+inner > 4 {
			t.Errorf("err = %v, outer %d, inner %d; want success after one replay", err, outer, inner)
		}
	})
	t.Run("an autocommit statement's give-up inside the closure", func(t *testing.T) {
		srv := newFakeServer()
		for range 100 {
			srv.script("UPDATE auto", step{err: errSerialization})
		}
		db, _ := testDB(t, srv, WithMaxAttempts(5))
		outer := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			outer++
			_, err := db.ExecContext(ctx, "UPDATE auto SET n = 1")
			return err
		})
		var own *Error
		if !errors.As(err, &own) || outer != 1 {
			t.Errorf("err = %v, outer ran %d times; want the statement's give-up after one run", err, outer)
		}
	})
}

// Item 13: a timeout that repeats is the closure's, not contention: an
// idle-in-transaction or transaction timeout (and a statement timeout the
// caller's rules make retryable) is replayed at most once.
func TestRunInTxStopsWhenTheSameTimeoutRepeats(t *testing.T) {
	for _, tc := range []struct {
		name    string
		dialect Dialect
		err     error
		opts    []Option
	}{
		{"idle_in_transaction_session_timeout", DialectPostgres, &pgError{"25P03", "terminating connection due to idle-in-transaction timeout"}, nil},
		{"transaction_timeout", DialectPostgres, &pgError{"25P04", "terminating connection due to transaction timeout"}, nil},
		{"statement_timeout made retryable", DialectPostgres, &pgError{"57014", "canceling statement due to statement timeout"},
			[]Option{WithClassifier(func(err error) (Class, bool) {
				var pg interface{ SQLState() string }
				if errors.As(err, &pg) && pg.SQLState() == "57014" {
					return RetryStatement, true
				}
				return 0, false
			})}},
		{"mysql wait_timeout", DialectMySQL, &mysql.MySQLError{Number: 4031, Message: "The client was disconnected by the server because of inactivity."}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			for range 40 {
				srv.script("UPDATE", step{err: tc.err})
			}
			db, _ := testDB(t, srv, append([]Option{WithDialect(tc.dialect)}, tc.opts...)...)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
				return err
			})
			if calls > 2 || !errors.Is(err, tc.err) {
				t.Fatalf("calls = %d, err = %v; want at most one replay and the timeout", calls, err)
			}
		})
	}
}

// Bad input: at a deadline the database's error is kept beside the
// context's, so errors.Is finds the deadline and the message shows why the
// call was being retried.
func TestGiveUpAtTheDeadlineKeepsTheCause(t *testing.T) {
	check := func(t *testing.T, err, cause error) {
		t.Helper()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err = %v does not match context.DeadlineExceeded", err)
		}
		if !errors.Is(err, cause) || !strings.Contains(err.Error(), cause.Error()) {
			t.Errorf("err = %v does not keep the cause %v", err, cause)
		}
		if errors.Is(err, driver.ErrBadConn) {
			t.Errorf("err = %v matches driver.ErrBadConn: database/sql would re-run it", err)
		}
	}
	// The attempt after the last failure blocks until the deadline.
	blockThen := func(n int, cause error) func(ctx context.Context) error {
		var calls atomic.Int64
		return func(ctx context.Context) error {
			if calls.Add(1) <= int64(n) {
				return cause
			}
			<-ctx.Done()
			return ctx.Err()
		}
	}
	t.Run("dial", func(t *testing.T) {
		fail := blockThen(3, errRefused)
		c := connectorFunc(func(ctx context.Context) (driver.Conn, error) { return nil, fail(ctx) })
		clock := newFakeClock()
		db := OpenDB(c, WithClock(clock))
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		check(t, db.PingContext(ctx), syscall.ECONNREFUSED)
	})
	t.Run("dial stopped before the deadline", func(t *testing.T) {
		c := connectorFunc(func(ctx context.Context) (driver.Conn, error) { return nil, errRefused })
		clock := newFakeClock()
		db := OpenDB(c, WithClock(clock), WithBackoff(Backoff{Initial: time.Second, Max: time.Second, Jitter: NoJitter}))
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
		defer cancel()
		check(t, db.PingContext(ctx), syscall.ECONNREFUSED)
	})
	t.Run("autocommit statement", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPDATE", step{err: errSerialization}, step{err: errSerialization}, step{block: true})
		db, _ := testDB(t, srv)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := db.ExecContext(ctx, "UPDATE t SET n = 1")
		check(t, err, errSerialization)
	})
	t.Run("RunInTx", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("UPDATE", step{err: errDeadlockPG}, step{err: errDeadlockPG}, step{block: true})
		db, _ := testDB(t, srv)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
			return err
		})
		check(t, err, errDeadlockPG)
	})
}

// cancellingClock is a fake clock whose sleeps are cut by the caller's
// cancellation, which comes during the first sleep.
type cancellingClock struct {
	*fakeClock
	cancel context.CancelFunc
}

func (c cancellingClock) Sleep(ctx context.Context, d time.Duration) error {
	c.cancel()
	return ctx.Err()
}

// A call that waits for an open breaker's probe and is cancelled meanwhile
// says both: the breaker, and the caller's cancellation.
func TestRefusalAfterACancelledWaitSaysSo(t *testing.T) {
	srv := newFakeServer()
	for range 5 {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	clock := cancellingClock{newFakeClock(), func() {}}
	wc, err := WrapConnector(&fakeConnector{srv: srv}, WithClock(clock), WithDialect(DialectPostgres),
		WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01}), WithoutBudget(), WithMaxAttempts(5))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	defer db.Close()
	db.Exec("SELECT 1") // the dials fail, the breaker opens
	clock.cancel = cancel
	retrierOf(db).clock = clock
	_, err = db.ExecContext(ctx, "SELECT 1")
	if !errors.Is(err, ErrCircuitOpen) || !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want ErrCircuitOpen and context.Canceled", err)
	}
}

// A RunInTx nested in a closure commits its own transaction: once it has,
// replaying the outer closure would run the inner write again. So an outer
// attempt in which a nested RunInTx committed is never replayed.
func TestOuterIsNotReplayedAfterANestedRunInTxCommitted(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv, WithMaxAttempts(5))
	var outer, inner int
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		outer++
		if err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			inner++
			_, err := tx.ExecContext(ctx, "INSERT INTO inner_log VALUES (1)")
			return err
		}); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
		return err
	})
	if outer != 1 || inner != 1 {
		t.Errorf("outer ran %d times, inner %d: the inner transaction had committed, a replay writes it again", outer, inner)
	}
	if !errors.Is(err, errDeadlockPG) {
		t.Errorf("err = %v, want the deadlock", err)
	}
	if n := srv.ranCount("INSERT INTO inner_log"); n != 1 {
		t.Errorf("the inner write committed %d times, want 1", n)
	}
}

// The same with the nested RunInTx given a context of its own (a helper
// that writes an audit row with context.Background(), say) on the
// closure's goroutine: it cannot be seen through the context, but it is
// on the outer attempt's stack, and it committed all the same.
func TestOuterIsNotReplayedAfterANestedRunInTxWithItsOwnContextCommitted(t *testing.T) {
	for _, tc := range []struct {
		name  string
		other bool // the nested RunInTx runs on another sqlretry *sql.DB
	}{{"same db", false}, {"another sqlretry db", true}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE outer", step{err: errDeadlockPG})
			db, _ := testDB(t, srv, WithMaxAttempts(5))
			innerDB := db
			if tc.other {
				innerDB, _ = testDB(t, srv, WithMaxAttempts(5))
			}
			var outer, inner int
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				outer++
				if err := RunInTx(context.Background(), innerDB, nil, func(ctx context.Context, tx *sql.Tx) error {
					inner++
					_, err := tx.ExecContext(ctx, "INSERT INTO inner_log VALUES (1)")
					return err
				}); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
				return err
			})
			if outer != 1 || inner != 1 {
				t.Errorf("outer ran %d times, inner %d: the inner transaction had committed, a replay writes it again", outer, inner)
			}
			if !errors.Is(err, errDeadlockPG) {
				t.Errorf("err = %v, want the deadlock", err)
			}
			if n := srv.ranCount("INSERT INTO inner_log"); n != 1 {
				t.Errorf("the inner write committed %d times, want 1", n)
			}
		})
	}
}

// A RunInTx on another goroutine with its own context that committed
// before the outer attempt began (or on a goroutine unrelated to it) does
// not stop the outer's replay.
func TestOuterIsReplayedWhenAnUnrelatedRunInTxCommitted(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv, WithMaxAttempts(5))
	outer := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		outer++
		if outer == 1 {
			done := make(chan error)
			go func() {
				done <- RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO other VALUES (1)")
					return err
				})
			}()
			if err := <-done; err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
		return err
	})
	if err != nil || outer != 2 {
		t.Errorf("err = %v, outer ran %d times; want one replay and success", err, outer)
	}
}

// The record of a nested commit is dropped once the outermost RunInTx on
// its goroutine returns: the map does not grow with the goroutines.
func TestNestedCommitRecordsAreDropped(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				return RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO inner_log VALUES (1)")
					return err
				})
			})
		}()
	}
	wg.Wait()
	n := 0
	nestedCommitted.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Errorf("%d records of nested commits left", n)
	}
}

// Inside a transaction every statement-level class becomes the
// transaction's (ERRORS.md rule 1): a RunInTx give-up on a serialization
// failure reports RetryTransaction, not RetryStatement.
func TestRunInTxGiveUpReportsTheTransactionClass(t *testing.T) {
	srv := newFakeServer()
	for range 3 {
		srv.script("UPDATE", step{err: errSerialization})
	}
	db, _ := testDB(t, srv, WithMaxAttempts(3))
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
		return err
	})
	var e *Error
	if !errors.As(err, &e) || e.Op != "tx" {
		t.Fatalf("err = %v, want sqlretry's give-up", err)
	}
	if e.Class != RetryTransaction {
		t.Errorf("Class = %v, want %v", e.Class, RetryTransaction)
	}
}

// A give-up says how many attempts ran: with WithMaxAttempts(1) the
// closure ran once and the error said "gave up after 2 attempts" (found
// by a hostile tester, attack5).
func TestRunInTxGiveUpCountsTheAttemptsThatRan(t *testing.T) {
	for _, n := range []int{1, 2, 3} {
		srv := newFakeServer()
		for range n {
			srv.script("UPDATE", step{err: errSerialization})
		}
		db, _ := testDB(t, srv, WithMaxAttempts(n))
		runs := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
			return err
		})
		var e *Error
		switch {
		case runs != n:
			t.Errorf("MaxAttempts(%d): ran %d times", n, runs)
		case n == 1 && (errors.As(err, &e) || !strings.Contains(fmt.Sprint(err), "40001")):
			// One attempt, no retry: the driver's error as it came.
			t.Errorf("MaxAttempts(1): err = %v, want the driver's error unchanged", err)
		case n > 1 && (!errors.As(err, &e) || e.Attempts != n):
			t.Errorf("MaxAttempts(%d): err = %v, want a give-up after %d attempts", n, err, n)
		}
	}
}

// A closure may keep its context after RunInTx returned (a goroutine it
// started, a struct it stored it in). That context still carries the
// caller's values and cancellation, and a RunInTx given it later is not
// nested in the attempt that is over: it has its own replays.
func TestKeptClosureContextAfterRunInTx(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithMaxAttempts(5))
	type key struct{}
	parent, cancel := context.WithCancel(context.WithValue(context.Background(), key{}, "v"))
	defer cancel()
	var kept []context.Context
	for range 48 {
		if err := RunInTx(parent, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			kept = append(kept, ctx)
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[context.Context]bool{}
	for _, ctx := range kept {
		if seen[ctx] {
			t.Fatal("two calls' closures were given the same context")
		}
		seen[ctx] = true
	}
	ctx := kept[0]
	if v, _ := ctx.Value(key{}).(string); v != "v" {
		t.Errorf("kept context's value %q, want v", v)
	}
	srv.script("UPDATE later", step{err: errDeadlockPG})
	runs := 0
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "UPDATE later SET n = 1")
		return err
	})
	if err != nil || runs != 2 {
		t.Errorf("RunInTx with a kept context: err = %v after %d runs; want its own replay (2 runs)", err, runs)
	}
	// Meanwhile another call runs its closure: the kept context is not
	// taken for that call's either.
	var wg sync.WaitGroup
	inside, release := make(chan struct{}), make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = RunInTx(parent, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	srv.script("UPDATE later", step{err: errDeadlockPG})
	runs = 0
	err = RunInTx(kept[len(kept)-1], db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "UPDATE later SET n = 1")
		return err
	})
	close(release)
	wg.Wait()
	if err != nil || runs != 2 {
		t.Errorf("RunInTx with a kept context while another closure runs: err = %v after %d runs; want 2 runs", err, runs)
	}
	cancel()
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Errorf("kept context's Err after the caller's cancel: %v", ctx.Err())
	}
	<-ctx.Done()
}
