package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockWaits records the bounds short lock waits set (SET LOCAL
// lock_timeout, ms) and answers their SHOWs as a server whose
// deadlock_timeout is deadlockMS and whose session's lock_timeout is
// userMS (0: none); refuse fails SHOW lock_timeout as an engine without
// the setting.
type lockWaits struct {
	mu         sync.Mutex
	asked      []int64
	shows      int // SHOW lock_timeout, one per bounded attempt
	dtShows    int // SHOW deadlock_timeout
	deadlockMS int64
	refuse     error
	xidAsked   int   // the lost-COMMIT question of writing transactions
	userMS     int64 // the user's own lock_timeout, kept when it is lower
}

func (w *lockWaits) install(srv *fakeServer) {
	srv.onQuery = func(_ *fakeConn, q string, _ []driver.NamedValue) (driver.Rows, bool) {
		w.mu.Lock()
		defer w.mu.Unlock()
		switch q {
		case pgAskXID, pgAskXIDAndServer:
			w.xidAsked++
		case shortLockShow:
			w.shows++
			return &fakeRows{cols: []string{"lock_timeout"}, data: [][]driver.Value{{pgMillis(w.userMS)}}}, true
		case shortDeadlockShow:
			w.dtShows++
			return &fakeRows{cols: []string{"deadlock_timeout"}, data: [][]driver.Value{{pgMillis(w.deadlockMS)}}}, true
		}
		return nil, false
	}
	srv.onExec = func(_ *fakeConn, q string) {
		if !strings.HasPrefix(q, shortLockSetPrefix) || !isShortWaitQuery(q) {
			return
		}
		ms, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimPrefix(q, shortLockSetPrefix), shortLockMark), 10, 64)
		w.mu.Lock()
		w.asked = append(w.asked, ms)
		w.mu.Unlock()
	}
	if w.refuse != nil {
		srv.script(shortLockShow, step{err: w.refuse})
	}
}

// pgMillis is ms as SHOW gives a setting in milliseconds: in the largest
// unit that divides it, "37ms", "1s", "2min".
func pgMillis(ms int64) string {
	switch {
	case ms == 0:
		return "0"
	case ms%1000 != 0:
		return strconv.FormatInt(ms, 10) + "ms"
	case ms%60000 != 0:
		return strconv.FormatInt(ms/1000, 10) + "s"
	case ms%3600000 != 0:
		return strconv.FormatInt(ms/60000, 10) + "min"
	case ms%86400000 != 0:
		return strconv.FormatInt(ms/3600000, 10) + "h"
	}
	return strconv.FormatInt(ms/86400000, 10) + "d"
}

// shortWaitDB is a fake PostgreSQL whose short-wait statement w answers,
// and a db on it.
func shortWaitDB(t *testing.T, w *lockWaits, opts ...Option) (*fakeServer, *sql.DB, *fakeClock) {
	t.Helper()
	srv := newFakeServer()
	w.install(srv)
	db, clock := testDB(t, srv, append([]Option{WithShortLockWait(true)}, opts...)...)
	return srv, db, clock
}

func (w *lockWaits) got() []int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]int64(nil), w.asked...)
}

func sameInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

var (
	errDeadlock    = &pgError{"40P01", "deadlock detected"}
	errSerialize   = &pgError{"40001", "could not serialize access due to concurrent update"}
	errLockTimeout = &pgError{"55P03", "canceling statement due to lock timeout"}
)

func updateTx(ctx context.Context, tx *sql.Tx) error {
	_, err := tx.ExecContext(ctx, "UPDATE t SET v = v + 1")
	return err
}

// The happy path sends nothing more: a first attempt on a db that met no
// deadlock, and an attempt after an error that is not a conflict.
func TestShortWaitNotOnTheHappyPath(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	for range 3 {
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	srv.script("UPDATE", step{err: io.ErrUnexpectedEOF})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 0 {
		t.Fatalf("short waits asked on the happy path: %v", got)
	}
}

// A replay after a conflict bounds its lock waits: the floor with no
// commit measured yet, doubling per replay of the same call, and none
// once the bound reaches the server's deadlock_timeout.
func TestShortWaitReplaysDoubleUntilDeadlockTimeout(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	for range 8 {
		srv.script("UPDATE", step{err: errLockTimeout})
	}
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 9 {
		t.Fatalf("closure ran %d times, want 9", runs)
	}
	// 8 failed attempts; the replays 2..9: 20 40 80 160 320 640, then
	// none (1280 >= 1000 ms).
	if want := []int64{20, 40, 80, 160, 320, 640}; !sameInts(w.got(), want) {
		t.Fatalf("bounds %v, want %v", w.got(), want)
	}
}

// A lower deadlock_timeout, read from the server, stops the bounds sooner.
func TestShortWaitStopsAtTheServersDeadlockTimeout(t *testing.T) {
	w := &lockWaits{deadlockMS: 100}
	srv, db, _ := shortWaitDB(t, w)
	for range 5 {
		srv.script("UPDATE", step{err: errSerialize})
	}
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	// The first bound is asked before the server's value is known.
	if want := []int64{20, 40, 80}; !sameInts(w.got(), want) {
		t.Fatalf("bounds %v, want %v", w.got(), want)
	}
}

// A deadlock makes every attempt of the db bounded for a while, first
// attempts of other calls included; then the happy path is back.
func TestShortWaitAfterADeadlockForAWhile(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, clock := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if n := len(w.got()); n != 1 {
		t.Fatalf("bounds %v, want one (the replay)", w.got())
	}
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if n := len(w.got()); n != 2 {
		t.Fatalf("bounds %v: a first attempt right after a deadlock was not bounded", w.got())
	}
	clock.Advance(shortWaitMemory + time.Millisecond)
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if n := len(w.got()); n != 2 {
		t.Fatalf("bounds %v: still bounded %v after the deadlock", w.got(), shortWaitMemory)
	}
}

// A serialization failure alone does not make the db's first attempts
// bounded (it is not a lock-wait cycle); its replay is.
func TestShortWaitSerializationFailureBoundsOnlyItsReplay(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errSerialize})
	for range 2 {
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(w.got()); n != 1 {
		t.Fatalf("bounds %v, want one", w.got())
	}
}

// The bound follows what committed attempts take: four times a recent
// commit's duration, above the floor.
func TestShortWaitLearnsFromCommits(t *testing.T) {
	w := &lockWaits{deadlockMS: 10000}
	srv, db, clock := shortWaitDB(t, w)
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(50 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, slow); err != nil {
		t.Fatal(err)
	}
	// The replay (bound 20) committed in 50 ms: the next bound is 200,
	// sent on the grid of 5 ms times a power of two: 320.
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, slow); err != nil {
		t.Fatal(err)
	}
	got := w.got()
	if len(got) < 2 || got[0] != 20 || got[1] != 320 {
		t.Fatalf("bounds %v, want 20 then 320", got)
	}
}

// What a bounded attempt sets, from the lock_timeout in force and the
// server's deadlock_timeout: the user's lower one (or one equal to the
// bound) is kept, and the attempt's 55P03 is not its own; no bound as
// long as deadlock_timeout; the bound on the grid of 5 ms times a power
// of two, rounded down when up would reach deadlock_timeout.
func TestShortWaitSetDecides(t *testing.T) {
	for _, c := range []struct {
		userMS, deadlockMS int64
		d                  time.Duration
		want               int64 // the bound set, 0: none (not own)
	}{
		{0, 1000, 20 * time.Millisecond, 20},
		{0, 1000, 28 * time.Millisecond, 40},
		{0, 1000, 896 * time.Millisecond, 640},
		{0, 1000, 640 * time.Millisecond, 640},
		{10, 1000, 20 * time.Millisecond, 0},
		{20, 1000, 20 * time.Millisecond, 0},
		{30, 1000, 20 * time.Millisecond, 20},
		{5000, 1000, 20 * time.Millisecond, 20},
		{0, 15, 20 * time.Millisecond, 0},
		{0, 20, 20 * time.Millisecond, 0},
		{0, 30, 28 * time.Millisecond, 20},
	} {
		w := &lockWaits{deadlockMS: c.deadlockMS, userMS: c.userMS}
		_, db, clock := shortWaitDB(t, w)
		sw := retrierOf(db).shortWait
		tx, err := db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		b, err := sw.set(context.Background(), tx, c.d, clock)
		own := b.ms > 0
		tx.Rollback()
		var want []int64
		if c.want > 0 {
			want = []int64{c.want}
		}
		if err != nil || own != (c.want > 0) || !sameInts(w.got(), want) {
			t.Errorf("lock_timeout %d ms, deadlock_timeout %d ms, bound %v: set %v, own %v, err %v; want %v, own %v",
				c.userMS, c.deadlockMS, c.d, w.got(), own, err, want, c.want > 0)
		}
		if sw.deadlock.Load() != c.deadlockMS {
			t.Errorf("deadlock_timeout learned %d ms, want %d", sw.deadlock.Load(), c.deadlockMS)
		}
	}
}

// A bounded attempt sends SHOW lock_timeout and SET LOCAL lock_timeout;
// the db's first one, and the first after shortWaitRelearn, also SHOW
// deadlock_timeout.
func TestShortWaitStatementsPerAttempt(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, clock := shortWaitDB(t, w)
	call := func() {
		t.Helper()
		srv.script("UPDATE", step{err: errSerialize})
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	call()
	call()
	if len(w.got()) != 2 || w.shows != 2 || w.dtShows != 1 {
		t.Fatalf("two bounded attempts: bounds %v, SHOW lock_timeout %d, SHOW deadlock_timeout %d; want 2, 2, 1", w.got(), w.shows, w.dtShows)
	}
	clock.Advance(shortWaitRelearn)
	call()
	if len(w.got()) != 3 || w.shows != 3 || w.dtShows != 2 {
		t.Fatalf("after %v: bounds %v, SHOW lock_timeout %d, SHOW deadlock_timeout %d; want 3, 3, 2", shortWaitRelearn, w.got(), w.shows, w.dtShows)
	}
}

// The closure's own SHOW or SET LOCAL lock_timeout or deadlock_timeout is not taken for
// sqlretry's statements (which observers skip, and which do not make a
// bound the user's).
func TestIsShortWaitQuery(t *testing.T) {
	for q, want := range map[string]bool{
		shortLockShow:                       true,
		shortLockSet(20):                    true,
		shortDeadlockShow:                   true,
		shortDeadlockSet(40):                true,
		"SHOW lock_timeout":                 false,
		"SET LOCAL lock_timeout = 20":       false,
		"SET LOCAL lock_timeout = '150ms'":  false,
		"SHOW deadlock_timeout":             false,
		"SET LOCAL deadlock_timeout = 40":   false,
		"SET LOCAL deadlock_timeout = '3s'": false,
		"SELECT 1":                          false,
	} {
		if got := isShortWaitQuery(q); got != want {
			t.Errorf("isShortWaitQuery(%q) = %v, want %v", q, got, want)
		}
	}
}

// An engine that refuses the statements (no lock_timeout or
// deadlock_timeout setting) turns the short waits off; the attempt runs
// again without them, and the caller sees nothing.
func TestShortWaitRefusedTurnsItselfOff(t *testing.T) {
	for _, show := range []string{shortLockShow, shortDeadlockShow} {
		t.Run(show, func(t *testing.T) {
			srv := newFakeServer()
			srv.pgAborts = true
			w := &lockWaits{deadlockMS: 1000}
			w.install(srv)
			name := strings.Fields(show)[1]
			srv.script(show, step{err: &pgError{"42704", `unrecognized configuration parameter "` + name + `"`}})
			db, _ := testDB(t, srv, WithShortLockWait(true))
			srv.script("UPDATE", step{err: errDeadlock})
			runs := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				return updateTx(ctx, tx)
			})
			if err != nil {
				t.Fatal(err)
			}
			if runs != 2 {
				t.Fatalf("closure ran %d times, want 2", runs)
			}
			shows := w.shows
			srv.script("UPDATE", step{err: errDeadlock})
			if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
				t.Fatal(err)
			}
			if n := srv.ranCount(show); n != 0 {
				t.Fatalf("the refused statement was committed %d times", n)
			}
			if got := w.got(); len(got) != 0 || w.shows != shows {
				t.Fatalf("asked again after the refusal: bounds %v, SHOWs %d then %d", got, shows, w.shows)
			}
		})
	}
}

// The statement's own failure for a retryable reason (the connection
// lost) is the attempt's: replayed as any other.
func TestShortWaitConnectionLostIsReplayed(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	srv.script(shortLockShow, step{err: io.ErrUnexpectedEOF, closes: true})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Fatalf("closure ran %d times, want 2 (the attempt whose statement failed did not run it)", runs)
	}
	if got := w.got(); len(got) != 1 {
		t.Fatalf("bounds %v, want one answered", got)
	}
}

// The statement writes nothing: a read-only closure replayed with a bound
// is not asked the lost-COMMIT question of writing transactions.
func TestShortWaitDoesNotMakeTheTransactionWriting(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("SELECT v FROM t", step{err: errDeadlock})
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, "SELECT v FROM t")
		if err != nil {
			return err
		}
		return rows.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(w.got()) != 1 {
		t.Fatalf("bounds %v, want one", w.got())
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.xidAsked != 0 {
		t.Fatalf("the read-only transaction was asked its id %d times", w.xidAsked)
	}
}

// WithShortLockWait(false), MySQL, and a RunInTx on a *sql.DB sqlretry did
// not open send nothing.
func TestShortWaitOff(t *testing.T) {
	for name, opts := range map[string][]Option{
		"option": {WithShortLockWait(false)},
		"mysql":  {WithDialect(DialectMySQL), WithMySQLCommitMarker("")},
	} {
		t.Run(name, func(t *testing.T) {
			w := &lockWaits{deadlockMS: 1000}
			srv, db, _ := shortWaitDB(t, w, opts...)
			srv.script("UPDATE", step{err: errDeadlock}, step{err: errDeadlock})
			for range 2 {
				if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
					t.Fatal(err)
				}
			}
			if got := w.got(); len(got) != 0 {
				t.Fatalf("bounds asked: %v", got)
			}
		})
	}
}

// WithShortLockWait(false) given to one call turns it off for that call.
func TestShortWaitOffForOneCall(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx, WithShortLockWait(false)); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 0 {
		t.Fatalf("bounds asked: %v", got)
	}
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx, WithMaxAttempts(5)); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 1 {
		t.Fatalf("bounds %v, want one: the replay (the first deadlock was seen by a call without short waits)", got)
	}
}

// A lock wait that ran out under a bound keeps the db bounded (the cycle
// it broke would otherwise have been a deadlock); one that ran out under
// the user's own lock_timeout (no bound of ours) does not.
func TestShortWaitLockTimeoutKeepsItHotOnlyUnderABound(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, clock := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errLockTimeout}) // the user's: no bound of ours
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if n := len(w.got()); n != 1 {
		t.Fatalf("bounds %v, want only the replay's", w.got())
	}
	// A deadlock, then a bounded first attempt that ran out: still hot
	// shortWaitMemory after the deadlock.
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	clock.Advance(shortWaitMemory - 100*time.Millisecond)
	srv.script("UPDATE", step{err: errLockTimeout})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	clock.Advance(shortWaitMemory - 100*time.Millisecond)
	before := len(w.got())
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if len(w.got()) != before+1 {
		t.Fatalf("bounds %v: not bounded after a bounded lock wait ran out", w.got())
	}
}

// A lock wait that ran out under a bound counts for contention control as
// the deadlock it most often replaced (deadlock_timeout), not as the few
// ms it took; other conflicts, and lock timeouts of the user's own, at
// what they took.
func TestShortWaitConflictCost(t *testing.T) {
	s := &shortWait{}
	if got := s.conflictCost(20*time.Millisecond, true, errLockTimeout); got != time.Second {
		t.Errorf("bounded lock timeout: %v, want deadlock_timeout (1s, not read yet)", got)
	}
	s.deadlock.Store(300)
	if got := s.conflictCost(20*time.Millisecond, true, errLockTimeout); got != 300*time.Millisecond {
		t.Errorf("bounded lock timeout: %v, want the server's deadlock_timeout", got)
	}
	if got := s.conflictCost(20*time.Millisecond, false, errLockTimeout); got != 20*time.Millisecond {
		t.Errorf("the user's lock timeout: %v, want what it took", got)
	}
	if got := s.conflictCost(20*time.Millisecond, true, errSerialize); got != 20*time.Millisecond {
		t.Errorf("serialization failure: %v, want what it took", got)
	}
	var off *shortWait
	if got := off.conflictCost(20*time.Millisecond, true, errLockTimeout); got != 20*time.Millisecond {
		t.Errorf("off: %v", got)
	}
}

// End to end: on a db that met a deadlock (its attempts bounded), bounded
// lock waits that run out engage contention control as the deadlocks
// they replace would; without the rule (the attempts timed on a clock
// that does not move: they cost nothing) it would never engage.
func TestShortWaitLockTimeoutsEngageContentionControl(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 40 {
				if (i+g)%3 == 0 {
					srv.script("UPDATE", step{err: errLockTimeout})
				}
				if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if s := stats(t, db); s.ContentionCuts == 0 {
		t.Fatalf("bounded lock timeouts did not engage contention control: %+v", s)
	}
}

// An attempt after which no replay may follow (the last that MaxAttempts
// allows, one that would end past MaxElapsed, a call marked NoRetry) is
// not bounded: its bounded lock wait would end in a lock timeout that
// nothing replays, where plain PostgreSQL would have waited and committed
// (found by a hostile tester, attack5: WithMaxAttempts(2), a
// serialization failure, then a row held 2 s by a batch job gave the
// caller 55P03).
func TestShortWaitNotOnAnAttemptThatCannotBeReplayed(t *testing.T) {
	t.Run("MaxAttempts", func(t *testing.T) {
		for _, n := range []int{2, 3} {
			w := &lockWaits{deadlockMS: 1000}
			srv, db, _ := shortWaitDB(t, w, WithMaxAttempts(n))
			for range n - 1 {
				srv.script("UPDATE", step{err: errSerialize})
			}
			if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
				t.Fatal(err)
			}
			// Attempts 2..n-1 bounded; the last, n, not.
			if got := len(w.got()); got != n-2 {
				t.Errorf("MaxAttempts(%d): bounds %v, want %d (none on the last attempt)", n, w.got(), n-2)
			}
		}
	})
	t.Run("MaxElapsed", func(t *testing.T) {
		w := &lockWaits{deadlockMS: 1000}
		srv, db, clock := shortWaitDB(t, w, WithBackoff(Backoff{Initial: time.Millisecond, Max: time.Millisecond, Multiplier: 1, MaxAttempts: 100, MaxElapsed: 300 * time.Millisecond}))
		srv.script("UPDATE", step{err: errSerialize})
		runs := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			if runs == 1 {
				clock.Advance(290 * time.Millisecond) // the first attempt took most of MaxElapsed
			}
			return updateTx(ctx, tx)
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(w.got()) != 0 {
			t.Errorf("bounds %v: a replay whose bound would end past MaxElapsed was bounded", w.got())
		}
	})
	t.Run("NoRetry", func(t *testing.T) {
		w := &lockWaits{deadlockMS: 1000}
		srv, db, _ := shortWaitDB(t, w)
		srv.script("UPDATE", step{err: errDeadlock})
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
		before := len(w.got())
		if err := RunInTx(NoRetry(context.Background()), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
		if got := len(w.got()); got != before {
			t.Errorf("bounds %v: a NoRetry call right after a deadlock was bounded", w.got())
		}
	})
}

// connectHookConnector runs before ahead of every connect.
type connectHookConnector struct {
	fakeConnector
	before func()
}

func (c *connectHookConnector) Connect(ctx context.Context) (driver.Conn, error) {
	c.before()
	return c.fakeConnector.Connect(ctx)
}

// Shadow mode turned on while a call runs (SetShadow on a live db): the
// attempt whose transaction began in shadow mode is the plain driver's,
// whose errors RunInTx does not judge, so it must not bound its lock
// waits: its own 55P03 would reach the caller as an error the plain driver
// never gives (TestAttack2PolicyFlipsUnderTraffic, in a CI rehearsal).
func TestShortWaitNotInAShadowTransaction(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv := newFakeServer()
	w.install(srv)
	var db *sql.DB
	flip := false
	wc, err := WrapConnector(&connectHookConnector{fakeConnector: fakeConnector{srv: srv}, before: func() {
		if flip {
			_ = SetShadow(db, true)
		}
	}}, WithClock(newFakeClock()), WithDialect(DialectPostgres), WithShortLockWait(true))
	if err != nil {
		t.Fatal(err)
	}
	db = sql.OpenDB(wc)
	defer db.Close()
	db.SetMaxIdleConns(0) // every attempt connects: the flip comes between the call's start and its BEGIN
	srv.script("UPDATE", step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	before := len(w.got())
	if before != 1 {
		t.Fatalf("bounds %v, want one (the replay)", w.got())
	}
	flip = true
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != before {
		t.Fatalf("bounds %v: a transaction begun in shadow mode bounded its lock waits", got)
	}
}

// sqlretry's own lock timeout (the 55P03 of a bound it set) never reaches
// the caller, where the plain driver would have gone on waiting for the
// lock (attack7, in a CI run: "context deadline exceeded (while retrying:
// 55P03)" under shadow flips and a 5 s deadline).
func TestShortWaitOwnLockTimeoutNeverSurfaces(t *testing.T) {
	// The bounded replay's lock timeout came near MaxElapsed: the pacing
	// would stop the call. One more attempt, unbounded, commits.
	t.Run("pacing stop", func(t *testing.T) {
		w := &lockWaits{deadlockMS: 1000}
		srv, db, clock := shortWaitDB(t, w, WithBackoff(Backoff{Initial: time.Millisecond, Max: time.Millisecond, Multiplier: 1, MaxAttempts: 100, MaxElapsed: 300 * time.Millisecond}))
		srv.script("UPDATE", step{err: errSerialize}, step{err: errLockTimeout})
		runs := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			if runs == 2 {
				clock.Advance(300 * time.Millisecond) // the bounded attempt ran out near MaxElapsed
			}
			return updateTx(ctx, tx)
		})
		if err != nil {
			t.Fatalf("got %v, want the unbounded attempt's commit", err)
		}
		if runs != 3 || len(w.got()) != 1 {
			t.Fatalf("runs %d, bounds %v: want 3 runs, the second alone bounded", runs, w.got())
		}
	})
	// The caller's context ends right after the bounded attempt's lock
	// timeout: the error is the context's, beside the conflict before,
	// never 55P03.
	t.Run("context ends", func(t *testing.T) {
		w := &lockWaits{deadlockMS: 1000}
		srv, db, _ := shortWaitDB(t, w)
		srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		runs := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			err := updateTx(ctx, tx)
			if runs == 2 {
				cancel()
			}
			return err
		})
		if !errors.Is(err, context.Canceled) || ErrorCode(err) == "55P03" || ErrorCode(err) != "40P01" {
			t.Fatalf("got %v (code %q), want the context's error beside the 40P01", err, ErrorCode(err))
		}
	})
	// A user's lower lock_timeout is kept by the bound's statement: its
	// 55P03 is the user's, what the plain driver gives, and stays.
	t.Run("user's own", func(t *testing.T) {
		w := &lockWaits{deadlockMS: 1000, userMS: 10}
		srv, db, _ := shortWaitDB(t, w)
		srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		runs := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			err := updateTx(ctx, tx)
			if runs == 2 {
				cancel()
			}
			return err
		})
		if !errors.Is(err, context.Canceled) || ErrorCode(err) != "55P03" {
			t.Fatalf("got %v (code %q), want the context's error beside the user's 55P03", err, ErrorCode(err))
		}
	})
}

func TestPgMillis(t *testing.T) {
	for ms, want := range map[int64]string{0: "0", 20: "20ms", 1000: "1s", 1500: "1500ms", 60000: "1min", 90000: "90s", 3600000: "1h", 86400000: "1d"} {
		if got := pgMillis(ms); got != want {
			t.Errorf("pgMillis(%d) = %q, want %q", ms, got, want)
		}
	}
}

// A statement that must come first in its transaction (SET TRANSACTION
// ISOLATION LEVEL, SET TRANSACTION SNAPSHOT, SET TRANSACTION READ WRITE on
// a read-only session) fails after the bound's statement with 25001; the
// attempt runs again at once without the bound, and the call stays
// unbounded (attack8: "SET TRANSACTION ISOLATION LEVEL must be called
// before any query (SQLSTATE 25001)" surfaced where the plain driver
// commits).
func TestShortWaitStatementThatMustComeFirst(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	mustFirst := &pgError{"25001", "SET TRANSACTION ISOLATION LEVEL must be called before any query"}
	srv.script("UPDATE", step{err: errDeadlock})
	srv.script("SET TRANSACTION", step{}, step{err: mustFirst})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"); err != nil {
			return err
		}
		return updateTx(ctx, tx)
	})
	if err != nil {
		t.Fatalf("got %v, want the unbounded attempt's commit", err)
	}
	if runs != 3 || len(w.got()) != 1 {
		t.Fatalf("runs %d, bounds %v: want 3 runs (deadlock, 25001 after the bound, commit), one bound", runs, w.got())
	}
}

// The closure met sqlretry's own lock timeout and handled it: rolled back
// to a savepoint and went on (a "busy" branch), rolled the transaction
// back itself, or returned an error of its own. The plain driver would
// have waited for the lock: the attempt is never committed nor final, it
// is replayed with its lock waits unbounded (attack8: a savepoint handler
// committed its "busy" branch; the closure's own tx.Rollback handed the
// caller 55P03).
func TestShortWaitOwnLockTimeoutHandledByTheClosure(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(ctx context.Context, tx *sql.Tx) (busy bool, err error)
	}{
		{"savepoint handler commits its busy branch", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
				return false, err
			}
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "55P03" {
					return false, err // handlers for the user's own lock timeouts
				}
				if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
					return false, err
				}
				_, err := tx.ExecContext(ctx, "INSERT INTO busy VALUES (1)")
				return true, err
			}
			return false, nil
		}},
		{"closure rolls back itself", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "55P03" {
					return false, err // handlers for the user's own lock timeouts
				}
				_ = tx.Rollback()
				return true, err
			}
			return false, nil
		}},
		{"closure rolls back and swallows", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "55P03" {
					return false, err // handlers for the user's own lock timeouts
				}
				_ = tx.Rollback()
				return true, nil
			}
			return false, nil
		}},
		{"savepoint handler, then the closure commits itself", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
				return false, err
			}
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "55P03" {
					return false, err
				}
				if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
					return false, err
				}
				if _, err := tx.ExecContext(ctx, "INSERT INTO busy VALUES (1)"); err != nil {
					return false, err
				}
				return true, tx.Commit()
			}
			return false, nil
		}},
		{"closure returns its own error", func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if err := updateTx(ctx, tx); err != nil {
				if ErrorCode(err) != "55P03" {
					return false, err // handlers for the user's own lock timeouts
				}
				return true, errors.New("busy, try later")
			}
			return false, nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &lockWaits{deadlockMS: 1000}
			srv, db, _ := shortWaitDB(t, w)
			srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
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
				t.Fatalf("err %v, runs %d: want the third, unbounded attempt's commit", err, runs)
			}
			// After a handler, the next attempt is unbounded; an error of
			// the closure's own is replayed as the 55P03 before it, whose
			// bound doubles.
			if got := len(w.got()); got != 1 && (tc.name != "closure returns its own error" || got != 2) {
				t.Fatalf("bounds %v: want one (the first replay), the next unbounded", w.got())
			}
			if n := srv.ranCount("INSERT INTO busy"); n != 0 {
				t.Fatalf("the busy branch committed %d times", n)
			}
		})
	}
}

// A classifier rule that makes 55P03 permanent is about the user's own
// lock timeouts: sqlretry's is never final (attack8).
func TestShortWaitOwnLockTimeoutNotFinalByAClassifierRule(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w, WithClassifier(func(err error) (Class, bool) {
		if ErrorCode(err) == "55P03" {
			return Permanent, true
		}
		return 0, false
	}))
	srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		return updateTx(ctx, tx)
	})
	if err != nil || runs != 3 {
		t.Fatalf("err %v, runs %d: want the unbounded attempt's commit", err, runs)
	}
}

// A closure that sets lock_timeout itself makes the 55P03 of that attempt
// its own: reported, not hidden behind the conflict before (attack8).
func TestShortWaitClosuresOwnLockTimeoutIsReported(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runs := 0
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '150ms'"); err != nil {
			return err
		}
		err := updateTx(ctx, tx)
		if runs == 2 {
			cancel()
		}
		return err
	})
	if ErrorCode(err) != "55P03" || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v (code %q), want the context's error beside the closure's own 55P03", err, ErrorCode(err))
	}
}

// Off by default (attack8: a PL/pgSQL handler for lock_not_available or
// OTHERS catches the bound's lock timeout on the server, unseen, and its
// transaction commits the handler's branch).
func TestShortWaitOffByDefault(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv := newFakeServer()
	w.install(srv)
	db, _ := testDB(t, srv)
	srv.script("UPDATE", step{err: errDeadlock}, step{err: errDeadlock})
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if got := w.got(); len(got) != 0 {
		t.Fatalf("bounds %v on a db opened without WithShortLockWait(true)", got)
	}
}

// A closure that met sqlretry's own lock timeout, caught it in a
// savepoint and then committed part of its work by a statement of its own
// (a hand-typed COMMIT) is not replayed, and its error says so; it is not
// the bare 55P03 (a review's F2).
func TestShortWaitOwnLockTimeoutThenEscape(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock}, step{err: errLockTimeout})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
			return err
		}
		if err := updateTx(ctx, tx); err != nil {
			if ErrorCode(err) != "55P03" {
				return err
			}
			if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, "COMMIT")
			return err
		}
		return nil
	})
	if runs != 2 || err == nil || !strings.Contains(err.Error(), "committed part of its work itself") {
		t.Fatalf("runs %d, err %v: want no replay after the escape, and an error that says so", runs, err)
	}
}

// A NOWAIT's 55P03 ("could not obtain lock") is the closure's own, also
// under the bound: a closure that skips the busy row after it commits
// that way, as with the plain driver (a review's F5).
func TestShortWaitNowaitIsTheClosures(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	nowait := &pgError{"55P03", `could not obtain lock on row in relation "jobs"`}
	srv.script("UPDATE", step{err: errDeadlock})
	srv.script("SELECT id FROM jobs", step{err: nowait})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if err := updateTx(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "SELECT id FROM jobs FOR UPDATE NOWAIT"); err != nil {
			_, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s")
			return err // skip the busy job
		}
		return nil
	})
	if err != nil || runs != 2 {
		t.Fatalf("err %v, runs %d: want the second attempt (bounded) to commit after skipping the busy job", err, runs)
	}
}

// The restore's wide text gate (mayTouchSetting): CALL, DO and EXECUTE as
// words, whatever whitespace follows (attack17: "CALL\n  p()" and a
// statement prepared in SQL were missed, and the bound stayed the
// session's value).
func TestMayTouchSettingWords(t *testing.T) {
	for q, want := range map[string]bool{
		"CALL p()":                         true,
		"CALL\n  p()":                      true,
		"call\tp()":                        true,
		"EXECUTE s(1)":                     true,
		"execute\ns":                       true,
		"DO $$BEGIN NULL; END$$":           true,
		"DO$$BEGIN NULL; END$$":            true,
		"SET lock_timeout = '1s'":          true,
		"SELECT set_config('x', 'y', f)":   false, // another setting (attack21)
		"UPDATE pg_settings SET setting=1": true,
		"SELECT recall(1)":                 false,
		"SELECT docs FROM t":               false,
		"INSERT INTO executed VALUES (1)":  false,
		"SELECT 1":                         false,
		"UPDATE t SET undo = 1":            false,
		"INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING":             false, // attack19
		"INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n=1": false,
		"DO LANGUAGE plpgsql $$BEGIN NULL; END$$":                     true,
		"do 'BEGIN NULL; END'":                                        true,
		"SHOW ALL":                                                    true,
		"SELECT current_setting($1)":                                  true, // the name as an argument
		"SELECT * FROM pg_catalog.pg_show_all_settings()":             true,
		"SELECT set_config($1, $2, false)":                            true,
		"UPDATE jobs SET lock_timeout = 5 WHERE id = 1":               true, // a column: one attempt more, no harm
	} {
		if got := mayTouchSetting(q, "lock_timeout"); got != want {
			t.Errorf("mayTouchSetting(%q) = %v, want %v", q, got, want)
		}
	}
}

// A bounded attempt whose closure may have touched the bound's setting
// (read it, set it, a CALL, DO or EXECUTE) is never committed, whatever
// the closure then did: it is rolled back and run again at once with its
// waits unbounded, as the plain driver would have run it. What the closure
// saw of the bound, decided from it or made of it at session level goes
// with the rollback (attack15-20: each text check of what the closure did
// with it had spellings it missed: a value as a parameter, set_config's
// third argument as a parameter, a SET undone by ROLLBACK TO SAVEPOINT,
// CREATE FUNCTION ... SET ... FROM CURRENT).
func TestShortWaitTouchedAttemptRunsAgainUnbounded(t *testing.T) {
	for _, c := range []struct {
		name  string
		touch func(ctx context.Context, tx *sql.Tx) error
	}{
		{"set_config_param", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SELECT set_config('lock_timeout', $1, false)", "20ms")
			return err
		}},
		{"show", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SHOW lock_timeout")
			return err
		}},
		{"set_local", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '5s'")
			return err
		}},
		{"call", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "CALL p()")
			return err
		}},
		{"show_all", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SHOW ALL")
			return err
		}},
		{"pg_show_all_settings", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SELECT * FROM pg_catalog.pg_show_all_settings()")
			return err
		}},
		{"from_current", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET lock_timeout FROM CURRENT AS 'SELECT 1'")
			return err
		}},
	} {
		for _, end := range []string{"return nil", "own error", "own Commit"} {
			t.Run(c.name+"/"+end, func(t *testing.T) {
				w := &lockWaits{deadlockMS: 1000}
				srv, db, _ := shortWaitDB(t, w)
				srv.script("UPDATE", step{err: errDeadlock})
				runs := 0
				err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					runs++
					if err := updateTx(ctx, tx); err != nil {
						return err
					}
					if err := c.touch(ctx, tx); err != nil {
						return err
					}
					if runs > 2 {
						return nil // unbounded: the plain driver's run
					}
					switch end {
					case "own error":
						return errors.New("busy: decided from the bound")
					case "own Commit":
						return tx.Commit()
					}
					return nil
				})
				srv.mu.Lock()
				committed, ran := srv.committed, append([]string(nil), srv.ran...)
				srv.mu.Unlock()
				if err != nil || runs != 3 || committed != 1 {
					t.Fatalf("err %v, runs %d, commits %d: want the bounded attempt rolled back and one more, unbounded, committed", err, runs, committed)
				}
				if got := w.got(); len(got) != 1 {
					t.Fatalf("bounds %v: want only the second attempt bounded", got)
				}
				for _, q := range ran {
					if strings.HasPrefix(q, shortLockSetPrefix) && isShortWaitQuery(q) {
						t.Fatalf("the committed transaction ran the bound %q: %q", q, ran)
					}
				}
			})
		}
	}
}

// A closure that touched the setting in a bounded attempt and then ended
// the transaction itself by a statement (a hand-typed COMMIT) has part of
// its work committed: it is not run again, and the rest commits as the
// plain driver's would.
func TestShortWaitTouchedThenEscapedCommits(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.handCommits = []string{"COMMIT"}
	srv.script("UPDATE", step{err: errDeadlock})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if err := updateTx(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "SET lock_timeout = '5s'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "COMMIT")
		return err
	})
	if err != nil || runs != 2 {
		t.Fatalf("err %v, runs %d: want the escaped attempt committed, not run again", err, runs)
	}
}

// attack21: the row-level security idiom (set_config of another setting,
// in every transaction) and words in string data are not touches; Unicode
// escapes, SQL run from a text, and a name that is not a plain literal
// are.
func TestMayTouchSettingAttack21(t *testing.T) {
	for q, want := range map[string]bool{
		"SELECT set_config('app.tenant', $1, true)":                                  false,
		"SELECT pg_catalog.set_config( 'app.tenant' , $1, true)":                     false,
		"SELECT current_setting('app.tenant')::int":                                  false,
		"INSERT INTO log (msg) VALUES ('show me the call to execute')":               false,
		"SELECT set_config($1, $2, false)":                                           true,
		"SELECT set_config('lock' || '_timeout', '1s', false)":                       true,
		"SELECT set_config('app.t', current_setting('deadlock_timeout'), true)":      true,
		"SELECT current_setting('it''s')":                                            true,
		`SELECT U&"current\005fsetting"(U&'deadlock\005ftimeout')`:                   true,
		"SELECT query_to_xml('select current' || '_setting(''x'')', true, true, '')": true,
		// A backslash: read also as standard_conforming_strings off reads it.
		"INSERT INTO log (msg, p) VALUES ('call me', 'C:\\')":        false, // off: unterminated, the server runs nothing
		"INSERT INTO log (msg, p) VALUES ('C:\\', ' call p(); -- ')": true,  // off: '...\', ' is one literal, then CALL
		"SHOW ALL": true,
	} {
		if got := mayTouchSetting(q, "deadlock_timeout"); got != want {
			t.Errorf("mayTouchSetting(%q) = %v, want %v", q, got, want)
		}
	}
}

// attack22: words in string data and comments are not code (sqltext.PostgresCode); SHOW
// of another setting is not a touch; table_to_xml is; a DO block after a
// comment is.
func TestMayTouchSettingAttack22(t *testing.T) {
	for q, want := range map[string]bool{
		"UPDATE tasks SET status = 'to do' WHERE id = 1":                                false,
		"-- store the session's setting\nCALL p()":                                      true,
		"SELECT $$'$$; CALL p()":                                                        true,
		"SELECT $tag$ call me $tag$":                                                    false,
		"SELECT E'it\\'s'; CALL p()":                                                    true,
		"DO /* c */ 'BEGIN NULL; END'":                                                  true,
		"SELECT table_to_xml(('pg_catalog.pg_sett'||'ings')::regclass, true, true, '')": true,
		"SHOW TimeZone":                                                                 false,
		"SHOW /* x */ ALL":                                                              true,
		"show\nall":                                                                     true,
		"SELECT showall FROM t":                                                         false,
		"SELECT 1 /* nested /* call */ still comment */":                                false,
		"INSERT INTO t VALUES ($1, 'execute')":                                          false,
	} {
		if got := mayTouchSetting(q, "deadlock_timeout"); got != want {
			t.Errorf("mayTouchSetting(%q) = %v, want %v", q, got, want)
		}
	}
	for q, want := range map[string]bool{
		"PREPARE p AS INSERT INTO t VALUES ($1)": true,
		"EXECUTE p; DEALLOCATE p":                true,
		"SELECT pg_advisory_lock(7)":             true,
		"SELECT pg_try_advisory_lock(7)":         true,
		"SELECT pg_advisory_xact_lock(7)":        false,
		"SELECT dblink_exec('x', 'y')":           true,
		"INSERT INTO t VALUES ('prepare')":       false,
	} {
		if got := sessionSticky(q); got != want {
			t.Errorf("sessionSticky(%q) = %v, want %v", q, got, want)
		}
	}
}

// A closure's own Rollback is its outcome, also in a bounded attempt that
// touched the setting: it is not run again (attack22). Its own Commit is
// refused and the attempt runs again unbounded.
func TestShortWaitTouchedOwnRollbackIsFinal(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if err := updateTx(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "SHOW lock_timeout"); err != nil {
			return err
		}
		return tx.Rollback()
	})
	if !errors.Is(err, sql.ErrTxDone) || runs != 2 {
		t.Fatalf("err %v, runs %d: want the closure's own rollback final after the touch (sql.ErrTxDone, as the README says)", err, runs)
	}
}

// An attempt that touched the setting and left session state no rollback
// undoes (a PREPARE) is not run again: it commits as the plain driver's
// (attack22: the run again's PREPARE failed with 42P05).
func TestShortWaitTouchedStickyCommits(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	srv.script("UPDATE", step{err: errDeadlock})
	runs := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if err := updateTx(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "PREPARE p AS SELECT 1"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "EXECUTE p")
		return err
	})
	if err != nil || runs != 2 {
		t.Fatalf("err %v, runs %d: want the attempt committed, not run again", err, runs)
	}
}
