package sqlretry

import (
	"context"
	"testing"
	"time"
)

// The READ COMMITTED hot spot (attack5: 16 callers lock 2 of 4 accounts
// in random order): a waiter goes on when the holder commits, so the only
// conflicts are deadlocks, each found after deadlock_timeout (1 s), and
// the attempts complete a few a second. Two rounds of the 16 in flight
// took 3-8 s to complete there, and the limiter, waiting for them before
// judging, engaged late or never in a 10 s run (1.5-4 commits a second).
// Deadlocks that waste two thirds of the time, from three of them, are a
// measure enough.
func TestContentionEngagesOnDeadlocksBeforeTwoRounds(t *testing.T) {
	l, clock := newTestLimiter()
	var slots []txSlot
	for range 16 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	clock.Advance(time.Second)
	l.release(slots[0], true, false, time.Second) // the first deadlock: lone
	clock.Advance(10 * time.Millisecond)
	l.release(slots[1], false, true, time.Second) // its winner
	clock.Advance(10 * time.Millisecond)
	l.release(slots[2], true, false, time.Second)
	if l.engaged.Load() {
		t.Fatal("engaged at the second conflict")
	}
	clock.Advance(time.Second)
	l.release(slots[3], true, false, 2*time.Second)
	if !l.engaged.Load() {
		t.Fatalf("three deadlocks wasting three quarters of the time did not engage the limiter (%d of 16 completed)", 4)
	}
}

// The probation compares the commit rate after engaging with the rate
// before over at least probationCommits of the latter: on the READ
// COMMITTED hot spot the rate before was 1-3 commits a second, the second
// after engaging was spent by the attempts already stuck in the server's
// lock queues (waiting for deadlock_timeout), and one commit against two
// let go, for 5 s, in a run that then committed 150 a second limited.
func TestContentionProbationNeedsEnoughCommits(t *testing.T) {
	l, clock := newTestLimiter()
	engageAfter(t, l, clock, 2, 3*time.Second, 4) // 2 commits a second
	if l.probation <= 0 || l.probation > 3 {
		t.Fatalf("probation against %v commits/s, want 1-3", l.probation)
	}
	// The first 1.5 s: one commit (the stuck attempts still hold the rows).
	clock.Advance(1500 * time.Millisecond)
	s, _ := l.acquire(context.Background())
	l.release(s, false, true, time.Millisecond)
	if !l.engaged.Load() {
		t.Fatal("let go after one commit in 1.5 s, against 2 a second before")
	}
	runLimited(l, clock, 100, 4*time.Second)
	if !l.engaged.Load() {
		t.Fatal("let go although limiting committed 100 a second against 2")
	}
	if l.probation != 0 {
		t.Fatal("still on probation after 5.5 s")
	}
}

// A replay's conflict does not engage the limiter (one caller waiting on
// a lock held outside replays alone), but one met while it held a slot of
// the engaged limiter is a conflict among the slot holders, and cuts the
// limit: counted only at each call's first conflict, the READ COMMITTED
// hot spot (calls replaying for seconds) stayed at a limit of 7-8 for 16
// callers on 4 rows, for seconds, in traced runs.
func TestContentionReplayConflictsCutWhileEngaged(t *testing.T) {
	l, clock := newTestLimiter()
	warmUp(l, 12)
	for i := 0; i < 64; i++ {
		s, _ := l.acquire(context.Background())
		s.replay = true
		clock.Advance(time.Millisecond)
		l.releaseCost(s, true, false, 20*time.Millisecond, time.Second)
	}
	if l.engaged.Load() {
		t.Fatalf("replays' conflicts engaged the limiter (limit %v)", l.limit)
	}
	// Engage at 8 (16 in flight), then the slot holders' replays conflict.
	var slots []txSlot
	for range 16 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	clock.Advance(3 * time.Second)
	for i := 0; !l.engaged.Load(); i++ {
		if i == 16 {
			t.Fatal("did not engage")
		}
		l.release(slots[i], true, false, time.Second)
		clock.Advance(10 * time.Millisecond)
	}
	limit := l.limit
	for i := 0; i < 40; i++ {
		s, _ := l.acquire(context.Background())
		if !s.limited {
			break
		}
		s.replay = true
		clock.Advance(30 * time.Millisecond)
		l.releaseCost(s, true, false, 20*time.Millisecond, time.Second)
	}
	if l.limit >= limit/2 {
		t.Errorf("slot holders' replays kept conflicting and the limit stayed at %v (engaged at %v)", l.limit, limit)
	}
}

// While contention control is engaged, a call's bound stops climbing below
// deadlock_timeout instead of ending: an attempt with no bound joins the
// tangle of lock waits that only PostgreSQL's deadlock detection unwinds,
// one victim a second, and holds its slot meanwhile. On the READ COMMITTED
// hot spot 34-65 % of the attempts ran unbounded, most of them replays
// past 640 ms, and the runs that failed spent their 5 s in that tangle.
// Unlimited, the bounds end as before (a caller behind a batch session's
// row waits as long as it takes).
func TestShortWaitKeepsItsBoundWhileContentionControlIsEngaged(t *testing.T) {
	w := &lockWaits{deadlockMS: 1000}
	srv, db, _ := shortWaitDB(t, w)
	l := retrierOf(db).txLimit
	l.mu.Lock()
	l.limit, l.ceiling = 100, 1000
	l.engaged.Store(true)
	l.mu.Unlock()
	for range 8 {
		srv.script("UPDATE", step{err: errLockTimeout})
	}
	if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
		t.Fatal(err)
	}
	if want := []int64{20, 40, 80, 160, 320, 640, 640, 640}; !sameInts(w.got(), want) {
		t.Fatalf("bounds while engaged %v, want %v", w.got(), want)
	}
}
