package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A hostile review of RunInTx with misbehaving closures (2026-12-02). The
// TestClosureReview* tests held when written; the four others failed
// before their fixes, and their comments say what happened then.

// A closure's panic propagates with its own value (any value, an error
// value that is itself retryable, a nil panic), nothing commits, the
// closure runs once, and no connection is left in use.
func TestClosureReviewPanicValuesPropagate(t *testing.T) {
	type boom struct{ n int }
	for name, val := range map[string]any{
		"value":          boom{7},
		"retryableError": error(errDeadlockPG),
		"nil":            nil,
		"string":         "x",
	} {
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer()
			db, _ := testDB(t, srv)
			calls := 0
			var got any
			func() {
				defer func() { got = recover() }()
				_ = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					tx.ExecContext(ctx, "UPDATE t SET n = 1")
					panic(val)
				})
			}()
			if val == nil {
				var pn *runtime.PanicNilError
				if e, ok := got.(error); !ok || !errors.As(e, &pn) {
					t.Errorf("recovered %#v, want *runtime.PanicNilError", got)
				}
			} else if got != val {
				t.Errorf("recovered %#v, want %#v", got, val)
			}
			if calls != 1 || srv.committed != 0 {
				t.Errorf("calls=%d committed=%d", calls, srv.committed)
			}
			if s := db.Stats(); s.InUse != 0 {
				t.Errorf("connections in use after the panic: %d", s.InUse)
			}
		})
	}
}

// runtime.Goexit in a closure (t.FailNow in a helper): it rolls back,
// releases its connection, and the next RunInTx works.
func TestClosureReviewGoexitInClosure(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	l := engage(t, db)
	_ = l
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "UPDATE t SET n = 1")
			runtime.Goexit()
			return nil
		})
	}()
	<-done
	if srv.committed != 0 || db.Stats().InUse != 0 {
		t.Fatalf("committed=%d inUse=%d", srv.committed, db.Stats().InUse)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 2")
		return err
	}); err != nil {
		t.Fatalf("next RunInTx: %v", err)
	}
}

// A RunInTx whose closure panics (or Goexits) is reported to the
// OperationObserver as a call that succeeded: EndOperation gets err == nil
// (otelsqlretry records it as a success, with the success metric).
func TestClosurePanicEndsOperationAsFailure(t *testing.T) {
	srv := newFakeServer()
	rec := &opRecorder{}
	db, _ := testDB(t, srv, WithObserver(rec))
	func() {
		defer func() { recover() }()
		_ = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			tx.ExecContext(ctx, "UPDATE t SET n = 1")
			panic("boom")
		})
	}()
	tr := rec.transcript()
	if strings.Contains(tr, "end tx in=tx err=false") {
		t.Errorf("a panicking RunInTx was ended as a success:\n%s", tr)
	}
}

// The closure writes through the outer *sql.DB (an audit row, autocommit)
// with the closure's own ctx, then its transaction meets a deadlock. The
// autocommit write committed; the replay writes it again. sqlretry can
// see this call (the ctx carries the attempt, and the goroutine is marked
// as inside a closure), as it sees a nested RunInTx that committed.
func TestAutocommitWriteThroughDBInClosureIsNotReplayed(t *testing.T) {
	for _, withCtx := range []bool{true, false} {
		t.Run(fmt.Sprintf("closureCtx=%v", withCtx), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: errDeadlockPG})
			db, _ := testDB(t, srv)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				c := ctx
				if !withCtx {
					c = context.Background()
				}
				if _, err := db.ExecContext(c, "INSERT INTO audit VALUES (1)"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
				return err
			})
			if n := srv.ranCount("INSERT INTO audit"); n != 1 {
				t.Errorf("err=%v calls=%d: the audit row committed %d times (an autocommit write in the closure was replayed)", err, calls, n)
			}
		})
	}
}

// A nested RunInTx marked NoRetry: its conflict is still replayed by the
// outer call, so the nested closure runs twice.
func TestNestedNoRetryIsNotReplayedByOuter(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE inner", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	outer, inner := 0, 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		outer++
		return RunInTx(NoRetry(ctx), db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
			inner++
			_, err := tx2.ExecContext(ctx, "UPDATE inner SET n = 1")
			return err
		})
	})
	if inner != 1 {
		t.Errorf("err=%v: NoRetry nested closure ran %d times (outer %d)", err, inner, outer)
	}
}

// The closure swallows a deadlock, commits itself (ignoring the Commit's
// error) and returns nil: the call must not report success.
func TestClosureReviewSwallowCommitSelfReturnNil(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE a", step{err: errDeadlockMy})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE a SET n = 1")
		tx.ExecContext(ctx, "UPDATE b SET n = 1")
		_ = tx.Commit()
		return nil
	})
	if err == nil || srv.committed != 0 || srv.ranCount("UPDATE b") != 0 {
		t.Errorf("err=%v committed=%d ran=%v calls=%d", err, srv.committed, srv.ran, calls)
	}
	if !errors.Is(err, errDeadlockMy) {
		t.Errorf("err=%v does not show the deadlock", err)
	}
}

// The closure commits itself successfully and then returns an error (or
// a wrapped earlier deadlock): no replay, the work committed once.
func TestClosureReviewCommitSelfThenError(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE a SET n = 1")
		if err := tx.Commit(); err != nil {
			return err
		}
		return fmt.Errorf("after commit: %w", errDeadlockPG)
	})
	if calls != 1 || srv.committed != 1 || srv.ranCount("UPDATE a") != 1 {
		t.Errorf("err=%v calls=%d committed=%d", err, calls, srv.committed)
	}
}

// The closure uses tx from several goroutines; one meets a deadlock that
// nobody returns: the transaction is poisoned and replayed once.
func TestClosureReviewTxFromGoroutines(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE g2", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tx.ExecContext(ctx, fmt.Sprintf("UPDATE g%d SET n = 1", i))
				rows, err := tx.QueryContext(ctx, "SELECT n FROM t")
				if err == nil {
					for rows.Next() {
					}
					rows.Close()
				}
			}()
		}
		wg.Wait()
		return nil
	})
	if err != nil || calls != 2 || srv.committed != 1 || srv.ranCount("UPDATE g2") != 1 {
		t.Errorf("err=%v calls=%d committed=%d ran=%v", err, calls, srv.committed, srv.ran)
	}
}

// The closure leaves a goroutine that keeps using tx (and a failing
// statement) while RunInTx commits and replays.
func TestClosureReviewTxUsedAfterReturn(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE late", step{err: errDeadlockPG}, step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	var wg sync.WaitGroup
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				tx.ExecContext(ctx, "UPDATE late SET n = 1")
				runtime.Gosched()
			}
		}()
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
		return err
	})
	wg.Wait()
	t.Logf("err=%v calls=%d committed=%d", err, calls, srv.committed)
	if err == nil && srv.committed != 1 {
		t.Errorf("success with committed=%d", srv.committed)
	}
	if srv.committed > 1 {
		t.Errorf("committed %d times", srv.committed)
	}
	if s := db.Stats(); s.InUse != 0 {
		t.Errorf("in use: %d", s.InUse)
	}
}

// Many callers at once, each meeting a deadlock now and then, some
// panicking, some returning their own errors: every outcome is right, no
// connection is left in use.
func TestClosureReviewManyCallers(t *testing.T) {
	srv := newFakeServer()
	for range 20 {
		srv.script("UPDATE", step{err: errDeadlockPG})
	}
	db, _ := testDB(t, srv)
	var wg sync.WaitGroup
	var ok, own, panics atomic.Int64
	errOwn := errors.New("own")
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if p := recover(); p != nil {
					if p != any(i) {
						t.Errorf("panic value %v, want %d", p, i)
					}
					panics.Add(1)
				}
			}()
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE t SET n = %d", i)); err != nil {
					return err
				}
				switch i % 4 {
				case 1:
					return errOwn
				case 2:
					panic(i)
				}
				return nil
			})
			switch {
			case err == nil:
				ok.Add(1)
			case err == errOwn:
				own.Add(1)
			default:
				t.Errorf("caller %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 20 || own.Load() != 10 || panics.Load() != 10 || srv.committed != 20 {
		t.Errorf("ok=%d own=%d panics=%d committed=%d", ok.Load(), own.Load(), panics.Load(), srv.committed)
	}
	if s := db.Stats(); s.InUse != 0 {
		t.Errorf("in use: %d", s.InUse)
	}
}

// The closure runs past the caller's deadline and returns nil: nothing
// committed, the error says the deadline.
func TestClosureReviewClosurePastDeadline(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	calls := 0
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE t SET n = 1")
		time.Sleep(80 * time.Millisecond)
		return nil
	})
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || srv.committed != 0 || calls != 1 {
		t.Errorf("err=%v committed=%d calls=%d", err, srv.committed, calls)
	}
}

// The closure returns context.Canceled while ctx is fine: returned as is.
func TestClosureReviewClosureReturnsCanceled(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		tx.ExecContext(ctx, "UPDATE t SET n = 1")
		return context.Canceled
	})
	if err != context.Canceled || calls != 1 || srv.committed != 0 {
		t.Errorf("err=%v calls=%d committed=%d", err, calls, srv.committed)
	}
}

// A nested RunInTx on another, plain *sql.DB that committed: the outer's
// later deadlock is not replayed (the nested work would run twice).
func TestClosureReviewNestedOnPlainDBCommitted(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	srv2 := newFakeServer()
	plainDB := sql.OpenDB(&fakeConnector{srv: srv2})
	defer plainDB.Close()
	for _, own := range []bool{false, true} {
		t.Run(fmt.Sprintf("ownCtx=%v", own), func(t *testing.T) {
			srv2.mu.Lock()
			srv2.ran = nil
			srv2.mu.Unlock()
			srv.script("UPDATE outer", step{err: errDeadlockPG})
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				c := ctx
				if own {
					c = context.Background()
				}
				if err := RunInTx(c, plainDB, nil, func(ctx context.Context, tx2 *sql.Tx) error {
					_, err := tx2.ExecContext(ctx, "INSERT INTO other VALUES (1)")
					return err
				}); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
				return err
			})
			if n := srv2.ranCount("INSERT INTO other"); n != 1 {
				t.Errorf("err=%v: nested work on the other db committed %d times", err, n)
			}
		})
	}
}

// A manual transaction on the outer db, begun and committed inside the
// closure with the closure's ctx, then a deadlock in the outer: replayed,
// the manual transaction's write runs twice.
func TestOwnTxOnDBInClosureIsNotReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		t2, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := t2.ExecContext(ctx, "INSERT INTO side VALUES (1)"); err != nil {
			t2.Rollback()
			return err
		}
		if err := t2.Commit(); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "UPDATE outer SET n = 1")
		return err
	})
	if n := srv.ranCount("INSERT INTO side"); n != 1 {
		t.Errorf("err=%v: side transaction committed %d times", err, n)
	}
}

// The closure starts a nested RunInTx with its ctx on a goroutine it does
// not wait for, and returns a deadlock: the nested call began while the
// attempt ran (so it counts as nested) and commits after the attempt
// ended, writing the outer attempt's state while RunInTx decides.
func TestClosureReviewUnawaitedNestedWithClosureCtx(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv)
	var wg sync.WaitGroup
	release := make(chan struct{})
	first := true
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if first {
			first = false
			started := make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				RunInTx(ctx, db, nil, func(ctx2 context.Context, tx2 *sql.Tx) error {
					close(started)
					<-release
					_, err := tx2.ExecContext(ctx2, "INSERT INTO side VALUES (1)")
					return err
				})
			}()
			<-started
			go func() { time.Sleep(time.Millisecond); close(release) }()
		}
		_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
		return err
	})
	wg.Wait()
	t.Logf("err=%v side=%d", err, srv.ranCount("INSERT INTO side"))
}
