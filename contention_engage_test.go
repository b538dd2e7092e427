package sqlretry

import (
	"context"
	"testing"
	"time"
)

// steady runs 8 transactions at once for d of fake time, each completion
// 1/8 ms after the last (8 workers, 1 ms each), one in eight a cheap
// conflict (0.5 ms): the chaos benchmark's 100 accounts. The slots are
// taken again, until the limiter engages.
func steady(l *txLimiter, clock *fakeClock, slots []txSlot, d time.Duration) {
	step := time.Millisecond / 8
	for i := 0; time.Duration(i)*step < d && !l.engaged.Load(); i++ {
		k := i % len(slots)
		clock.Advance(step)
		conflict := i%8 == 7
		took := time.Millisecond
		if conflict {
			took = time.Millisecond / 2
		}
		l.release(slots[k], conflict, !conflict, took)
		slots[k], _ = l.acquire(context.Background())
	}
}

// burst ends the 8 slots at once, k of them conflicts that waited wait:
// the deadlock's victim and the transactions queued on its locks, failing
// to serialize as it broke, a fraction of a millisecond apart; the others
// commits that waited as long. Then its tail, as traced: new transactions
// commit for 2 ms, and one more that had queued on the deadlock's locks
// fails to serialize. The slots are taken again, until the limiter engages.
func burst(l *txLimiter, clock *fakeClock, slots []txSlot, k int, wait time.Duration) {
	for i := 0; i < len(slots) && !l.engaged.Load(); i++ {
		clock.Advance(100 * time.Microsecond)
		conflict := i < k
		l.release(slots[i], conflict, !conflict, wait)
		slots[i], _ = l.acquire(context.Background())
	}
	steady(l, clock, slots[1:], 2*time.Millisecond)
	if !l.engaged.Load() {
		clock.Advance(100 * time.Microsecond)
		l.release(slots[0], true, false, wait)
		slots[0], _ = l.acquire(context.Background())
	}
}

func eightSlots(l *txLimiter) []txSlot {
	var slots []txSlot
	for range 8 {
		s, _ := l.acquire(context.Background())
		slots = append(slots, s)
	}
	return slots
}

// One deadlock on a workload whose conflicts are otherwise rare and cheap
// (chaos pgx/restart: 100 accounts, 8 workers) stalls every worker for
// PostgreSQL's deadlock_timeout: the pair caught in it, and the others
// queued one by one on their locks, which then fail to serialize within
// milliseconds of each other as the deadlock breaks. That is one event,
// not transactions that keep colliding: it engaged contention control
// (its waste was two thirds of the time, from that one burst), a cheap
// conflict a round later cut the limit to 1–1.75 and doubled the hold to
// 7–30 s, and the rest of the run went one transaction at a time (in 13
// of 16 traced runs; still engaged at the end of 10). Limiting does not
// pay for a deadlock every few seconds: it stays out.
func TestContentionOneDeadlockIsOneEvent(t *testing.T) {
	l, clock := newTestLimiter()
	slots := eightSlots(l)
	steady(l, clock, slots, 2*time.Second)
	burst(l, clock, slots, 7, time.Second)
	if l.engaged.Load() {
		t.Fatalf("one deadlock and the transactions queued on its locks engaged the limiter (limit %v)", l.limit)
	}
	steady(l, clock, slots, 500*time.Millisecond)
	if l.engaged.Load() {
		t.Fatalf("the cheap conflicts after one deadlock engaged the limiter (limit %v)", l.limit)
	}
	// Another one, seconds later: still rare.
	steady(l, clock, slots, 3*time.Second)
	burst(l, clock, slots, 7, time.Second)
	steady(l, clock, slots, 500*time.Millisecond)
	if l.engaged.Load() {
		t.Fatalf("two deadlocks 3 s apart engaged the limiter (limit %v)", l.limit)
	}
}

// Deadlocks that recur, one per deadlock_timeout and the transactions
// queued on their locks (the hot spot), engage it at the second.
func TestContentionRecurringDeadlocksEngage(t *testing.T) {
	l, clock := newTestLimiter()
	slots := eightSlots(l)
	steady(l, clock, slots, time.Second)
	burst(l, clock, slots, 7, time.Second)
	if l.engaged.Load() {
		t.Fatal("one deadlock engaged the limiter")
	}
	clock.Advance(time.Second)
	burst(l, clock, slots, 7, time.Second)
	if !l.engaged.Load() {
		t.Fatal("a second deadlock a second after the first did not engage the limiter")
	}
}
