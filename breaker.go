package sqlretry

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// BreakerState is the state of a circuit breaker.
type BreakerState int32

const (
	BreakerClosed   BreakerState = iota // calls flow
	BreakerOpen                         // calls fail fast with ErrCircuitOpen
	BreakerHalfOpen                     // a few probes test the database
)

// String names the state: "closed", "open" or "half-open".
func (s BreakerState) String() string {
	switch s {
	case BreakerClosed:
		return "closed"
	case BreakerOpen:
		return "open"
	case BreakerHalfOpen:
		return "half-open"
	}
	return "unknown"
}

// Breaker configures the circuit breaker of one wrapped connector. Only
// connection and unavailability failures count against it (a deadlock is
// contention, not an outage); any answer from the server counts for it.
// The zero value of a field means its default; durations are at most 24h,
// the ratios finite numbers in their ranges.
type Breaker struct {
	Window       time.Duration // rolling window of outcomes; default 10s (in 10 buckets)
	MinRequests  int           // outcomes in the window before it may open; default 20
	FailureRatio float64       // failures/outcomes at which it opens, in (0, 1]; default 0.5
	// OpenTimeout is how long it stays open, once it opens, before the
	// first probe; default 1s: a struggling database gets that long
	// without new connections.
	OpenTimeout time.Duration
	// ProbeInterval is how long it stays open after a failed probe before
	// the next one; default 200ms, and never longer than OpenTimeout. A
	// probe is one dial (a refused one costs a down server nothing; one
	// probe is in flight at a time, so a dial that hangs paces them too),
	// and a database that comes back after an outage longer than
	// OpenTimeout is seen within about this long, not within a whole
	// OpenTimeout. A host that answered the last probe, only not yet as
	// wanted (a standby in an election, a PostgreSQL server in crash
	// recovery: 57P03), is probed again within OpenTimeout/8. Callers
	// waiting for the probe go as soon as it succeeds.
	ProbeInterval  time.Duration
	OpenJitter     float64 // the open time is stretched by up to this share, in [0, 1]; default 0.2
	HalfOpenProbes int     // concurrent probes, and successes needed to close; default 1
	// ConsecutiveDialFailures opens it when this many dials fail in a row
	// with no success in between, whatever the window holds: after a busy
	// period the window is full of successes, and a ratio alone would keep
	// a dead database's breaker closed for most of a window. Default 10.
	ConsecutiveDialFailures int
}

// DefaultBreaker is what Open uses when no WithBreaker option is given.
var DefaultBreaker = Breaker{
	Window:         10 * time.Second,
	MinRequests:    20,
	FailureRatio:   0.5,
	OpenTimeout:    time.Second,
	ProbeInterval:  200 * time.Millisecond,
	OpenJitter:     0.2,
	HalfOpenProbes: 1,

	ConsecutiveDialFailures: 10,
}

func (b Breaker) withDefaults() Breaker {
	d := DefaultBreaker
	if b.Window == 0 {
		b.Window = d.Window
	}
	if b.MinRequests == 0 {
		b.MinRequests = d.MinRequests
	}
	if b.FailureRatio == 0 {
		b.FailureRatio = d.FailureRatio
	}
	if b.OpenTimeout == 0 {
		b.OpenTimeout = d.OpenTimeout
	}
	if b.ProbeInterval == 0 {
		b.ProbeInterval = min(d.ProbeInterval, b.OpenTimeout)
	}
	b.ProbeInterval = min(b.ProbeInterval, b.OpenTimeout)
	if b.OpenJitter == 0 {
		b.OpenJitter = d.OpenJitter
	}
	if b.HalfOpenProbes == 0 {
		b.HalfOpenProbes = d.HalfOpenProbes
	}
	if b.ConsecutiveDialFailures == 0 {
		b.ConsecutiveDialFailures = d.ConsecutiveDialFailures
	}
	return b
}

func (b Breaker) validate() error {
	switch {
	case b.Window < 0, b.OpenTimeout < 0, b.ProbeInterval < 0:
		return errors.New("durations must not be negative")
	case b.Window > maxOptionDuration, b.OpenTimeout > maxOptionDuration, b.ProbeInterval > maxOptionDuration:
		return errDurationTooLong
	case !finite(b.FailureRatio), !finite(b.OpenJitter):
		return errors.New("the ratios must be finite numbers")
	case b.Window != 0 && b.Window < breakerBuckets*time.Millisecond:
		return errors.New("the field Window must be at least 10ms")
	case b.MinRequests < 0, b.HalfOpenProbes < 0, b.ConsecutiveDialFailures < 0:
		return errors.New("counts must not be negative")
	case b.FailureRatio < 0, b.FailureRatio > 1:
		return errors.New("the field FailureRatio must be in (0, 1]")
	case b.OpenJitter < 0, b.OpenJitter > 1:
		return errors.New("the field OpenJitter must be in [0, 1]")
	}
	return nil
}

const breakerBuckets = 10

// breakerBucket holds the outcomes of one tenth of the Window. Its start
// is an instant (unix nanoseconds, a multiple of the bucket width), not a
// bucket number: SetBreaker may change the Window, and so the width, while
// buckets are counted, and instants stay comparable across widths (a
// bucket number under the old width could lie in the future of the new
// numbering and never be reset).
type breakerBucket struct {
	start      atomic.Int64
	ok, failed atomic.Int64
}

// breaker is a closed/open/half-open state machine over a rolling window of
// outcomes. The success path is lock-free (it runs after every statement);
// the mutex guards transitions and bucket rotation. A generation counter
// discards outcomes of calls that began before the last transition, as
// sony/gobreaker does.
//
// The settings are one pointer that SetBreaker swaps (issue 11): each
// decision loads it once, so it uses one consistent set.
type breaker struct {
	settings atomic.Pointer[Breaker]
	clock    Clock
	rnd      func() float64
	onChange func(from, to BreakerState)

	// closing is done when the breaker next closes (nil until a caller
	// asks for it, replaced at each closing; guarded by mu): callers
	// waiting for a probe go as soon as one finds the server back (see
	// nextClosing).
	closing  context.Context
	closeNow context.CancelFunc

	state      atomic.Int32
	openUntil  atomic.Int64 // unix nanoseconds
	generation atomic.Uint64
	// opens counts the times it opened. A connection remembers it from
	// its dial: one dialled before the last opening may have died in the
	// outage, and while the breaker is not closed it is never used (see
	// retrier.waitForProbe), so that only a fresh dial can be the probe.
	opens   atomic.Uint64
	buckets [breakerBuckets]breakerBucket

	mu          sync.Mutex
	probes      int // in flight, half-open only
	probeWins   int
	rejectCount atomic.Int64 // calls refused (counted by the retrier's admit)

	// successes is the retrier's success counter. The hot path only adds to
	// it (time.Now costs tens of nanoseconds on a VM clock); every
	// flushEvery-th success, and every failure, moves the successes not yet
	// counted into the current bucket.
	successes *atomic.Int64
	flushed   int64 // guarded by mu

	okSeen          atomic.Int64 // successes counted, ever
	okAtDialFailure int64        // okSeen at the last dial failure, guarded by mu ...
	dialRun         int          // ... and dial failures since it changed
}

// flushEvery is how many successes the hot path lets pile up.
const flushEvery = 64

func newBreaker(s Breaker, clock Clock, rnd func() float64, onChange func(from, to BreakerState)) *breaker {
	b := &breaker{clock: clock, rnd: rnd, onChange: onChange}
	b.set(s)
	return b
}

// set replaces the settings (validated, defaults applied). The state and
// the outcomes counted are kept: an open breaker stays open until the
// openUntil it was given, and a new OpenTimeout applies from the next
// opening. A new Window applies to the next outcome: the buckets counted
// so far are summed as long as they start within the new Window.
// set swaps the settings. A new Window starts the count afresh: outcomes
// bucketed under the old bucket width would land in ring slots that the
// new width maps elsewhere, and some would be dropped and some kept by
// chance (the start instant's remainder), so none are kept.
func (b *breaker) set(s Breaker) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if old := b.settings.Load(); old != nil && old.Window != s.Window {
		for i := range b.buckets {
			b.buckets[i].start.Store(0)
			b.buckets[i].ok.Store(0)
			b.buckets[i].failed.Store(0)
		}
	}
	b.settings.Store(&s)
}

// bucketWidth is one tenth of the Window, in nanoseconds.
func bucketWidth(s *Breaker) int64 { return int64(s.Window) / breakerBuckets }

// flush counts the successes that piled up since the last flush.
func (b *breaker) flush() {
	if b == nil || b.successes == nil {
		return
	}
	s := b.settings.Load()
	b.mu.Lock()
	b.flushLocked(s)
	b.mu.Unlock()
}

func (b *breaker) flushLocked(s *Breaker) {
	if b.successes == nil {
		return
	}
	n := b.successes.Load()
	if d := n - b.flushed; d > 0 {
		b.flushed = n
		b.countN(s, true, d)
	}
}

// ticket is what allow hands out; done takes it back with the outcome.
type ticket struct {
	gen   uint64
	probe bool
}

// closedTicket is the ticket of a call a closed (or absent) breaker lets
// through.
func (b *breaker) closedTicket() ticket {
	if b == nil {
		return ticket{}
	}
	return ticket{gen: b.generation.Load()}
}

// allow asks whether a call may go to the database now; callers go
// through retrier.admit, which may wait for the probe.
func (b *breaker) allow() (ticket, error) {
	if b == nil {
		return ticket{}, nil
	}
	switch BreakerState(b.state.Load()) {
	case BreakerClosed:
		return b.closedTicket(), nil
	case BreakerOpen:
		if b.clock.Now().UnixNano() < b.openUntil.Load() {
			return ticket{}, ErrCircuitOpen
		}
	}
	s := b.settings.Load()
	b.mu.Lock()
	defer b.mu.Unlock()
	switch BreakerState(b.state.Load()) {
	case BreakerClosed:
		return b.closedTicket(), nil
	case BreakerOpen:
		if b.clock.Now().UnixNano() < b.openUntil.Load() {
			return ticket{}, ErrCircuitOpen
		}
		b.setLocked(BreakerHalfOpen, s)
	}
	if b.probes >= s.HalfOpenProbes {
		return ticket{}, ErrCircuitOpen
	}
	b.probes++
	return ticket{gen: b.generation.Load(), probe: true}, nil
}

// outcome of a call, as the breaker counts it.
type outcome uint8

const (
	outcomeSuccess     outcome = iota // the server answered
	outcomeFailure                    // unreachable, refused or connection lost
	outcomeDialFailure                // a failure to connect: a failure that also counts toward ConsecutiveDialFailures
	outcomeNeutral                    // says nothing about availability (caller cancelled, bad input)
)

// done records the outcome of a call that allow let through.
func (b *breaker) done(t ticket, o outcome) {
	if b == nil {
		return
	}
	if !t.probe && o == outcomeSuccess && BreakerState(b.state.Load()) == BreakerClosed {
		b.countN(b.settings.Load(), true, 1)
		return
	}
	s := b.settings.Load()
	b.mu.Lock()
	defer b.mu.Unlock()
	if t.probe && t.gen == b.generation.Load() {
		b.probes--
	}
	if t.gen != b.generation.Load() || o == outcomeNeutral {
		return
	}
	dial := o == outcomeDialFailure
	if dial {
		o = outcomeFailure
	}
	switch BreakerState(b.state.Load()) {
	case BreakerClosed:
		if o == outcomeFailure {
			b.flushLocked(s)
		}
		b.countN(s, o == outcomeSuccess, 1)
		if dial {
			// A run of dial failures: no success was counted since the last one.
			if ok := b.okSeen.Load(); ok == b.okAtDialFailure {
				b.dialRun++
			} else {
				b.dialRun, b.okAtDialFailure = 1, ok
			}
			if b.dialRun >= s.ConsecutiveDialFailures {
				b.setLocked(BreakerOpen, s)
				return
			}
		}
		if o == outcomeFailure {
			b.tripIfNeededLocked(s)
		}
	case BreakerHalfOpen:
		if !t.probe {
			return
		}
		if o == outcomeFailure {
			b.setLocked(BreakerOpen, s)
			return
		}
		b.probeWins++
		if b.probeWins >= s.HalfOpenProbes {
			b.setLocked(BreakerClosed, s)
		}
	}
}

func (b *breaker) countN(s *Breaker, success bool, n int64) {
	w := bucketWidth(s)
	i := b.clock.Now().UnixNano() / w
	bk := &b.buckets[i%breakerBuckets]
	if start := i * w; bk.start.Load() != start {
		b.rotate(bk, start)
	}
	if success {
		bk.ok.Add(n)
		b.okSeen.Add(n)
	} else {
		bk.failed.Add(n)
	}
}

// rotate resets a bucket that started before start. Counts added by a
// racing goroutine during the reset may be lost; the window is an estimate.
// A bucket that started later (under a narrower width from before a Window
// change) is kept and counted into: it started within the window.
func (b *breaker) rotate(bk *breakerBucket, start int64) {
	for {
		old := bk.start.Load()
		if old >= start {
			return
		}
		if bk.start.CompareAndSwap(old, start) {
			bk.ok.Store(0)
			bk.failed.Store(0)
			return
		}
	}
}

func (b *breaker) tripIfNeededLocked(s *Breaker) {
	now := b.clock.Now().UnixNano()
	w := bucketWidth(s)
	cur := now / w * w // the current bucket's start
	var ok, failed int64
	for i := range b.buckets {
		bk := &b.buckets[i]
		if st := bk.start.Load(); st > cur-int64(s.Window) && st <= now {
			ok += bk.ok.Load()
			failed += bk.failed.Load()
		}
	}
	total := ok + failed
	if total >= int64(s.MinRequests) && float64(failed) >= s.FailureRatio*float64(total) {
		b.setLocked(BreakerOpen, s)
	}
}

func (b *breaker) setLocked(to BreakerState, s *Breaker) {
	from := BreakerState(b.state.Load())
	if from == to {
		return
	}
	b.generation.Add(1)
	b.probes, b.probeWins = 0, 0
	b.dialRun = 0
	switch to {
	case BreakerOpen:
		// From half-open a probe failed: the next one comes after
		// ProbeInterval; from closed, after OpenTimeout.
		d := s.OpenTimeout
		if from == BreakerHalfOpen {
			d = s.ProbeInterval
		}
		open := float64(d) * (1 + s.OpenJitter*b.rnd())
		b.openUntil.Store(b.clock.Now().Add(time.Duration(open)).UnixNano())
		b.opens.Add(1)
	case BreakerClosed:
		if b.closeNow != nil {
			b.closeNow()
			b.closing, b.closeNow = nil, nil
		}
		if b.successes != nil {
			b.flushed = b.successes.Load()
		}
		for i := range b.buckets {
			b.buckets[i].start.Store(0)
			b.buckets[i].ok.Store(0)
			b.buckets[i].failed.Store(0)
		}
	}
	b.state.Store(int32(to))
	if b.onChange != nil {
		b.onChange(from, to)
	}
}

// nextClosing returns a context that is done when the breaker next
// closes. A caller waiting for the probe (retrier.waitForProbe) sleeps on
// it as well as on the clock: it slept until its next look (25-75 ms while
// the probe was out, until the next probe after a failed one), and after a
// crash restart one connection did all the work meanwhile. So does the
// resolution of a lost COMMIT between its side dials (it slept up to
// 500 ms past the server's return). Ask for it
// before looking at the state, so that a closing in between is not missed.
// Without a breaker it is never done.
func (b *breaker) nextClosing() context.Context {
	if b == nil {
		return context.Background()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing == nil {
		b.closing, b.closeNow = context.WithCancel(context.Background())
	}
	return b.closing
}

// openCount is opens, 0 without a breaker.
func (b *breaker) openCount() uint64 {
	if b == nil {
		return 0
	}
	return b.opens.Load()
}

// staleConn reports a connection dialled (at opens count dialOpens) before
// the breaker last opened, while it is not closed.
func (b *breaker) staleConn(dialOpens uint64) bool {
	return b != nil && BreakerState(b.state.Load()) != BreakerClosed && b.opens.Load() != dialOpens
}

func (b *breaker) State() BreakerState {
	if b == nil {
		return BreakerClosed
	}
	// An open breaker whose timeout passed is half-open for the next call.
	if s := BreakerState(b.state.Load()); s != BreakerOpen || b.clock.Now().UnixNano() < b.openUntil.Load() {
		return s
	}
	return BreakerHalfOpen
}
