package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func newTestLimiter() (*txLimiter, *fakeClock) {
	c := newFakeClock()
	return &txLimiter{clock: c}, c
}

// warmUp completes n cheap attempts one after the other, one in three a
// cheap conflict, so that the limiter has seen a round of work, and
// conflicts frequent enough to matter, before it judges a costly one.
func warmUp(l *txLimiter, n int) {
	for i := range n {
		s, _ := l.acquire(context.Background())
		l.release(s, i%3 == 2, i%3 != 2, time.Millisecond)
	}
}

// Costly conflicts that are rare do not engage the limiter: under killed
// connections on PostgreSQL one attempt in seven failed to serialize after
// waiting on a row lock, which wasted more than a third of the time, and
// limiting concurrency cut throughput to a third (chaos pgx/kills: 1,260
// tx/s against 3,980 without contention control). Rare deadlocks that
// waste most of the time still do: see the next test.
func TestContentionIgnoresRareConflicts(t *testing.T) {
	rareConflicts(t, 4*time.Millisecond, false) // 40 % of the time
}

// Rare deadlocks, each found after PostgreSQL's deadlock_timeout, stall
// their cycle for a second while the rest commit in a millisecond: queueing
// pays there (the demo's hot spot, 8 workers on 4 accounts, committed 7,495
// transactions with contention control engaged and 3,483 when rare
// conflicts could not engage it, its p99 405 ms against 15 ms).
func TestContentionEngagesOnRareDeadlocks(t *testing.T) {
	rareConflicts(t, time.Second, true)
}

// rareConflicts runs 8 transactions at once, one attempt in seven a
// conflict that took cost, commits 1 ms each, and checks whether the
// limiter engaged. The clock moves by an eighth of each attempt's time as
// it ends (8 at once): conflicts at one instant would be one event.
func rareConflicts(t *testing.T, cost time.Duration, wantEngaged bool) {
	t.Helper()
	l, clock := newTestLimiter()
	var slots []txSlot
	for range 8 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	for i := range 700 {
		conflict := i%7 == 6
		took := time.Millisecond
		if conflict {
			took = cost
		}
		clock.Advance(took / 8)
		l.release(slots[i%8], conflict, !conflict, took)
		if l.engaged.Load() {
			if !wantEngaged {
				t.Fatalf("one conflict of %v in seven completions engaged the limiter after %d (limit %v)", cost, i+1, l.limit)
			}
			return
		}
		slots[i%8], _ = l.acquire(context.Background())
	}
	if wantEngaged {
		t.Fatalf("one conflict of %v in seven completions did not engage the limiter", cost)
	}
}

// A conflict before one round of the transactions in flight has completed
// says nothing about how much work conflicts waste: on a slow network the
// first serialization failure costs as much as a commit, and engaging on
// it halved throughput for many seconds (8 workers, 20 ms each way).
func TestContentionWaitsForARoundBeforeJudging(t *testing.T) {
	l, _ := newTestLimiter()
	var slots []txSlot
	for range 8 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	l.release(slots[0], false, true, 250*time.Millisecond)
	l.release(slots[1], true, false, 250*time.Millisecond)
	if l.engaged.Load() {
		t.Fatalf("one conflict among the first completions engaged the limiter (limit %v)", l.limit)
	}
	// The round goes on like the rest of the run: one conflict in five.
	for i := 0; i < 200; i++ {
		s := slots[2+i%6]
		l.release(s, i%5 == 0, i%5 != 0, 250*time.Millisecond)
		if l.engaged.Load() {
			t.Fatalf("conflicts that waste a fifth of the work engaged the limiter after %d more completions (limit %v)", i+1, l.limit)
		}
		slots[2+i%6], _ = l.acquire(context.Background())
	}
}

// Expensive conflicts (a deadlock found after a second) engage the limiter,
// which then never lets more than int(limit) transactions run at once.
func TestContentionEngagesOnCostlyConflictsAndBoundsConcurrency(t *testing.T) {
	l, _ := newTestLimiter()
	warmUp(l, 16)
	ctx := context.Background()
	var slots []txSlot
	for range 8 {
		s, err := l.acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		slots = append(slots, s)
	}
	l.release(slots[0], false, true, time.Millisecond)
	l.release(slots[1], true, false, time.Second) // a deadlock: costly
	if !l.engaged.Load() {
		t.Fatal("a conflict that wasted most of the work did not engage the limiter")
	}
	if l.limit != 3.5 { // half of the 7 in flight when it ended
		t.Errorf("limit = %v, want 3.5", l.limit)
	}
	for _, s := range slots[2:] {
		l.release(s, false, true, time.Millisecond)
	}
	// Now at most 3 run at once; the 4th waits until one ends.
	var running, most atomic.Int64
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := l.acquire(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			n := running.Add(1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			time.Sleep(time.Millisecond)
			running.Add(-1)
			l.release(s, false, false, time.Millisecond)
		}()
	}
	wg.Wait()
	if m := most.Load(); m > 3 || m < 1 {
		t.Errorf("%d transactions ran at once, want at most 3", m)
	}
	if l.queued.Load() == 0 {
		t.Error("no transaction waited")
	}
}

// Cheap conflicts (serialization failures found at once, a few per hundred
// commits) are replayed, not queued: the limiter stays out of the way.
func TestContentionIgnoresCheapConflicts(t *testing.T) {
	l, _ := newTestLimiter()
	for i := range 100 {
		s, _ := l.acquire(context.Background())
		l.release(s, i%5 == 0, i%5 != 0, time.Millisecond)
	}
	if l.engaged.Load() {
		t.Errorf("20%% cheap conflicts engaged the limiter (limit %v)", l.limit)
	}
}

// After a cut the limit holds, then grows with commits and lets go.
func TestContentionLetsGoWhenConflictsStop(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 8)
	var slots []txSlot
	for range 4 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	l.release(slots[0], true, false, time.Second)
	for _, s := range slots[1:] {
		l.release(s, false, false, 0)
	}
	if !l.engaged.Load() || l.limit != 2 {
		t.Fatalf("engaged=%v limit=%v, want engaged at 2", l.engaged.Load(), l.limit)
	}
	s, _ := l.acquire(context.Background())
	l.release(s, false, true, time.Millisecond)
	if l.limit != 2 {
		t.Errorf("the limit grew during the hold after a cut: %v", l.limit)
	}
	clock.Advance(time.Minute)
	for i := 0; l.engaged.Load(); i++ {
		if i > 10000 {
			t.Fatalf("still engaged after %d commits without conflict, limit %v", i, l.limit)
		}
		s, _ := l.acquire(context.Background())
		l.release(s, false, true, time.Millisecond)
	}
}

// A caller whose context ends while it waits gets its error at once, and
// its place is not lost to the others.
func TestContentionWaitEndsWithContext(t *testing.T) {
	l, _ := newTestLimiter()
	warmUp(l, 4)
	a, _ := l.acquire(context.Background())
	b, _ := l.acquire(context.Background())
	l.release(a, true, false, time.Second) // engage at 1
	_ = b
	if !l.engaged.Load() || int(l.limit) != 1 {
		t.Fatalf("engaged=%v limit=%v", l.engaged.Load(), l.limit)
	}
	held, _ := l.acquire(context.Background())
	if !held.limited {
		t.Fatal("the first caller after engaging got no slot")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the context's", err)
	}
	l.release(held, false, true, time.Millisecond)
	got, err := l.acquire(context.Background())
	if err != nil || !got.limited {
		t.Fatalf("the slot was lost: %+v %v", got, err)
	}
}

// A RunInTx inside another must not wait for a slot the outer one holds.
func TestContentionNestedRunInTxDoesNotWait(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	l := retrierOf(db).txLimit
	if l == nil {
		t.Fatal("contention control is off by default")
	}
	l.mu.Lock()
	l.engaged.Store(true)
	l.limit = 1
	l.hold = time.Hour
	l.holdEnd = time.Now().Add(time.Hour)
	l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		return RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error { return nil })
	})
	if err != nil {
		t.Fatalf("nested RunInTx: %v", err)
	}
}

func TestContentionControlCanBeTurnedOff(t *testing.T) {
	db, _ := testDB(t, newFakeServer(), WithContentionControl(false))
	if retrierOf(db).txLimit != nil {
		t.Error("WithContentionControl(false) left contention control on")
	}
}

// The time an attempt waits for a connection (a pool, a dial, an open
// breaker) is not work a conflict wasted: after an outage, the first
// serialization failure of an attempt that had waited seconds for the
// server engaged the limiter with a hold of 10 s, and the chaos benchmark's
// PostgreSQL restart ran at a third of its speed for the rest of the run.
func TestContentionDoesNotCountTheWaitForAConnection(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithBreaker(Breaker{OpenTimeout: time.Second, OpenJitter: 0.01}), WithoutBudget())
	db.SetMaxIdleConns(0) // every transaction dials
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	commit := func(context.Context, *sql.Tx) error { return nil }
	for range 50 {
		if err := RunInTx(ctx, db, nil, commit); err != nil {
			t.Fatal(err)
		}
	}
	// The server goes away for long enough that the breaker opens and the
	// next transaction waits for its probe; then that transaction conflicts
	// once.
	for range DefaultBreaker.ConsecutiveDialFailures {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	srv.script("UPDATE", step{err: &pgError{"40001", "could not serialize access due to concurrent update"}})
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if s := stats(t, db); s.CircuitWaits == 0 || s.ContentionCuts != 0 {
		t.Errorf("circuit waits %d, contention cuts %d: want a wait for the probe and no cut", s.CircuitWaits, s.ContentionCuts)
	}
}

// engageAfter runs the limiter unlimited at rate completions a second
// (fake time) for d, then feeds it frequent costly conflicts, every other
// completion, at hot completions a second until it engages.
func engageAfter(t *testing.T, l *txLimiter, clock *fakeClock, rate float64, d time.Duration, hot float64) {
	t.Helper()
	step := time.Duration(float64(time.Second) / rate)
	for el := time.Duration(0); el < d; el += step {
		s, _ := l.acquire(context.Background())
		clock.Advance(step)
		// A cheap conflict now and then: the windows of the commit rate
		// are kept on the conflict path.
		conflict := int(el/step)%10 == 9
		l.release(s, conflict, !conflict, time.Millisecond)
	}
	// Seven more transactions in flight: it engages at half of eight.
	var others []txSlot
	for range 7 {
		s, _ := l.acquire(context.Background())
		others = append(others, s)
	}
	step = time.Duration(float64(time.Second) / hot)
	for i := 0; !l.engaged.Load(); i++ {
		if i > 1000 {
			t.Fatal("frequent costly conflicts did not engage the limiter")
		}
		s, _ := l.acquire(context.Background())
		clock.Advance(step)
		l.release(s, i%2 == 0, i%2 != 0, 200*time.Millisecond)
	}
	for _, s := range others {
		l.release(s, false, false, 0)
	}
}

// runLimited runs the engaged limiter at rate commits a second for d.
func runLimited(l *txLimiter, clock *fakeClock, rate float64, d time.Duration) {
	step := time.Duration(float64(time.Second) / rate)
	for el := time.Duration(0); el < d && l.engaged.Load(); el += step {
		s, _ := l.acquire(context.Background())
		clock.Advance(step)
		l.release(s, false, true, time.Millisecond)
	}
}

// Limiting concurrency must earn its keep: when the db commits less under
// the limit than it did unlimited just before (on a slow link, where a
// transaction's time is mostly the network's), the limiter lets go after
// a probation, and conflicts do not engage it again for a while. On a hot
// spot, where it commits more, it stays.
func TestContentionLetsGoWhenLimitingCommitsLess(t *testing.T) {
	t.Run("commits less", func(t *testing.T) {
		l, clock := newTestLimiter()
		engageAfter(t, l, clock, 100, 3*time.Second, 100) // 50 commits a second while conflicts mount
		runLimited(l, clock, 25, 3*time.Second)
		if l.engaged.Load() {
			t.Fatalf("still engaged at half the throughput it had unlimited (limit %v)", l.limit)
		}
		for i := range 50 {
			s, _ := l.acquire(context.Background())
			clock.Advance(10 * time.Millisecond)
			l.release(s, i%2 == 0, i%2 != 0, 200*time.Millisecond)
		}
		if l.engaged.Load() {
			t.Error("engaged again within a second of a failed probation")
		}
	})
	t.Run("commits more", func(t *testing.T) {
		l, clock := newTestLimiter()
		engageAfter(t, l, clock, 100, 3*time.Second, 100)
		runLimited(l, clock, 400, 1500*time.Millisecond)
		if !l.engaged.Load() {
			t.Error("let go although limiting quadrupled the throughput")
		}
	})
}

// A hot spot that starts after a calm, fast period is judged against the
// rate since the conflicts became costly, not against the calm one: the
// limited db commits less than it did calm, but ten times what it did
// once the hot spot began, and the limiter must stay.
func TestContentionProbationComparesWithTheContendedRate(t *testing.T) {
	l, clock := newTestLimiter()
	engageAfter(t, l, clock, 1000, 3*time.Second, 40) // calm at 1,000 commits/s, then 20/s
	runLimited(l, clock, 200, 1500*time.Millisecond)
	if !l.engaged.Load() {
		t.Error("let go although the db committed less only than in the calm before the conflicts")
	}
}

// Limiting helps only transactions that collide with each other (issue 9
// item 8): a costly conflict with no other call's conflict shortly before
// it is one caller waiting on something outside, and does not engage the
// limiter; a second call's conflict right after does.
func TestContentionNeedsTwoCallsColliding(t *testing.T) {
	ctx := context.Background()
	t.Run("two calls", func(t *testing.T) {
		l, clock := newTestLimiter()
		warmUp(l, 16)
		clock.Advance(3 * time.Second)
		var slots []txSlot
		for range 8 {
			s, _ := l.acquire(ctx)
			slots = append(slots, s)
		}
		l.release(slots[0], true, false, time.Second)
		if l.engaged.Load() {
			t.Fatal("one call's conflict engaged the limiter")
		}
		clock.Advance(100 * time.Millisecond)
		l.release(slots[1], true, false, time.Second)
		if !l.engaged.Load() {
			t.Fatal("two calls' conflicts close together did not engage the limiter")
		}
	})
}

// engagedAtOne engages the limiter with room for one transaction and
// hands back that one's slot, held.
func engagedAtOne(t *testing.T, l *txLimiter) txSlot {
	t.Helper()
	warmUp(l, 4)
	a, _ := l.acquire(context.Background())
	b, _ := l.acquire(context.Background())
	l.release(a, true, false, 100*time.Millisecond) // engage at 1
	l.release(b, false, false, 0)
	if !l.engaged.Load() || int(l.limit) != 1 {
		t.Fatalf("engaged=%v limit=%v", l.engaged.Load(), l.limit)
	}
	held, _ := l.acquire(context.Background())
	if !held.limited {
		t.Fatal("the first caller after engaging got no slot")
	}
	return held
}

// Contention control must never be the reason no transaction of the db
// makes progress: when callers wait and nothing has completed for a while
// (a slot holder that never finishes, or one whose closure waits for a slot
// itself through a RunInTx nested on a context of its own), it lets go, and
// the waiters run.
func TestContentionLetsGoWhenNothingCompletes(t *testing.T) {
	l, clock := newTestLimiter()
	held := engagedAtOne(t, l)
	// The holder's closure runs a RunInTx on a fresh context: the limiter
	// cannot tell it from any other caller. Two more callers queue.
	type got struct {
		s   txSlot
		err error
		at  time.Duration // fake time from the start of the wait
	}
	start := clock.Now()
	done := make(chan got, 3)
	for range 3 {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s, err := l.acquire(ctx)
			done <- got{s, err, clock.Now().Sub(start)}
		}()
	}
	// Limiting still holds while the fake clock stands still.
	select {
	case g := <-done:
		t.Fatalf("a caller got in while the slot was held and no time passed: %+v", g)
	case <-time.After(300 * time.Millisecond):
	}
	// Time passes with nothing completing.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				clock.Advance(10 * time.Millisecond)
			}
		}
	}()
	for range 3 {
		g := <-done
		if g.err != nil {
			t.Fatalf("a waiting caller (or the nested one) never got in: %v", g.err)
		}
		if g.at < 1200*time.Millisecond || g.at > 5*time.Second {
			t.Errorf("a waiter got in after %v of no progress, want after 1.2 s (PostgreSQL's deadlock_timeout and more) and within a few seconds", g.at)
		}
	}
	if l.engaged.Load() || l.letGo.Load() != 1 {
		t.Errorf("engaged=%v letGo=%d: want let go once", l.engaged.Load(), l.letGo.Load())
	}
	l.release(held, false, true, 5*time.Second)
	// It stays out for a while, like after a failed probation.
	for i := range 50 {
		s, _ := l.acquire(context.Background())
		clock.Advance(10 * time.Millisecond)
		l.release(s, i%2 == 0, i%2 != 0, 200*time.Millisecond)
	}
	if l.engaged.Load() {
		t.Error("engaged again right after letting go for a stall")
	}
}

// A queue behind a working limiter is not a stall: while transactions
// keep completing, waiters wait their turn however long it takes.
func TestContentionKeepsLimitingWhileTransactionsComplete(t *testing.T) {
	l, clock := newTestLimiter()
	held := engagedAtOne(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := l.acquire(ctx)
		done <- err
	}()
	// Attempts that held no slot (in flight since before it engaged) keep
	// completing, one every 100 ms, for 4 s of fake time (1.6 s of real
	// time, for the waiter's timer to look).
	for range 40 {
		s := txSlot{}
		l.inflight.Add(1)
		clock.Advance(100 * time.Millisecond)
		l.release(s, false, false, 100*time.Millisecond)
		select {
		case err := <-done:
			t.Fatalf("the waiter got in (%v) although transactions kept completing", err)
		case <-time.After(40 * time.Millisecond):
		}
	}
	if !l.engaged.Load() {
		t.Fatal("let go although transactions kept completing")
	}
	l.release(held, false, true, time.Millisecond)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

const (
	gateLock   = "SELECT pg_catalog.pg_advisory_lock($1)"
	gateUnlock = "SELECT pg_catalog.pg_advisory_unlock($1)" // and whether others wait
)

// transferOnce is one RunInTx of the same closure code each call (its
// queue's name is the function's).
func transferOnce(ctx context.Context, db *sql.DB) error {
	return RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - 1 WHERE id = 1")
		return err
	})
}

// gateWaiting is how many attempts wait for g's turn.
func gateWaiting(g *serverGate) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.waiters)
}

// waitRan waits until prefix has run n times (a turn's lock goes back on a
// goroutine of its own, after the turn).
func waitRan(t *testing.T, srv *fakeServer, prefix string, n int) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); srv.ranCount(prefix) < n; {
		if time.Now().After(end) {
			t.Fatalf("%q ran %d times, want %d", prefix, srv.ranCount(prefix), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// While the limiter is engaged, an attempt waits for its replica's turn in
// the server before its transaction (so that the replicas of an
// application, each with its own limiter, take turns at one lock): a
// session lock named after the closure, taken once for a turn of several
// transactions on a session outside the db's pool (with one pooled
// connection the turn's transactions would otherwise wait for the
// connection that holds the lock, forever), and given back after it.
func TestContentionGateQueuesInTheServerWhileEngaged(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithContentionQueue(true))
	db.SetMaxOpenConns(1)
	engage(t, db)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for range 3 {
		if err := transferOnce(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	waitRan(t, srv, gateUnlock, 1)
	srv.mu.Lock()
	ran := append([]string(nil), srv.ran...)
	srv.mu.Unlock()
	var seq []string
	for _, q := range ran {
		switch {
		case q == gateLock:
			seq = append(seq, q)
		case strings.HasPrefix(q, gateUnlock):
			seq = append(seq, gateUnlock)
		case strings.HasPrefix(q, "UPDATE accounts"):
			seq = append(seq, "UPDATE")
		}
	}
	want := []string{gateLock, "UPDATE", "UPDATE", "UPDATE", gateUnlock}
	if !slices.Equal(seq, want) {
		t.Errorf("statements %q, want %q (one turn)", seq, want)
	}
	// The queue's session is closed after the unlock, on the same goroutine
	// (the oldest-Go step of a CI rehearsal looked in between).
	n := srv.openConns.Load()
	for end := time.Now().Add(2 * time.Second); n != 1 && time.Now().Before(end); n = srv.openConns.Load() {
		time.Sleep(time.Millisecond)
	}
	if n != 1 {
		t.Errorf("%d sessions open after the turn, want 1 (the pool's; the idle queue's is closed)", n)
	}
}

// In a turn, the closure's transactions run one at a time, however many
// the limiter allows: the turn is the hot spot's, and within it they
// would only collide with each other.
func TestContentionGateOneTransactionAtATimeInATurn(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithContentionQueue(true))
	l := engage(t, db)
	l.mu.Lock()
	l.limit = 8
	l.mu.Unlock()
	var in, most atomic.Int64
	fn := func(ctx context.Context, tx *sql.Tx) error {
		n := in.Add(1)
		defer in.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		time.Sleep(2 * time.Millisecond)
		_, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - 1 WHERE id = 1")
		return err
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 5 {
				if err := RunInTx(context.Background(), db, nil, fn); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if m := most.Load(); m != 1 {
		t.Errorf("%d transactions of the closure ran at once in a turn, want 1", m)
	}
	if n := srv.ranCount(gateLock); n < 2 {
		t.Errorf("%d turns for 40 transactions of 2 ms, want a new turn every %v", n, gateTurn)
	}
}

// A turn that ends with nothing in it (the replica idle when its time was
// up) goes back at once when the next attempt comes: that attempt does
// not wait for gateWait. (The first version left it held: the attempt
// waited 2 s and ran without the queue.)
func TestContentionGateIdleTurnEnds(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	clock := newFakeClock()
	g := &serverGate{connector: retrierOf(db).inner, dialect: DialectPostgres, key: 1, clock: clock}
	ctx := context.Background()
	if !g.enter(ctx) {
		t.Fatal("no turn")
	}
	g.leave()
	clock.Advance(gateTurn) // the turn's time is up; its timer has not fired yet
	start := time.Now()
	if !g.enter(ctx) {
		t.Fatal("no second turn")
	}
	g.leave()
	if el := time.Since(start); el > gateWait/2 {
		t.Errorf("the next attempt waited %v for an idle turn to end", el)
	}
	waitRan(t, srv, gateLock, 2)
}

// A wait for a turn ends with the caller's context: a lock that hangs in
// the server (a holder's session that never answers) costs the caller its
// deadline, not gateWait.
func TestContentionGateWaitEndsWithTheContext(t *testing.T) {
	srv := newFakeServer()
	srv.script(gateLock, step{block: true})
	db, _ := testDB(t, srv, WithContentionQueue(true))
	engage(t, db)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := transferOnce(ctx, db)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want the deadline", err)
	}
	if el := time.Since(start); el > gateWait/2 {
		t.Errorf("RunInTx returned after %v, its deadline was 100ms", el)
	}
}

// Not engaged, the queue costs nothing: no extra statement. Nor does it
// without WithContentionQueue(true) (off by default), engaged or not.
func TestContentionGateNotTakenWhileUnlimited(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithContentionQueue(true))
	if err := transferOnce(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	if n := srv.ranCount("SELECT pg_catalog.pg_advisory"); n != 0 {
		t.Errorf("%d advisory lock statements while the limiter was not engaged", n)
	}
	off, _ := testDB(t, srv)
	engage(t, off)
	if err := transferOnce(context.Background(), off); err != nil {
		t.Fatal(err)
	}
	if n := srv.ranCount("SELECT pg_catalog.pg_advisory"); n != 0 {
		t.Errorf("%d advisory lock statements with the queue off", n)
	}
}

// Every replica of one program names the same queue (the closure's
// function, created at one place in the code), and different closures
// different ones.
func TestContentionGateNameIsTheClosures(t *testing.T) {
	mk := func() func(context.Context, *sql.Tx) error {
		return func(context.Context, *sql.Tx) error { return nil }
	}
	other := func(context.Context, *sql.Tx) error { return errors.New("x") }
	var names []string
	for range 2 { // one call site: an inlined mk has a name per site
		names = append(names, gateName(mk()))
	}
	a, b := names[0], names[1]
	if a == "" || a != b {
		t.Errorf("two closures of one literal: %q and %q", a, b)
	}
	if c := gateName(other); c == a {
		t.Errorf("two literals share the queue %q", c)
	}
	if gateKey(a) == gateKey(gateName(other)) {
		t.Error("two names, one key")
	}
}

// The queue never fails a transaction: when the lock cannot be taken (an
// error, the holder's session hung past gateWait), the attempt runs
// without it, and the connection whose lock state is in doubt is closed.
func TestContentionGateFailsOpen(t *testing.T) {
	srv := newFakeServer()
	srv.script(gateLock, step{err: &pgError{"57014", "canceling statement due to user request"}})
	db, _ := testDB(t, srv, WithContentionQueue(true))
	engage(t, db)
	if err := transferOnce(context.Background(), db); err != nil {
		t.Fatalf("the queue's failure surfaced: %v", err)
	}
	if n := srv.ranCount("UPDATE accounts"); n != 1 {
		t.Errorf("the transaction committed %d times, want 1", n)
	}
	if n := srv.ranCount(gateUnlock); n != 0 {
		t.Errorf("%d unlocks of a lock not taken", n)
	}
	if n := srv.openConns.Load(); n != 1 {
		t.Errorf("%d connections open, want 1 (the one whose lock failed is closed)", n)
	}
}

// A session whose unlock failed may still hold the lock: it is closed (the
// server then releases the lock), never kept for the next turn, where it
// would keep every replica's queue blocked.
func TestContentionGateUnlockFailureClosesTheSession(t *testing.T) {
	srv := newFakeServer()
	srv.script(gateUnlock, step{err: &pgError{"57014", "canceling statement due to user request"}})
	db, _ := testDB(t, srv, WithContentionQueue(true))
	clock := newFakeClock()
	g := &serverGate{connector: retrierOf(db).inner, dialect: DialectPostgres, key: 1, clock: clock}
	ctx := context.Background()
	if !g.enter(ctx) {
		t.Fatal("no turn")
	}
	clock.Advance(gateTurn)
	done := make(chan bool)
	go func() { done <- g.enter(ctx) }() // waits: the turn must go back first
	for gateWaiting(g) == 0 {
		time.Sleep(time.Millisecond)
	}
	g.leave() // the unlock fails; the next turn needs a new session
	if !<-done {
		t.Fatal("no turn after the failed unlock")
	}
	g.leave()
	if n := srv.ranCount(gateLock); n != 2 {
		t.Fatalf("%d locks, want 2", n)
	}
	srv.mu.Lock()
	dials := srv.dials
	srv.mu.Unlock()
	if dials != 2 {
		t.Errorf("%d sessions opened, want 2 (the one whose unlock failed is not used again)", dials)
	}
}

// A RunInTx nested in an attempt that holds the lock does not queue again:
// on another session it would wait for its own outer's lock.
func TestContentionGateNotTakenWhenNested(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithContentionQueue(true))
	engage(t, db)
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if err := transferOnce(ctx, db); err != nil { // the closure's context
			return err
		}
		return transferOnce(context.Background(), db) // a context of its own
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := srv.ranCount(gateLock); n != 1 {
		t.Errorf("%d locks taken, want 1 (the outer's)", n)
	}
}

// The queue in the server outlives the limiter's engagement: a replica
// whose limiter let go (its probation failed because queueing behind the
// other replicas lowered its own rate) keeps queueing for gateMemory after
// the last costly conflict, instead of running past the replicas that
// wait in the queue (TestPostgresReplicasHotSpot: the replica whose
// limiter let go committed 395 transactions, the three others 30-41).
func TestContentionGateOutlivesTheEngagement(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 16)
	ctx := context.Background()
	var slots []txSlot
	for range 4 {
		s, _ := l.acquire(ctx)
		slots = append(slots, s)
	}
	l.release(slots[0], true, false, time.Second) // a deadlock ...
	l.release(slots[1], true, false, time.Second) // ... and its partner's: not one caller's alone
	l.release(slots[2], false, true, time.Millisecond)
	l.release(slots[3], false, true, time.Millisecond)
	l.mu.Lock()
	l.quietAfterLetGoLocked(clock.Now()) // the probation failed
	l.mu.Unlock()
	if l.engaged.Load() {
		t.Fatal("still engaged")
	}
	s, _ := l.acquire(ctx)
	l.release(s, false, true, time.Millisecond)
	if !s.gated {
		t.Error("an attempt right after a let-go skipped the queue")
	}
	clock.Advance(gateMemory + time.Millisecond)
	s, _ = l.acquire(ctx)
	l.release(s, false, true, time.Millisecond)
	if s.gated {
		t.Errorf("an attempt %v after the last costly conflict still queued", gateMemory)
	}
}

// One caller's conflict alone (waiting on a lock held outside the db) does
// not send the others to the queue.
func TestContentionGateNotForALoneConflict(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 16)
	clock.Advance(3 * time.Second) // the warm-up's cheap conflicts are long past
	ctx := context.Background()
	s, _ := l.acquire(ctx)
	l.release(s, true, false, time.Second)
	s, _ = l.acquire(ctx)
	l.release(s, false, true, time.Millisecond)
	if s.gated || l.engaged.Load() {
		t.Errorf("one lone conflict: gated %v, engaged %v", s.gated, l.engaged.Load())
	}
}

// Conflicts that do not engage the limiter (here: soon after a failed
// probation) do not start the queue either: a replica alone in the queue
// while the others run freely gets less than its share.
func TestContentionGateStartsOnlyWithTheLimiter(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 16)
	l.mu.Lock()
	l.quietUntil = clock.Now().Add(time.Minute)
	l.mu.Unlock()
	ctx := context.Background()
	a, _ := l.acquire(ctx)
	b, _ := l.acquire(ctx)
	l.release(a, true, false, time.Second)
	l.release(b, true, false, time.Second)
	s, _ := l.acquire(ctx)
	l.release(s, false, true, time.Millisecond)
	if l.engaged.Load() {
		t.Fatal("engaged while quiet")
	}
	if s.gated {
		t.Error("conflicts that did not engage the limiter started the queue")
	}
}

// Issue 13 goal 4: a COMMIT lost when the server crashed, found not
// committed once it was back (so replayed), is a lost connection, not a
// conflict between this db's transactions, however long the attempt took.
// Counted as one, its seconds of waiting for the server (resolution, the
// breaker) engaged the limiter with a hold of 10 s after every PostgreSQL
// restart, and the chaos benchmark's pgx/restart committed 1,463
// transactions/s against the plain driver's 2,033.
func TestContentionIgnoresCommitsLostWithTheConnection(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv, WithoutBudget())
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour) // the fake clock runs ahead
	defer cancel()
	transfer := func(took time.Duration) func(context.Context, *sql.Tx) error {
		return func(ctx context.Context, tx *sql.Tx) error {
			clock.Advance(took)
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
			return err
		}
	}
	// Before the crash: commits of a millisecond, and a cheap real conflict
	// now and then (the workload's serialization failures).
	for i := range 60 {
		if i%10 == 9 {
			srv.script("UPDATE", step{err: &pgError{"40001", "could not serialize access due to concurrent update"}})
		}
		if err := RunInTx(ctx, db, nil, transfer(time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	// The crash: COMMIT loses its connection; once the server is back,
	// resolution finds it did not commit, and the transaction is replayed.
	// Its attempt took seconds (the outage).
	for range 3 {
		srv.script("COMMIT", step{err: errLost})
		if err := RunInTx(ctx, db, nil, transfer(5*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	if s := stats(t, db); s.CommitsResolved == 0 || s.ContentionCuts != 0 {
		t.Errorf("commits resolved %d, contention cuts %d: want lost COMMITs resolved and no cut", s.CommitsResolved, s.ContentionCuts)
	}
}

// The conflicts of attempts that started before the last cut are one
// signal with the conflict that made it (TCP does not cut again for the
// losses of packets sent before its cut). A deadlock found after
// deadlock_timeout ends, within milliseconds, the transactions queued on
// its locks too (serialization failures after a second's wait): counted as
// rounds of their own, they cut the limit from 4 to 1 and doubled the hold
// twice, to 13 s, after a PostgreSQL restart (chaos pgx/restart). A
// conflict of an attempt that started after the cut still cuts.
func TestContentionOneCutForConflictsStartedBeforeIt(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 16)
	ctx := context.Background()
	var slots []txSlot
	for range 8 {
		s, _ := l.acquire(ctx)
		slots = append(slots, s)
	}
	clock.Advance(time.Second) // they all wait on the deadlock
	for _, s := range slots {
		l.release(s, true, false, time.Second)
	}
	if !l.engaged.Load() {
		t.Fatal("a deadlock and the conflicts behind it did not engage the limiter")
	}
	if d := l.decrease.Load(); d != 1 || l.limit != 4 {
		t.Fatalf("cuts %d, limit %v: want one cut, to half of the 8 in flight", d, l.limit)
	}
	// New attempts, started after the cut, conflict: that cuts again.
	clock.Advance(time.Millisecond)
	for range 4 {
		s, _ := l.acquire(ctx)
		clock.Advance(time.Millisecond)
		l.release(s, true, false, time.Millisecond)
	}
	if d := l.decrease.Load(); d < 2 || l.limit >= 4 {
		t.Errorf("cuts %d, limit %v: want more cuts for conflicts that began after the first", d, l.limit)
	}
}

// gateServer is a PostgreSQL that answers the queue's statements only:
// the lock, and the unlock or probe, with whether another session holds
// or waits for the lock (others).
type gateServer struct {
	others  atomic.Bool
	queries atomic.Int64
	unlocks atomic.Int64
}

func (s *gateServer) Connect(context.Context) (driver.Conn, error) { return gateConn{s}, nil }
func (s *gateServer) Driver() driver.Driver                        { return nil }

type gateConn struct{ s *gateServer }

func (c gateConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("not supported") }
func (c gateConn) Close() error                        { return nil }
func (c gateConn) Begin() (driver.Tx, error)           { return nil, errors.New("not supported") }
func (c gateConn) ExecContext(context.Context, string, []driver.NamedValue) (driver.Result, error) {
	return driver.RowsAffected(0), nil // the lock
}
func (c gateConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	c.s.queries.Add(1)
	if strings.HasPrefix(q, gateUnlock) {
		c.s.unlocks.Add(1)
	}
	return &fakeRows{cols: []string{"a", "b"}, data: [][]driver.Value{{true, c.s.others.Load()}}}, nil
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// A replica whose conflict came while it was outside the queue joins the
// queue when another replica uses it (its own limiter may never engage:
// its conflicts look rare or lone), and does not when none does. Probes
// are spaced.
func TestContentionGateJoinsWhenOthersQueue(t *testing.T) {
	for _, others := range []bool{false, true} {
		l, clock := newTestLimiter()
		srv := &gateServer{}
		srv.others.Store(others)
		g := l.gate(srv, DialectPostgres, "app.transfer")
		g.probe()
		g.probe() // too soon after the first
		waitFor(t, "the probe", func() bool { return srv.queries.Load() == 1 && !g.probing.Load() })
		if got := l.gating(); got != others {
			t.Errorf("others in the queue %v: gating %v", others, got)
		}
		clock.Advance(gateProbeEvery)
		g.probe()
		waitFor(t, "the second probe", func() bool { return srv.queries.Load() == 2 && !g.probing.Load() })
	}
}

// While other replicas wait for the lock, a replica stays in the queue past
// gateMemory (in the queue none of them conflicts, and one that left would
// run past the others), but not longer than gateStick after its own last
// conflict.
func TestContentionGateStaysWhileOthersWait(t *testing.T) {
	for _, tc := range []struct {
		name          string
		others        bool
		sinceConflict time.Duration
		want          bool
	}{
		{"others wait", true, 4 * time.Second, true},
		{"nobody waits", false, 4 * time.Second, false},
		{"others wait, own conflict long past", true, gateStick, false},
	} {
		l, clock := newTestLimiter()
		srv := &gateServer{}
		srv.others.Store(tc.others)
		l.joinGate(clock.Now(), true)
		clock.Advance(tc.sinceConflict)
		l.gateUntil.Store(clock.Now().Add(time.Second).UnixNano()) // in the queue for one more second
		g := l.gate(srv, DialectPostgres, "app.transfer")
		if !g.enter(context.Background()) {
			t.Fatal("no turn")
		}
		clock.Advance(gateTurn)
		g.leave() // the turn goes back
		waitFor(t, "the unlock", func() bool { return srv.unlocks.Load() == 1 })
		time.Sleep(10 * time.Millisecond) // stay runs after the unlock's answer
		clock.Advance(2 * time.Second)
		if got := l.gating(); got != tc.want {
			t.Errorf("%s: gating %v 2 s later, want %v", tc.name, got, tc.want)
		}
	}
}

// A lock that cannot be taken (its holder's session hangs: a replica whose
// host vanished keeps it until the server's keepalive notices) costs one
// wait of gateWait; later attempts run without the queue at once, for
// gateBroken.
func TestContentionGateHungHolderIsNotWaitedForAgain(t *testing.T) {
	srv := newFakeServer()
	srv.script(gateLock, step{block: true})
	db, _ := testDB(t, srv)
	clock := newFakeClock()
	g := &serverGate{connector: retrierOf(db).inner, dialect: DialectPostgres, key: 1, clock: clock}
	ctx := context.Background()
	if g.enter(ctx) {
		t.Fatal("a turn from a lock that hangs")
	}
	waitFor(t, "the failed take", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.state == gateFree
	})
	start := time.Now()
	if g.enter(ctx) {
		t.Fatal("a turn")
	}
	if el := time.Since(start); el > gateWait/4 {
		t.Errorf("the next attempt waited %v", el)
	}
	clock.Advance(gateBroken)
	if !g.enter(ctx) {
		t.Error("no turn once the lock can be taken again")
	}
	g.leave()
}

// Outside the queue, an attempt looks whether other replicas use it after
// a conflict, and, for gateStick after the last one, after commits too
// (the replica that wins every collision sees no conflict of its own).
func TestContentionGateProbesAfterCommitsForAWhile(t *testing.T) {
	l, clock := newTestLimiter()
	if l.probeDue(false) {
		t.Error("a probe before any conflict")
	}
	if !l.probeDue(true) {
		t.Error("no probe after a conflict")
	}
	clock.Advance(gateStick - time.Second)
	if !l.probeDue(false) {
		t.Error("no probe after a commit soon after a conflict")
	}
	clock.Advance(time.Second)
	if l.probeDue(false) {
		t.Errorf("a probe after a commit %v after the last conflict", gateStick)
	}
}

// At a limit of one, a conflict of a transaction that ran alone (none
// other of this db in flight, started after the last cut) came from
// outside the db: another replica of the application, another program.
// Limiting cannot remove it, so the limiter lets go and stays out for a
// while, rather than keep this replica at one transaction at a time while
// the others run freely (one replica of four on a MariaDB hot spot
// committed a quarter of the others' share: TestMariaDBReplicasHotSpot).
func TestContentionLetsGoWhenAloneAndStillConflicting(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 16)
	ctx := context.Background()
	a, _ := l.acquire(ctx)
	b, _ := l.acquire(ctx)
	l.release(a, true, false, time.Second) // a deadlock: engages at 1
	if !l.engaged.Load() || l.limit != 1 {
		t.Fatalf("engaged %v at limit %v, want engaged at 1", l.engaged.Load(), l.limit)
	}
	l.release(b, false, true, time.Millisecond)
	clock.Advance(2 * time.Second)
	s, err := l.acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l.release(s, true, false, 500*time.Millisecond) // alone, started after the cut
	if l.engaged.Load() {
		t.Fatal("still limiting at one transaction while the conflicts come from outside")
	}
	if l.letGo.Load() != 1 {
		t.Errorf("letGo = %d, want 1", l.letGo.Load())
	}
	// And it stays out for a while: the next costly conflict does not
	// engage it again at once.
	c1, _ := l.acquire(ctx)
	c2, _ := l.acquire(ctx)
	l.release(c1, true, false, time.Second)
	l.release(c2, false, true, time.Millisecond)
	if l.engaged.Load() {
		t.Error("engaged again at once after letting go")
	}
}
