package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Found by a hostile review (2026-12-02) of 76f3674 (a 42501 at the
// short-wait bound's SET is the session's; four refusals in a row pause
// the db's bounds); each test failed before its fix (F3 under -race). The
// comments say what happened before.

// roleRefusalDB is a PostgreSQL fake whose login role may set deadlock_timeout,
// one connection, with its clock.
func roleRefusalDB(t *testing.T) (*fakeServer, *sql.DB, *fakeClock, *deadlockChecks) {
	t.Helper()
	w := &deadlockChecks{deadlockMS: 1000}
	srv := newFakeServer()
	srv.pgAborts = true
	w.install(srv)
	db, clock := testDB(t, srv)
	db.SetMaxOpenConns(1)
	return srv, db, clock, w
}

func (w *deadlockChecks) showCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.shows
}

// roleRefusalReplayBound runs one call whose first attempt deadlocks and says
// whether its replay got a bound set (a SET LOCAL deadlock_timeout that
// the server accepted).
func roleRefusalReplayBound(t *testing.T, srv *fakeServer, db *sql.DB, w *deadlockChecks) bool {
	t.Helper()
	before := len(w.got())
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	return len(w.got()) > before
}

// F1. One call on one session under a role of its own (SET ROLE
// reporting; its login role may set deadlock_timeout) whose closure
// writes a column named role (UPDATE ... SET role = ...: noteRole's "role"
// with "set") and meets four deadlocks in a row: each replay's bound is
// refused, the closure's UPDATE forgets the session's refusal, the next
// replay asks again: four refusals in a row, and the WHOLE db's short
// deadlock checks pause for a minute. After RESET ROLE the session, and
// every other session of the db, replays with the server's
// deadlock_timeout: attack22's defect (one session's temporary role turns
// the checks off for the db), for a minute, then 2, 4, ... up to an hour.
func TestRoleRefusalOneCallDoesNotPauseTheDb(t *testing.T) {
	srv, db, clock, w := roleRefusalDB(t)
	if !roleRefusalReplayBound(t, srv, db, w) {
		t.Fatal("no bound before: the grant is there")
	}
	if _, err := db.Exec("SET ROLE reporting"); err != nil {
		t.Fatal(err)
	}
	for range 10 {
		srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
	}
	for range 4 {
		srv.script("UPDATE", step{err: errDeadlock})
	}
	runs := 0
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "UPDATE accounts SET role = 'member' WHERE id = 1")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("RESET ROLE"); err != nil {
		t.Fatal(err)
	}
	srv.mu.Lock()
	srv.scripts[shortDeadlockSetPrefix] = nil // the role is back: the server accepts the SET again
	srv.mu.Unlock()
	clock.Advance(5 * time.Second) // the db is no longer hot
	if !roleRefusalReplayBound(t, srv, db, w) {
		clock.Advance(shortWaitRelearn)
		t.Errorf("one session's SET ROLE (one call, %d runs) paused short deadlock checks for the whole db: after RESET ROLE a replay got no bound (a minute later: bound %v)", runs, roleRefusalReplayBound(t, srv, db, w))
	}
}

// F2. The pause's doubling is never forgotten: bounds set for a long
// time (here, right after the first pause) do not bring the next pause
// back to a minute. A db that met a few short bursts of refusals over its
// life (four reports under a role, weeks apart) pauses its checks for an
// hour at the next one.
func TestRoleRefusalPauseDoublingResetsOnABound(t *testing.T) {
	srv, db, clock, w := roleRefusalDB(t)
	refuse := func() {
		t.Helper()
		before := w.showCount()
		srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
		if _, err := db.Exec("RESET ROLE"); err != nil { // the session's mark goes
			t.Fatal(err)
		}
		roleRefusalReplayBound(t, srv, db, w)
		if w.showCount() == before {
			t.Fatal("the bound was not asked")
		}
	}
	for cycle := 1; cycle <= 3; cycle++ {
		for range refusalsToPause {
			refuse()
		}
		if roleRefusalReplayBound(t, srv, db, w) {
			t.Fatalf("cycle %d: not paused after %d refusals", cycle, refusalsToPause)
		}
		clock.Advance(shortWaitRelearn + time.Second)
		if !roleRefusalReplayBound(t, srv, db, w) {
			t.Fatalf("cycle %d: the pause after four refusals lasted longer than a minute although bounds were set without refusal for the whole time between (the doubling is never forgotten)", cycle)
		}
		// A day of bounds set without a refusal.
		for range 10 {
			clock.Advance(time.Hour)
			if !roleRefusalReplayBound(t, srv, db, w) {
				t.Fatal("no bound in a healthy stretch")
			}
		}
	}
}

// F4. RESET ROLE sent as a prepared statement (db.Prepare, tx.Prepare, a
// driver or ORM that prepares every statement) is never seen by noteRole
// (stmt.execContext does not call it): the session's replays run with the
// server's deadlock_timeout for up to a minute after its role came back.
func TestRoleRefusalPreparedResetRoleSeen(t *testing.T) {
	srv, db, _, w := roleRefusalDB(t)
	srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
	roleRefusalReplayBound(t, srv, db, w) // refused: the session's mark
	st, err := db.Prepare("RESET ROLE")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Exec(); err != nil {
		t.Fatal(err)
	}
	if !roleRefusalReplayBound(t, srv, db, w) {
		t.Fatal("a prepared RESET ROLE was not seen: the session's replays stay unbounded for up to a minute")
	}
}

// hookClock is a fakeClock whose Now runs hook once, when armed.
type hookClock struct {
	*fakeClock
	armed atomic.Bool
	hook  func()
}

func (c *hookClock) Now() time.Time {
	if c.armed.CompareAndSwap(true, false) {
		c.hook()
	}
	return c.fakeClock.Now()
}

// armConn arms a hookClock when the driver's BeginTx returns: the next
// clock read is runTxOnce's began, right before the bound's check of the
// connection's mark (conn.boundRefused).
type armConnector struct {
	fakeConnector
	arm *atomic.Bool
	on  *atomic.Bool
}

type armConn struct {
	*fakeConn
	arm *atomic.Bool
	on  *atomic.Bool
}

func (c *armConnector) Connect(ctx context.Context) (driver.Conn, error) {
	ci, err := c.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &armConn{fakeConn: ci.(*fakeConn), arm: c.arm, on: c.on}, nil
}

func (c *armConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.fakeConn.BeginTx(ctx, opts)
	if err == nil && c.on.Load() {
		c.arm.Store(true)
	}
	return tx, err
}

// F3 (run with -race). The caller's context ends right after BEGIN of a
// bounded attempt on a connection the db marked (boundRefusedAt):
// database/sql's Tx rolls back from its own goroutine and hands the
// connection to the next caller, whose statement (RESET ROLE: noteRole)
// writes boundRefusedAt while runTxOnce reads it (boundRefused) with no
// lock between: a data race on the pooled connection's field ("read and
// written only by the connection's user" no longer holds). The 42501 path
// writes it the same way after the connection may have been handed over.
func TestRoleRefusalMarkRaceAfterCancel(t *testing.T) {
	w := &deadlockChecks{deadlockMS: 1000}
	srv := newFakeServer()
	srv.pgAborts = true
	w.install(srv)
	var on atomic.Bool
	clock := &hookClock{fakeClock: newFakeClock()}
	clock.armed.Store(false)
	wc, err := WrapConnector(&armConnector{fakeConnector: fakeConnector{srv: srv}, arm: &clock.armed, on: &on},
		WithClock(clock), WithDialect(DialectPostgres))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)

	// The connection is marked, and the db hot.
	srv.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
	roleRefusalReplayBound(t, srv, db, w)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	next := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-next
		_, _ = db.Exec("RESET ROLE") // waits for the connection
	}()
	clock.hook = func() {
		cancel()
		close(next)
		time.Sleep(300 * time.Millisecond) // the other caller has the connection by now
	}
	on.Store(true)
	_ = RunInTx(ctx, db, nil, updateTx)
	on.Store(false)
	wg.Wait()
}

// F5. A closure's own error that carries another sqlretry db's bound
// refusal (a RunInTx on a second db, with a context of its own, that
// ended right after its bound was refused) is taken for this attempt's
// bound refusal (shortWaitRefused looks anywhere in o.err): the closure,
// whose error is final, runs again at once and the call succeeds; the
// first db's refusal count moves (and a non-42501 refusal would turn its
// short waits off for good).
func TestForeignBoundRefusalIsTheClosures(t *testing.T) {
	srv1, db1, _, _ := roleRefusalDB(t)

	// db2: its clock cancels the inner context right after its bound's
	// SET was refused (runTxOnce reads the clock for boundRefusedAt).
	srv2 := newFakeServer()
	srv2.pgAborts = true
	clock2 := &hookClock{fakeClock: newFakeClock()}
	w2 := &deadlockChecks{deadlockMS: 1000}
	w2.install(srv2)
	show := srv2.onQuery
	srv2.onQuery = func(c *fakeConn, q string, args []driver.NamedValue) (driver.Rows, bool) {
		if q == shortDeadlockShow {
			clock2.armed.Store(true)
		}
		return show(c, q, args)
	}
	wc2, err := WrapConnector(&fakeConnector{srv: srv2}, WithClock(clock2), WithDialect(DialectPostgres))
	if err != nil {
		t.Fatal(err)
	}
	db2 := sql.OpenDB(wc2)
	t.Cleanup(func() { db2.Close() })

	srv1.script("UPDATE", step{err: errDeadlock}) // the outer call's first attempt: its replay is bounded
	runs := 0
	err = RunInTx(context.Background(), db1, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "UPDATE t SET v = v + 1"); err != nil {
			return err
		}
		if runs != 2 {
			return nil
		}
		// A step on another db with a context of its own.
		inner, cancel := context.WithCancel(context.Background())
		defer cancel()
		clock2.hook = cancel
		srv2.script("UPDATE", step{err: errDeadlock})
		srv2.script(shortDeadlockSetPrefix, step{err: errRoleRefused()})
		ierr := RunInTx(inner, db2, nil, updateTx)
		var sw *shortWaitError
		t.Logf("the inner call's error: %v (carries a bound refusal: %v)", ierr, errors.As(ierr, &sw))
		return ierr
	})
	if err == nil || runs != 2 {
		t.Fatalf("the closure's own final error (%v) was taken for the bound's refusal: closure ran %d times, want 2 and the error", err, runs)
	}
}
