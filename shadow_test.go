package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
)

// eventLog records events.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) Observe(_ context.Context, e Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
}
func (l *eventLog) shadow() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var s []Event
	for _, e := range l.events {
		if e.Shadow {
			s = append(s, e)
		}
	}
	return s
}

// In shadow mode a serialization failure comes back as the driver's error,
// after one attempt, as from the plain driver; the retry enforcement would
// have made is reported. Switched to enforcement, the same failure is
// retried.
func TestShadowReturnsTheDriversErrorAndReportsTheRetry(t *testing.T) {
	srv := newFakeServer()
	log := &eventLog{}
	db, clock := testDB(t, srv, WithShadow(true), WithObserver(log))
	srv.script("UPDATE", step{err: errSerialization})
	_, err := db.Exec("UPDATE t SET v = 1")
	if err != errSerialization {
		t.Fatalf("shadow: err = %#v, want the driver's error itself", err)
	}
	if len(clock.Sleeps()) != 0 {
		t.Errorf("shadow: slept %v", clock.Sleeps())
	}
	ev := log.shadow()
	if len(ev) != 1 || ev[0].Kind != EventRetry || ev[0].Class != RetryStatement || ev[0].Delay <= 0 {
		t.Fatalf("shadow events %+v, want one retry of class %v with a delay", ev, RetryStatement)
	}
	if s := stats(t, db); s.ShadowDecisions != 1 || s.RetriesStatement != 0 {
		t.Errorf("stats: shadow decisions %d, statement retries %d; want 1, 0", s.ShadowDecisions, s.RetriesStatement)
	}

	if !SetShadow(db, false) || ShadowOf(db) {
		t.Fatal("SetShadow(false) did not switch")
	}
	srv.script("UPDATE", step{err: errSerialization})
	if _, err := db.Exec("UPDATE t SET v = 1"); err != nil {
		t.Fatalf("enforce: %v", err)
	}
	if s := stats(t, db); s.RetriesStatement != 1 || s.ShadowDecisions != 1 {
		t.Errorf("enforce: statement retries %d, shadow decisions %d; want 1, 1", s.RetriesStatement, s.ShadowDecisions)
	}
	if SetShadow(sql.OpenDB(&fakeConnector{srv: srv}), true) {
		t.Error("SetShadow on a plain db said true")
	}
}

// Dials refused until the breaker opens: in shadow mode each call gets the
// driver's dial error, as from the plain driver, and once the server is
// back the next call runs, where enforcement would have refused it.
func TestShadowDoesNotRefuseWhenTheBreakerIsOpen(t *testing.T) {
	srv := newFakeServer()
	log := &eventLog{}
	db, _ := testDB(t, srv, WithShadow(true), WithObserver(log), WithBreaker(Breaker{ConsecutiveDialFailures: 2}))
	srv.dialErrs = []error{errRefused, errRefused}
	for i := range 2 {
		if _, err := db.Exec("UPDATE t SET v = 1"); !errors.Is(err, errRefused) || errors.As(err, new(*Error)) {
			t.Fatalf("call %d: %v, want the driver's dial error", i, err)
		}
	}
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("breaker %v, want open (it follows the outcomes in shadow mode)", s.Breaker)
	}
	if _, err := db.Exec("UPDATE t SET v = 1"); err != nil {
		t.Fatalf("call with the breaker open: %v, want it run", err)
	}
	var refusals, dialRetries int
	for _, e := range log.shadow() {
		switch {
		case e.Kind == EventGiveUp && errors.Is(e.Err, ErrCircuitOpen):
			refusals++
		case e.Kind == EventRetry && e.Op == "dial":
			dialRetries++
		}
	}
	if refusals == 0 || dialRetries != 2 {
		t.Errorf("shadow events: %d refusals, %d dial retries; want some, 2", refusals, dialRetries)
	}
}

// RunInTx in shadow mode runs fn once and returns the database's error; the
// replay is reported.
func TestShadowRunInTxRunsOnce(t *testing.T) {
	srv := newFakeServer()
	log := &eventLog{}
	db, _ := testDB(t, srv, WithShadow(true), WithObserver(log))
	srv.script("INSERT", step{err: errDeadlockPG})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	if runs != 1 || !errors.Is(err, errDeadlockPG) || errors.As(err, new(*Error)) {
		t.Fatalf("runs %d, err %v; want 1 run and the driver's deadlock error", runs, err)
	}
	ev := log.shadow()
	if len(ev) != 1 || ev[0].Kind != EventRetry || ev[0].Op != "tx" {
		t.Fatalf("shadow events %+v, want one replay of the transaction", ev)
	}
	if s := stats(t, db); s.RetriesTransaction != 0 || s.ContentionWaits != 0 {
		t.Errorf("stats: %+v", s)
	}
}

// Switching between shadow and enforcement while calls run: each call
// follows one mode to its end. A failure is retried (and the call
// succeeds) or returned as the driver's error with one shadow decision:
// never half of each. Run with -race.
func TestSetShadowUnderConcurrentTraffic(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithBreaker(Breaker{MinRequests: 1 << 30}))
	db.SetMaxOpenConns(8)
	const workers, calls = 8, 150
	for range workers * calls {
		srv.script("UPDATE", step{err: errSerialization}, step{})
	}
	var wg sync.WaitGroup
	var failed atomic.Int64
	stop := make(chan struct{})
	go func() {
		on := false
		for {
			select {
			case <-stop:
				return
			default:
				on = !on
				SetShadow(db, on)
			}
		}
	}()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range calls {
				_, err := db.Exec("UPDATE t SET v = 1")
				switch {
				case err == nil:
				case err == errSerialization:
					failed.Add(1)
				default:
					t.Errorf("unexpected error %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	s := stats(t, db)
	if s.ShadowDecisions != failed.Load() {
		t.Errorf("shadow decisions %d, calls that returned the driver's error %d: want equal", s.ShadowDecisions, failed.Load())
	}
	if failed.Load() == 0 || s.RetriesStatement == 0 {
		t.Logf("only one mode was seen: %d shadow failures, %d retries", failed.Load(), s.RetriesStatement)
	}
}

// With the breaker open, RunInTx with WithFallback runs the fallback with
// the reason instead of returning ErrCircuitOpen; fn does not run.
func TestRunInTxFallbackWhenTheBreakerIsOpen(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithBreaker(Breaker{ConsecutiveDialFailures: 2}), WithMaxAttempts(2))
	srv.dialErrs = []error{errRefused, errRefused}
	if _, err := db.Exec("UPDATE t SET v = 1"); err == nil {
		t.Fatal("no error with the dials refused")
	}
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("breaker %v, want open", s.Breaker)
	}
	fromCache := errors.New("served from the cache")
	var reason error
	ran := false
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		ran = true
		return nil
	}, WithFallback(func(ctx context.Context, why error) error {
		reason = why
		return fromCache
	}))
	if err != fromCache || ran || !errors.Is(reason, ErrCircuitOpen) {
		t.Fatalf("err %v, fn ran %v, reason %v; want the fallback's result, fn not run, reason ErrCircuitOpen", err, ran, reason)
	}
	// Without the option the error is ErrCircuitOpen.
	if err := RunInTx(context.Background(), db, nil, func(context.Context, *sql.Tx) error { return nil }); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("without fallback: %v", err)
	}
	if _, err := newConfig([]Option{WithFallback(nil)}); err == nil {
		t.Error("WithFallback(nil) accepted")
	}
}

// What the fault suite's kills do, in shadow mode: a read that lost its
// connection and a COMMIT that lost its connection come back as the
// driver's errors, and the hand-off and the resolution enforcement would
// have made are reported.
func TestShadowReportsLostConnectionsAndLostCommits(t *testing.T) {
	srv := newFakeServer()
	log := &eventLog{}
	db, _ := testDB(t, srv, WithShadow(true), WithObserver(log))
	srv.script("SELECT n", step{err: errLost, closes: true})
	var n int
	if err := db.QueryRow("SELECT n FROM t").Scan(&n); !errors.Is(err, errLost) {
		t.Fatalf("lost read: %v, want the driver's error", err)
	}
	srv.script("COMMIT", step{err: errLost, ran: true})
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); !errors.Is(err, errLost) {
		t.Fatalf("lost COMMIT: %v, want the driver's error", err)
	}
	var kinds []EventKind
	for _, e := range log.shadow() {
		kinds = append(kinds, e.Kind)
	}
	if len(kinds) != 2 || kinds[0] != EventHandOff || kinds[1] != EventCommitResolved {
		t.Fatalf("shadow events %v, want a hand-off and a commit to resolve", kinds)
	}
}

// A transaction follows the mode of its BEGIN to its end: a lost COMMIT of
// one begun in shadow mode is the driver's error even after the switch to
// enforcement, and one begun under enforcement is resolved even after the
// switch to shadow mode.
func TestTransactionKeepsTheModeOfItsBegin(t *testing.T) {
	for _, begunInShadow := range []bool{true, false} {
		srv := newFakeServer()
		db, _ := testDB(t, srv, WithShadow(begunInShadow))
		tx, err := db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		SetShadow(db, !begunInShadow)
		if _, err := tx.Exec("INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
		srv.script("COMMIT", step{err: errLost, ran: true})
		err = tx.Commit()
		switch {
		case begunInShadow && !errors.Is(err, errLost):
			t.Errorf("begun in shadow mode: COMMIT %v, want the driver's error", err)
		case !begunInShadow && err != nil:
			t.Errorf("begun under enforcement: COMMIT %v, want it resolved as committed", err)
		}
	}
}
