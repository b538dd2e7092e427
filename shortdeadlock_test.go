package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"sync"
	"testing"
	"time"
)

// Short deadlock checks (WithShortDeadlockCheck, on by default): the same
// bounds as short lock waits, set as the transaction's deadlock_timeout,
// only where the role may set it.

// deadlockChecks records the bounds the short-deadlock statement asked
// for (ms) and answers it as a server whose deadlock_timeout is
// deadlockMS and whose role may (or may not) set it; refuse makes it fail
// (a server before PostgreSQL 15: no has_parameter_privilege).
type deadlockChecks struct {
	mu         sync.Mutex
	asked      []int64
	lockAsked  int // the lock_timeout statement: never in this mode
	deadlockMS int64
	mayNot     bool
	refuse     error
}

func (w *deadlockChecks) install(srv *fakeServer) {
	srv.onQuery = func(_ *fakeConn, q string, args []driver.NamedValue) (driver.Rows, bool) {
		w.mu.Lock()
		defer w.mu.Unlock()
		switch q {
		case shortWaitQuery:
			w.lockAsked++
			return &fakeRows{cols: []string{"set_config", "dt"}, data: [][]driver.Value{{pgMillis(args[0].Value.(int64)), w.deadlockMS}}}, true
		case shortDeadlockQuery:
		default:
			return nil, false
		}
		ms := args[0].Value.(int64)
		w.asked = append(w.asked, ms)
		var set driver.Value
		if !w.mayNot && w.deadlockMS > ms {
			set = pgMillis(ms)
		}
		return &fakeRows{cols: []string{"may", "set_config", "dt"}, data: [][]driver.Value{{!w.mayNot, set, w.deadlockMS}}}, true
	}
	if w.refuse != nil {
		srv.script(shortDeadlockQuery, step{err: w.refuse})
	}
}

func (w *deadlockChecks) got() []int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]int64(nil), w.asked...)
}

func deadlockCheckDB(t *testing.T, w *deadlockChecks, opts ...Option) (*fakeServer, *sql.DB) {
	t.Helper()
	srv := newFakeServer()
	srv.pgAborts = true
	w.install(srv)
	db, _ := testDB(t, srv, opts...)
	return srv, db
}

// By default a replay after a deadlock bounds the wait before the deadlock
// check, doubling per replay of the call until deadlock_timeout; no
// lock_timeout is set; the happy path sends nothing.
func TestShortDeadlockCheckByDefault(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000}
	srv, db := deadlockCheckDB(t, w)
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 0 {
		t.Fatalf("bounds on the happy path: %v", got)
	}
	for range 8 {
		srv.script("UPDATE", step{err: errDeadlock})
	}
	runs := 0
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	}); err != nil {
		t.Fatal(err)
	}
	if runs != 9 {
		t.Fatalf("closure ran %d times, want 9", runs)
	}
	if want := []int64{20, 40, 80, 160, 320, 640}; !sameInts(w.got(), want) {
		t.Fatalf("bounds %v, want %v", w.got(), want)
	}
	if w.lockAsked != 0 {
		t.Fatalf("a lock_timeout was set %d times", w.lockAsked)
	}
}

// A role that may not set deadlock_timeout: the statement says so (no
// error, nothing set), and the db stops asking.
func TestShortDeadlockCheckRoleMayNot(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000, mayNot: true}
	srv, db := deadlockCheckDB(t, w)
	for range 3 {
		srv.script("UPDATE", step{err: errDeadlock}, step{err: errDeadlock})
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	if got := w.got(); len(got) != 1 {
		t.Fatalf("bounds %v, want one question, then none", got)
	}
}

// A server before PostgreSQL 15 refuses the statement (no
// has_parameter_privilege): the attempt runs again at once without it (its
// closure did not run), and the db stops asking.
func TestShortDeadlockCheckRefusedTurnsItselfOff(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000, refuse: &pgError{"42883", "function pg_catalog.has_parameter_privilege(unknown, unknown) does not exist"}}
	srv, db := deadlockCheckDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	runs := 0
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	}); err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Fatalf("closure ran %d times, want 2", runs)
	}
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 0 {
		t.Fatalf("answered after the refusal: %v", got)
	}
	if n := srv.ranCount(shortDeadlockQuery); n > 1 {
		t.Fatalf("the refused statement ran %d times", n)
	}
}

// WithShortDeadlockCheck(false) on the db, or for one call, sends nothing;
// WithShortLockWait(true) sets a lock_timeout instead; MySQL neither.
func TestShortDeadlockCheckOff(t *testing.T) {
	for _, c := range []struct {
		name                   string
		open, call             []Option
		wantDeadlock, wantLock bool
	}{
		{"db option", []Option{WithShortDeadlockCheck(false)}, nil, false, false},
		{"call option", nil, []Option{WithShortDeadlockCheck(false)}, false, false},
		{"short lock waits instead", []Option{WithShortLockWait(true)}, nil, false, true},
		{"mysql", []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("")}, nil, false, false},
		{"default", nil, nil, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := &deadlockChecks{deadlockMS: 1000}
			srv, db := deadlockCheckDB(t, w, c.open...)
			srv.script("UPDATE", step{err: errDeadlock})
			if err := RunInTx(context.Background(), db, nil, updateTx, c.call...); err != nil {
				t.Fatal(err)
			}
			if got := len(w.got()) > 0; got != c.wantDeadlock {
				t.Errorf("deadlock_timeout bounds %v, want some: %v", w.got(), c.wantDeadlock)
			}
			if got := w.lockAsked > 0; got != c.wantLock {
				t.Errorf("lock_timeout bounds %d, want some: %v", w.lockAsked, c.wantLock)
			}
		})
	}
}

// The statement writes nothing: a read-only closure replayed with a bound
// is not asked the lost-COMMIT question of writing transactions.
func TestShortDeadlockCheckDoesNotMakeTheTransactionWriting(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000}
	srv, db := deadlockCheckDB(t, w)
	xid := 0
	inner := srv.onQuery
	srv.onQuery = func(c *fakeConn, q string, args []driver.NamedValue) (driver.Rows, bool) {
		if q == pgAskXID || q == pgAskXIDAndServer {
			xid++
		}
		return inner(c, q, args)
	}
	srv.script("SELECT v FROM t", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, "SELECT v FROM t")
		if err != nil {
			return err
		}
		return rows.Close()
	}); err != nil {
		t.Fatal(err)
	}
	if len(w.got()) != 1 || xid != 0 {
		t.Fatalf("bounds %v, id questions %d; want one bound, no question", w.got(), xid)
	}
}

// A deadlock found under the bound costs, for contention control, what
// PostgreSQL's own deadlock_timeout would have: it would have found it
// then. A lock timeout is the user's in this mode: what it took.
func TestShortDeadlockCheckConflictCost(t *testing.T) {
	s := &shortWait{deadlockMode: true}
	s.deadlock.Store(1000)
	if got := s.conflictCost(20*time.Millisecond, true, errDeadlock); got != time.Second {
		t.Errorf("bounded deadlock: %v, want deadlock_timeout", got)
	}
	if got := s.conflictCost(20*time.Millisecond, false, errDeadlock); got != 20*time.Millisecond {
		t.Errorf("unbounded deadlock: %v, want what it took", got)
	}
	if got := s.conflictCost(20*time.Millisecond, true, errLockTimeout); got != 20*time.Millisecond {
		t.Errorf("lock timeout: %v, want what it took", got)
	}
}
