package sqlretry

import (
	"context"
	"errors"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// txLimiter is RunInTx's contention control: while the transactions of one
// *sql.DB keep conflicting (serialization failures, deadlocks, lock-wait
// timeouts), it bounds how many of them run at once, the way TCP bounds a
// congested flow (additive increase, multiplicative decrease). On a hot spot
// the transactions then queue, first come first served, instead of aborting
// each other, and the server spends no time detecting deadlocks
// (PostgreSQL waits deadlock_timeout, 1 s by default, before it looks).
//
// It acts on conflicts that are costly (they waste a third of the time or
// more) and frequent (one per three commits or more), or very costly (two
// thirds of the time: deadlocks, each found after deadlock_timeout). Until the
// first conflict it only counts: the transactions in flight, the commits
// and their time. It lets go again when the limit has grown back past
// twice the concurrency it started from, when limiting does not pay (see
// probation), and when callers wait while nothing completes (see
// stallAfter): it must never be the reason no transaction makes progress.
type txLimiter struct {
	inflight atomic.Int64
	engaged  atomic.Bool
	clock    Clock
	useful   atomic.Int64 // time spent in attempts that committed, ns ...
	wasted   atomic.Int64 // ... and in attempts a conflict aborted
	total    atomic.Int64 // attempts that committed, ever

	mu        sync.Mutex
	gen       uint64  // counts engagements and releases: slots of an older one are void
	limit     float64 // transactions allowed at once, while engaged
	ceiling   float64 // at or above this the limiter lets go
	running   int     // transactions holding a slot, while engaged
	since     int     // completions since the last decrease
	waiters   []*txWaiter
	hold      time.Duration // after a cut, the limit does not grow for this long ...
	holdEnd   time.Time     // ... until then
	lastCut   time.Time
	conflicts int64        // attempts a conflict aborted, ever
	lastAt    time.Time    // when the last conflict ended, while unlimited
	aborts    int64        // ... of the counted history, halved with it
	base      int64        // total at the start of the counted history
	queued    atomic.Int64 // transactions that waited for a slot
	decrease  atomic.Int64 // times the limit was cut

	// Limiting must earn its keep. The commit rate is taken over windows
	// of at least a second while unlimited (at conflicts, off the hot
	// path); for a second after engaging, and until the limit was cut,
	// the limiter is on probation: if the db commits less than it did
	// just before, it lets go and stays out for a while (quiet: 5 s,
	// doubling while probations keep failing, up to a minute).
	markAt       time.Time
	markTotal    int64
	rateBefore   float64 // commits/s in the last window before engaging; 0: none
	engagedAt    time.Time
	engagedTotal int64
	probation    float64 // the rate to beat; 0: no probation under way
	quiet        time.Duration
	quietUntil   time.Time
	letGo        atomic.Int64 // probations failed, and stalls let go

	// The safety valve: while engaged, when a caller waits and no attempt
	// has completed for stallAfter, it lets go (as after a failed
	// probation). A slot holder may wait for something only a waiter can
	// give: a RunInTx nested on a context of its own (nesting is seen
	// through the context) waits for a slot while its outer holds one and
	// the row lock the others queue on.
	lastDone time.Time     // when the last attempt completed, while engaged
	slowest  time.Duration // the longest attempt seen in this engagement

	// The database-side queue (enterGate, WithContentionQueue) is used
	// while the limiter is engaged, and for gateMemory after a costly
	// conflict met while engaged or while the queue was in use: a replica
	// whose limiter let go (its probation failed: queueing behind the other
	// replicas lowered its own rate) must not run past the queue the others
	// wait in. Conflicts before the limiter first engages do not start it:
	// a replica in the queue while the others run freely gets less than
	// its share (MariaDB, 4 replicas: one queued and committed 54
	// transactions, the three others 197-215).
	gateOn     atomic.Bool
	gateUntil  atomic.Int64 // unix ns
	gateReason atomic.Int64 // unix ns: the last costly conflict, or another replica seen in the queue after a conflict
	gates      sync.Map     // closure name → *serverGate
	// lastConflict: unix ns of the last conflict of an attempt outside
	// the queue, while WithContentionQueue is on (probeDue).
	lastConflict atomic.Int64

	// The last event of costly conflicts that would have engaged it while
	// unlimited (see oneEventLocked): when it began, when its last
	// conflict ended, and wasted and useful then.
	eventAt, eventLast time.Time
	eventW, eventU     int64
}

// isConflict says whether a replayed attempt was aborted by a conflict with
// another transaction, the one thing contention control acts on: the
// server's own verdict (serialization failure, deadlock, lock wait), by
// cls. sqlretry's own verdicts count by the error they carry: a COMMIT
// lost with its connection and found not committed is replayed as
// RetryTransaction, but its cause is the lost connection (a crashed
// server, a killed session), and its attempt's time is the outage's.
// Counted as a conflict, that time engaged the limiter after every
// PostgreSQL restart with a hold of 10 s (issue 13, goal 4).
func (r *retrier) isConflict(cause error, cls Class) bool {
	for cls == RetryTransaction || cls == RetryStatement {
		var own *Error
		if !errors.As(cause, &own) {
			return true
		}
		if own.Err == nil {
			return false
		}
		cause = own.Err
		cls = r.classify(cause)
	}
	return false
}

// gateMemory is how long a costly conflict keeps the queue in use.
const gateMemory = 5 * time.Second

// joinGate puts the db's attempts in the database-side queue for
// gateMemory; conflict says that a conflict of this db's is the reason (see
// serverGate.stay).
func (l *txLimiter) joinGate(now time.Time, conflict bool) {
	if conflict {
		l.gateReason.Store(now.UnixNano())
	}
	l.gateUntil.Store(now.Add(gateMemory).UnixNano())
	l.gateOn.Store(true)
}

// gating says whether an attempt outside the engaged limiter queues in the
// server: a costly conflict was seen less than gateMemory ago.
func (l *txLimiter) gating() bool {
	if !l.gateOn.Load() {
		return false
	}
	if l.clock.Now().UnixNano() < l.gateUntil.Load() {
		return true
	}
	l.gateOn.CompareAndSwap(true, false)
	return false
}

// stallAfter is how long nothing may complete while callers wait before
// the limiter lets go: three times the longest attempt of this engagement
// (the one that engaged it included), at least 1.2 s and at most 2 s. Not
// less: PostgreSQL breaks a deadlock after deadlock_timeout (1 s by
// default), and until then the slot holders caught in it (and those queued
// on their locks) complete nothing. With 200 ms the chaos benchmark's hot
// spot (deadlocks among the slot holders) let go at its first deadlock
// and committed 480-610 transactions/s instead of 1,560-2,240.
func (l *txLimiter) stallAfterLocked() time.Duration {
	return min(2*time.Second, max(1200*time.Millisecond, 3*l.slowest))
}

type txWaiter struct {
	ready   chan struct{}
	granted bool
	gen     uint64
}

// txSlot is what acquire hands out; release gives it back.
type txSlot struct {
	limited bool   // the attempt holds a slot of the engaged limiter ...
	gen     uint64 // ... of this engagement
	gated   bool   // it queues in the server first (enterGate)
	replay  bool   // an earlier attempt of the same call was aborted by a conflict
}

// acquire waits for a slot while the limiter is engaged.
func (l *txLimiter) acquire(ctx context.Context) (txSlot, error) {
	l.inflight.Add(1)
	if !l.engaged.Load() {
		return txSlot{gated: l.gating()}, nil
	}
	l.mu.Lock()
	if !l.engaged.Load() {
		l.mu.Unlock()
		return txSlot{gated: l.gating()}, nil
	}
	if len(l.waiters) == 0 && l.running < int(l.limit) {
		l.running++
		gen := l.gen // read under the lock: a let-go bumps it (race, CI 2026-12-02)
		l.mu.Unlock()
		return txSlot{limited: true, gen: gen, gated: true}, nil
	}
	if nestedInAttempt() {
		// A RunInTx in another's closure, on a context of its own: its
		// outer may hold a slot, and waiting for one could deadlock. It
		// runs unlimited, as a nested RunInTx seen through its context does.
		l.mu.Unlock()
		return txSlot{}, nil
	}
	w := &txWaiter{ready: make(chan struct{}), gen: l.gen}
	l.waiters = append(l.waiters, w)
	stallAfter := l.stallAfterLocked()
	l.mu.Unlock()
	l.queued.Add(1)
	if l.wait(ctx, w, stallAfter) {
		return txSlot{limited: w.granted, gen: w.gen, gated: w.granted || l.gating()}, nil
	}
	l.mu.Lock()
	select {
	case <-w.ready: // granted meanwhile: give the slot to the next one
		if w.granted && w.gen == l.gen {
			l.running--
		}
		l.wakeLocked()
	default:
		for i, x := range l.waiters {
			if x == w {
				l.waiters = append(l.waiters[:i], l.waiters[i+1:]...)
				break
			}
		}
	}
	l.mu.Unlock()
	l.inflight.Add(-1)
	return txSlot{}, ctx.Err()
}

// nestedInAttempt says whether the calling goroutine runs inside an
// attempt of RunInTx (its closure, BEGIN or COMMIT): runTxOnce is on its
// stack. Only a caller about to wait asks (the stack walk costs about a
// microsecond per 50 frames, a wait for a slot far more). A RunInTx that
// the closure starts on another goroutine and waits for is not seen here;
// the stall check lets go then.
func nestedInAttempt() bool {
	var pcs [64]uintptr
	for skip := 2; ; skip += len(pcs) {
		n := runtime.Callers(skip, pcs[:])
		frames := runtime.CallersFrames(pcs[:n])
		for {
			f, more := frames.Next()
			if f.Function == runTxOnceName {
				return true
			}
			if !more {
				break
			}
		}
		if n < len(pcs) {
			return false
		}
	}
}

// runTxOnceName is runTxOnce's name in a stack trace.
var runTxOnceName = func() string {
	f := runtime.FuncForPC(reflect.ValueOf(runTxOnce).Pointer())
	if f == nil {
		return "github.com/sqlretry/sqlretry.runTxOnce"
	}
	return f.Name()
}()

// wait waits for w's turn; false: ctx ended first. Meanwhile it looks for
// a stall every stallAfter: the timer runs only while waiting, and the
// stall is judged by the clock.
func (l *txLimiter) wait(ctx context.Context, w *txWaiter, stallAfter time.Duration) bool {
	t := time.NewTimer(stallAfter)
	defer t.Stop()
	for {
		select {
		case <-w.ready:
			return true
		case <-t.C:
			t.Reset(l.checkStall(w))
		case <-ctx.Done():
			return false
		}
	}
}

// checkStall lets go when nothing has completed for stallAfter while w
// waits; otherwise it says when to look again.
func (l *txLimiter) checkStall(w *txWaiter) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-w.ready:
		return time.Hour // granted or let go meanwhile: w returns
	default:
	}
	now := l.clock.Now()
	left := l.lastDone.Add(l.stallAfterLocked()).Sub(now)
	if left > 0 {
		return left
	}
	l.quietAfterLetGoLocked(now)
	return time.Hour
}

// quietAfterLetGoLocked lets go when limiting did not pay, and keeps
// conflicts from engaging it again for a while: 5 s, doubling while that
// keeps happening, up to a minute.
func (l *txLimiter) quietAfterLetGoLocked(now time.Time) {
	l.quiet = min(time.Minute, max(5*time.Second, 2*l.quiet))
	l.quietUntil = now.Add(l.quiet)
	l.letGo.Add(1)
	l.releaseAllLocked()
}

// release returns a slot; conflict says the attempt was aborted by a
// conflict with another transaction, committed that it committed; took is
// how long the attempt ran.
func (l *txLimiter) release(s txSlot, conflict, committed bool, took time.Duration) {
	l.releaseCost(s, conflict, committed, took, took)
}

// releaseCost is release for an attempt whose conflict is counted at cost,
// not at what it took: a lock wait that ran out under a short bound
// (shortwait.go) is counted as the deadlock it most often replaced for
// what conflicts waste and how long a cut holds, while the rules that time
// attempts (the stall rule's longest attempt, when the attempt started,
// one event of conflicts) take what it took.
func (l *txLimiter) releaseCost(s txSlot, conflict, committed bool, took, cost time.Duration) {
	n := l.inflight.Add(-1) + 1 // in flight when this attempt ended, itself included
	if committed {
		l.useful.Add(int64(took))
		l.total.Add(1)
	}
	if conflict && s.replay && !s.limited {
		conflict = false // see below
	}
	if !conflict && !l.engaged.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if conflict && s.replay && s.gen != l.gen {
		// A replay's conflict is its caller's trouble (one transaction
		// waiting on a lock held outside, say) and does not engage the
		// limiter; but one met while it held a slot of this engagement
		// (s.limited, checked above, and s.gen, which every engagement
		// and every let-go moves on) is a conflict among the slot
		// holders, and may cut the limit.
		// Counted only at a call's first conflict, the READ COMMITTED hot
		// spot (calls that replay for seconds) starved the cut rule: the
		// limit stayed at 8 of 16 callers on 4 rows (attack5).
		conflict = false
		if !l.engaged.Load() {
			return
		}
	}
	if s.limited && s.gen == l.gen {
		l.running--
	}
	var now time.Time // read once while engaged
	if l.engaged.Load() {
		now = l.clock.Now()
		l.lastDone = now
		l.slowest = max(l.slowest, took)
	}
	if conflict {
		// Conflicts matter when they waste a third of the work or more:
		// cheap ones (a serialization failure found at once) are better
		// replayed than queued; a deadlock that took a second to find is not.
		w, u := l.wasted.Add(int64(cost)), l.useful.Load()
		if w+u > int64(4*time.Second) { // forget slowly
			l.wasted.Store(w / 2)
			l.useful.Store(u / 2)
			l.eventW /= 2
			l.eventU /= 2
		}
		// Nor do rare ones (fewer than one per three commits) engage it
		// unless they waste two thirds of the time or more: queueing costs
		// more throughput than a few conflicts waste (under killed
		// sessions on PostgreSQL one attempt in seven failed to serialize
		// after waiting on a row lock, about a third of the time), but not
		// more than deadlocks that each stall their cycle for
		// deadlock_timeout. Once engaged, costly conflicts cut the limit
		// however frequent.
		total := l.total.Load()
		l.conflicts++
		l.aborts++
		a, c := l.aborts, total-l.base
		if a+c > 1024 {
			l.aborts /= 2
			l.base += c / 2
		}
		seen := total + l.conflicts // attempts completed
		engaged := l.engaged.Load()
		lone := false
		if !engaged {
			now = l.clock.Now()
			l.markRateLocked(now)
			// Limiting helps only transactions that collide with each
			// other. A conflict with no other call's conflict shortly
			// before it (RunInTx reports only a call's first conflict) is
			// one caller waiting on something outside: a batch session's
			// row lock held for seconds engaged it, and eight workers on
			// their own rows fell from 721 commits to 72 (issue 9 item 8).
			// "Shortly" is two deadlock_timeouts of PostgreSQL's default,
			// or twice what this conflict cost: two workers deadlocking
			// with each other meet once per deadlock_timeout and a backoff.
			// (Whether another transaction of ours was still in flight
			// says nothing: a deadlock's winner often commits before the
			// victim has rolled back.)
			lone = l.lastAt.IsZero() || now.Sub(l.lastAt) > max(2*time.Second, 2*cost)
			l.lastAt = now
		}
		if (engaged || l.gateOn.Load()) && 2*w >= u && w >= int64(50*time.Millisecond) {
			l.joinGate(now, true)
		}
		// Nor does a conflict before two rounds of the transactions in
		// flight have completed (there is no measure of the work yet), nor
		// one soon after a failed probation, nor, while conflicts are rare,
		// the first event of costly ones (oneEventLocked).
		if 2*w < u || w < int64(50*time.Millisecond) || !engaged && (lone || 3*a < c && w < 2*u || seen < 2*n && (w < 2*u || a < 3) || now.Before(l.quietUntil) || 3*a < c && l.oneEventLocked(now, took)) {
			l.since++
			l.wakeLocked()
			return
		}
	}
	switch {
	case conflict && !l.engaged.Load():
		// Engage at half the concurrency that produced the conflict.
		l.limit = max(1, float64(n)/2)
		l.ceiling = max(4, 2*float64(n))
		l.running = 0 // transactions already running hold no slot
		l.since = 0
		l.gen++
		l.engaged.Store(true)
		l.decrease.Add(1)
		l.holdAfterCut(cost)
		l.startProbationLocked()
		l.lastDone, l.slowest = now, took
	case conflict && l.limit <= 1 && s.limited && s.gen == l.gen && n-1-int64(len(l.waiters)) <= 0 && !now.Add(-took).Before(l.lastCut):
		// Alone and still conflicting: it held the one slot, no other
		// transaction of this db was running (the waiters had not begun),
		// and it started after the last cut, so the other side was
		// outside the db (another replica of the application,
		// another program). Limiting cannot remove that; kept at one
		// transaction at a time, this replica would fall behind the
		// others (one of four on a MariaDB hot spot committed a quarter of
		// their share). Let go, and stay out for a while.
		l.quietAfterLetGoLocked(now)
		return
	case conflict:
		// At most one cut per round of completions, as TCP cuts once per
		// round trip: many conflicts at once are one signal. Nor does an
		// attempt that started before the last cut (TCP's losses of
		// packets sent before its cut): it says nothing about the new
		// limit. One deadlock after a PostgreSQL restart (found after
		// deadlock_timeout, with the transactions queued on its locks
		// failing to serialize as it broke, all within milliseconds) cut
		// the limit from 4 to 1 and doubled the hold twice, to 13 s: the
		// rest of the chaos benchmark's run went one transaction at a time.
		if float64(l.since) >= l.limit && !now.Add(-took).Before(l.lastCut) {
			l.limit = max(1, l.limit/2)
			l.since = 0
			l.decrease.Add(1)
			l.holdAfterCut(cost)
		}
		l.since++
	case committed:
		if l.probation > 0 && now.Sub(l.engagedAt) >= l.probationLocked() {
			rate := float64(l.total.Load()-l.engagedTotal) / now.Sub(l.engagedAt).Seconds()
			if rate < l.probation {
				l.quietAfterLetGoLocked(now)
				return
			}
			l.probation, l.quiet = 0, 0
		}
		if now.Before(l.holdEnd) {
			l.since++
			break
		}
		l.limit += 1 / (increaseRounds * l.limit)
		l.since++
		if l.limit >= l.ceiling {
			l.releaseAllLocked()
			return
		}
	default:
		l.since++
	}
	l.wakeLocked()
}

// oneEventLocked says whether a costly conflict that would engage the
// limiter while conflicts are rare is the only event that wasted that
// time: the first such event, or part of it. Conflicts that end together
// (within a sixteenth of their length of the last one, and already running
// when it ended) are one event: a deadlock, found after PostgreSQL's deadlock_timeout, and the
// transactions queued on its locks, which fail to serialize within
// milliseconds as it breaks; or a lock holder the machine stalled and its
// waiters. On 100 accounts with 8 workers (chaos pgx/restart) one deadlock
// every few seconds stalls every worker for a second, and its burst alone
// wasted two thirds of the time: it engaged the limiter, a cheap conflict
// cut it to 1.5 within milliseconds, and the rest of the run went one
// transaction at a time at half the rate. Limiting pays when such events
// recur: it engages at a second event within max(2 s, twice the
// conflict's time) of the first, whose own conflicts (since the first
// event's last one) waste a third of the time or more and 50 ms or more.
// A deadlock-prone hot spot meets one each deadlock_timeout.
func (l *txLimiter) oneEventLocked(now time.Time, took time.Duration) bool {
	w, u := l.wasted.Load(), l.useful.Load()
	dw, du := w-l.eventW, u-l.eventU
	switch {
	case l.eventAt.IsZero() || now.Sub(l.eventAt) > max(2*time.Second, 2*took):
		l.eventAt = now // the first event
	case now.Add(-took).Before(l.eventLast) && now.Sub(l.eventLast) <= took/16:
		// the same event: it was waiting when the last of it ended
	case 2*dw >= du && dw >= int64(50*time.Millisecond):
		l.eventAt = time.Time{}
		return false // a second event, as costly
	default:
		return true // not costly on its own: the first event's waste
	}
	l.eventLast, l.eventW, l.eventU = now, w, u
	return true
}

// releaseAllLocked lets go: the waiters run unlimited.
func (l *txLimiter) releaseAllLocked() {
	l.engaged.Store(false)
	l.probation = 0
	for _, w := range l.waiters {
		close(w.ready) // not granted: they run unlimited
	}
	l.waiters = nil
	l.running = 0
	l.gen++
	l.markAt = time.Time{} // the rate while limited is no reference
}

// markRateLocked keeps the commit rate of the last window of at least a
// second while unlimited.
func (l *txLimiter) markRateLocked(now time.Time) {
	total := l.total.Load()
	if l.markAt.IsZero() {
		l.markAt, l.markTotal = now, total
		return
	}
	if el := now.Sub(l.markAt); el >= time.Second {
		l.rateBefore = float64(total-l.markTotal) / el.Seconds()
		l.markAt, l.markTotal = now, total
	}
}

// probationLocked is how long a probation lasts: a second, or as long as
// the rate before takes to commit probationCommits transactions, up to
// 5 s. Judged on fewer, the verdict is noise.
func (l *txLimiter) probationLocked() time.Duration {
	d := time.Duration(probationCommits / l.probation * float64(time.Second))
	return min(5*time.Second, max(time.Second, d))
}

const probationCommits = 16

// startProbationLocked puts a new engagement on probation against the
// commit rate just before it: the last full window, or the current one
// when it is a quarter of a second or longer and faster. Without either
// there is nothing to compare with, and no probation.
func (l *txLimiter) startProbationLocked() {
	now, total := l.clock.Now(), l.total.Load()
	rate := l.rateBefore
	if el := now.Sub(l.markAt); !l.markAt.IsZero() && el >= time.Second/4 {
		rate = max(rate, float64(total-l.markTotal)/el.Seconds())
	}
	l.probation, l.engagedAt, l.engagedTotal = rate, now, total
}

// holdAfterCut keeps the limit from growing for a while after a cut: four
// times what the conflict cost (a deadlock on PostgreSQL costs its
// deadlock_timeout), at least 100 ms, and twice the last hold when the
// conflicts came back soon after the last one ended, up to 30 s.
func (l *txLimiter) holdAfterCut(took time.Duration) {
	now := l.clock.Now()
	if !l.lastCut.IsZero() && now.Sub(l.lastCut) < 2*l.hold+time.Second {
		l.hold = min(30*time.Second, 2*l.hold)
	} else {
		l.hold = min(10*time.Second, max(100*time.Millisecond, 4*took))
	}
	l.lastCut, l.holdEnd = now, now.Add(l.hold)
}

// wakeLocked hands free slots to waiters, oldest first.
func (l *txLimiter) wakeLocked() {
	for len(l.waiters) > 0 && l.running < int(l.limit) {
		w := l.waiters[0]
		l.waiters = l.waiters[1:]
		w.granted = true
		l.running++
		close(w.ready)
	}
}

// increaseRounds is how many rounds of commits without a conflict grow the
// limit by one. A conflict can cost a second (PostgreSQL's deadlock_timeout),
// a round of commits a millisecond: the limit grows back slowly.
const increaseRounds = 8
