package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Short deadlock checks (WithShortDeadlockCheck, on by default): the same
// bounds as short lock waits, set as the transaction's deadlock_timeout,
// only where the role may set it.

// deadlockChecks records the bounds the short-deadlock statements set
// (ms) and answers SHOW as a server whose session deadlock_timeout is
// deadlockMS; mayNot refuses the SET as for a role without the privilege
// (42501), refuse fails the SHOW (an engine without the setting).
type deadlockChecks struct {
	mu         sync.Mutex
	asked      []int64
	shows      int
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
		case shortLockShow:
			w.lockAsked++
			return &fakeRows{cols: []string{"lock_timeout"}, data: [][]driver.Value{{"0"}}}, true
		case shortDeadlockShow:
			w.shows++
			return &fakeRows{cols: []string{"deadlock_timeout"}, data: [][]driver.Value{{pgMillis(w.deadlockMS)}}}, true
		}
		return nil, false
	}
	srv.onExec = func(_ *fakeConn, q string) {
		if !strings.HasPrefix(q, shortDeadlockSetPrefix) {
			return
		}
		ms, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimPrefix(q, shortDeadlockSetPrefix), shortLockMark), 10, 64)
		w.mu.Lock()
		w.asked = append(w.asked, ms)
		w.mu.Unlock()
	}
	if w.mayNot {
		for range 20 {
			srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
		}
	}
	if w.refuse != nil {
		srv.script(shortDeadlockShow, step{err: w.refuse})
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

// A role that may not set deadlock_timeout: the SET is refused (42501),
// the attempt runs again at once without it (its closure not having run),
// no error reaches the caller, and the db stops asking.
func TestShortDeadlockCheckRoleMayNot(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000, mayNot: true}
	srv, db := deadlockCheckDB(t, w)
	runs := 0
	for range 3 {
		srv.script("UPDATE", step{err: errDeadlock}, step{err: errDeadlock})
		if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			return updateTx(ctx, tx)
		}); err != nil {
			t.Fatal(err)
		}
	}
	if runs != 9 {
		t.Fatalf("closure ran %d times, want 9 (3 a call: the refused attempt never ran it)", runs)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.shows != 1 || len(w.asked) != 0 {
		t.Fatalf("SHOW %d times, bounds set %v; want one SHOW, one refused SET, then nothing", w.shows, w.asked)
	}
}

// An engine without the setting refuses the SHOW: the attempt runs again
// at once without it (its closure did not run), and the db stops asking.
func TestShortDeadlockCheckRefusedTurnsItselfOff(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000, refuse: &pgError{"42704", `unrecognized configuration parameter "deadlock_timeout"`}}
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
	if w.shows != 0 {
		t.Fatalf("SHOW answered %d times after the refusal", w.shows)
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

// A deadlock found under the short deadlock_timeout that the closure
// handles itself (a savepoint handler that commits a "busy" branch, its
// own error): the plain driver may have left the cycle to the other
// transaction to find, and this one would have waited and done the work.
// The attempt is not committed; it is replayed with the server's
// deadlock_timeout (attack12).
func TestShortDeadlockCheckOwnDeadlockHandledByTheClosure(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(ctx context.Context, tx *sql.Tx) (busy bool, err error)
	}{
		{"savepoint handler commits its busy branch", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
				return false, err
			}
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "40P01" {
					return false, err
				}
				if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
					return false, err
				}
				_, err := tx.ExecContext(ctx, "INSERT INTO busy VALUES (1)")
				return true, err
			}
			return false, nil
		}},
		{"closure returns its own error", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "40P01" {
					return false, err
				}
				return true, errBusy
			}
			return false, nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &deadlockChecks{deadlockMS: 1000}
			srv, db := deadlockCheckDB(t, w)
			srv.pgAborts = false // the fake's savepoints
			// The first attempt's deadlock is the server's own (no bound
			// yet); the second, under the bound, is the one handled.
			srv.script("UPDATE", step{err: errSerialize}, step{err: errDeadlock})
			runs, busy := 0, 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				b, err := tc.fn(ctx, tx)
				if b {
					busy++
				}
				return err
			})
			if err != nil || runs != 3 {
				t.Fatalf("err %v, runs %d: want the third attempt's commit", err, runs)
			}
			// After a handler the next attempt has the server's
			// deadlock_timeout; an error of the closure's own is replayed
			// as the deadlock before it, whose bound doubles.
			if got := len(w.got()); got != 1 && (tc.name != "closure returns its own error" || got != 2) {
				t.Fatalf("bounds %v: want one (the first replay), the next with the server's", w.got())
			}
			if n := srv.ranCount("INSERT INTO busy"); n != 0 {
				t.Fatalf("the busy branch committed %d times", n)
			}
		})
	}
}

var errBusy = errors.New("busy, try later")

// parsePgMillis reads what pgMillis writes (SHOW's units), and nothing
// else.
func TestParsePgMillis(t *testing.T) {
	for _, ms := range []int64{0, 5, 20, 999, 1000, 1500, 60000, 90000, 3600000, 86400000, 172800000} {
		if got, ok := parsePgMillis(pgMillis(ms)); !ok || got != ms {
			t.Errorf("parsePgMillis(%q) = %d, %v; want %d", pgMillis(ms), got, ok, ms)
		}
	}
	for _, s := range []string{"", "ms", "-5ms", "1.5s", "10us"} {
		if got, ok := parsePgMillis(s); ok {
			t.Errorf("parsePgMillis(%q) = %d, want no parse", s, got)
		}
	}
}

// The bound is rounded up to the grid; one that would then reach the
// session's deadlock_timeout takes the grid's step below instead, so that
// the top bound (just under deadlock_timeout) is still set: a 7 ms commit
// gives a top bound of 896 ms, which rounded up (1,280 ms) was not set at
// all under a deadlock_timeout of 1 s.
func TestShortDeadlockCheckTopBoundStepsDown(t *testing.T) {
	ctx := context.Background()
	w := &deadlockChecks{deadlockMS: 1000}
	_, db := deadlockCheckDB(t, w)
	s := &shortWait{deadlockMode: true}
	for _, tc := range []struct {
		d    time.Duration
		want int64 // 0: nothing set
	}{
		{15 * time.Millisecond, 20},
		{300 * time.Millisecond, 320},
		{600 * time.Millisecond, 640},
		{896 * time.Millisecond, 640},
	} {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		before := len(w.got())
		b, err := s.setDeadlock(ctx, tx, tc.d)
		own := b.ms > 0
		_ = tx.Rollback()
		got := w.got()[before:]
		if err != nil || !own || len(got) != 1 || got[0] != tc.want {
			t.Errorf("bound %v: set %v, own %v, err %v; want %d ms", tc.d, got, own, err, tc.want)
		}
	}
}

// A role of the session's own (SET ROLE for a report, RESET ROLE after)
// that may not set deadlock_timeout, on a db whose login role may and
// did: the refusal is that connection's, not the db's (attack22). The
// connection's replays run unbounded until a statement on it may change
// its role back (RESET ROLE), or a minute has passed; the db's other
// connections, and that one after RESET ROLE, keep their bounds.
func TestShortDeadlockCheckSessionRoleRefusalIsTheConnections(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000}
	srv, db := deadlockCheckDB(t, w)
	db.SetMaxOpenConns(1)
	replay := func() int { t.Helper(); return deadlockReplay(t, srv, db) }
	if runs := replay(); runs != 2 || len(w.got()) != 1 {
		t.Fatalf("before: runs %d, bounds %v; want 2 runs, one bound", runs, w.got())
	}
	// The session's SET ROLE: its next bound is refused.
	srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
	if _, err := db.Exec("SET ROLE reporting"); err != nil {
		t.Fatal(err)
	}
	if runs := replay(); runs != 2 {
		t.Fatalf("refused: closure ran %d times, want 2 (the refused attempt never ran it)", runs)
	}
	if runs := replay(); runs != 2 || len(w.got()) != 1 {
		t.Fatalf("under the role: runs %d, bounds %v; want no bound asked on the connection that refused", runs, w.got())
	}
	if _, err := db.Exec("RESET ROLE"); err != nil {
		t.Fatal(err)
	}
	if runs := replay(); runs != 2 || len(w.got()) < 2 {
		t.Fatalf("after RESET ROLE: runs %d, bounds %v; want the bound again (the db did not turn them off)", runs, w.got())
	}
}

// attack23: two sessions under a role of their own refused before the
// db ever set a bound do not turn the checks off for the db: after RESET
// ROLE the bound is set again at once.
func TestShortDeadlockCheckRefusalsBeforeAnyBoundStayTheSessions(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000}
	srv, db := deadlockCheckDB(t, w)
	db.SetMaxOpenConns(1)
	for range 2 {
		srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
		deadlockReplay(t, srv, db)
		if _, err := db.Exec("RESET ROLE"); err != nil { // the session's mark goes
			t.Fatal(err)
		}
	}
	deadlockReplay(t, srv, db)
	if got := w.got(); len(got) == 0 {
		t.Fatalf("no bound after two sessions' refusals and RESET ROLE: the db turned the checks off")
	}
}

// A role that may never set it (or whose grant was revoked while the db
// runs): after a few refusals in a row, with no bound set between them,
// the db stops asking for a minute, then twice as long each time, up to
// an hour; it asks again after that (attack23: a revoked grant was asked
// at nearly every replay, on every new session).
func TestShortDeadlockCheckRepeatedRefusalsPauseTheDb(t *testing.T) {
	srv, db, clock, w := roleRefusalDB(t)
	sets := w.showCount
	replay := func() { t.Helper(); deadlockReplay(t, srv, db) }
	replay() // a bound set: the grant was there
	for range 40 {
		srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
	}
	before := sets()
	for range 10 {
		if _, err := db.Exec("RESET ROLE"); err != nil { // as a closure's tenant idiom did
			t.Fatal(err)
		}
		replay()
	}
	if asked := sets() - before; asked > 4 {
		t.Fatalf("asked %d times in 10 replays after the grant went; want the db to stop after a few", asked)
	}
	before = sets()
	clock.Advance(61 * time.Second)
	replay()
	if sets() == before {
		t.Fatalf("not asked again after the pause")
	}
}

// errRoleRefused is the server's refusal of the bound's SET to a role
// that may not set deadlock_timeout (the attack22/23 tests).
func errRoleRefused() error {
	return &pgError{"42501", `permission denied to set parameter "deadlock_timeout"`}
}

// deadlockReplay runs updateTx through RunInTx with its UPDATE scripted
// to deadlock once, and says how many times the closure ran.
func deadlockReplay(t *testing.T, srv *fakeServer, db *sql.DB) int {
	t.Helper()
	srv.script("UPDATE", step{err: errDeadlock})
	runs := 0
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	}); err != nil {
		t.Fatal(err)
	}
	return runs
}
