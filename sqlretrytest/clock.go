package sqlretrytest

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/sqlretry/sqlretry"
)

var _ sqlretry.Clock = (*Clock)(nil)

// Clock is a fake sqlretry.Clock for tests of an application's own
// timeouts around sqlretry: give it to sqlretry.WithClock, and sqlretry's
// backoff, breaker, budget and deadline checks read it instead of the real
// time. Time moves only when the test calls Advance, or, with
// SetAutoAdvance(true), when something sleeps. The zero value is not
// usable; NewClock makes one.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	auto    bool
	waiters []*waiter
	changed chan struct{} // closed and replaced whenever waiters change
}

type waiter struct {
	until time.Time
	done  chan struct{}
	fire  func() // instead of closing done (WithTimeout)
}

// NewClock returns a Clock that reads start (the real time when start is
// zero, so that deadlines it reports stay near the real ones drivers see).
func NewClock(start time.Time) *Clock {
	if start.IsZero() {
		start = time.Now()
	}
	return &Clock{now: start, changed: make(chan struct{})}
}

// Now returns the fake time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// SetAutoAdvance makes every Sleep move the clock forward by its duration
// and return at once (on: backoffs take no real time but still count
// against deadlines read from this clock), or wait for Advance (off, the
// default).
func (c *Clock) SetAutoAdvance(on bool) {
	c.mu.Lock()
	c.auto = on
	c.mu.Unlock()
}

// Sleep waits until the clock has moved d forward or ctx is done, and then
// returns ctx.Err(), as sqlretry.Clock requires.
func (c *Clock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	c.mu.Lock()
	if c.auto {
		c.mu.Unlock()
		c.Advance(d)
		return ctx.Err()
	}
	w := &waiter{until: c.now.Add(d), done: make(chan struct{})}
	c.addLocked(w)
	c.mu.Unlock()
	select {
	case <-w.done:
		return ctx.Err()
	case <-ctx.Done():
		c.mu.Lock()
		c.removeLocked(w)
		c.mu.Unlock()
		return ctx.Err()
	}
}

// Advance moves the clock forward by d, waking the sleepers and expiring
// the contexts (WithTimeout) whose time has come, in order. A negative d
// does nothing: the clock never goes back.
func (c *Clock) Advance(d time.Duration) {
	if d < 0 {
		return
	}
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*waiter
	keep := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.until.After(c.now) {
			due = append(due, w)
		} else {
			keep = append(keep, w)
		}
	}
	c.waiters = keep
	c.notifyLocked()
	c.mu.Unlock()
	sort.SliceStable(due, func(a, b int) bool { return due[a].until.Before(due[b].until) })
	for _, w := range due {
		if w.fire != nil {
			w.fire()
		} else {
			close(w.done)
		}
	}
}

// Sleepers returns how many Sleep calls are waiting now.
func (c *Clock) Sleepers() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, w := range c.waiters {
		if w.fire == nil {
			n++
		}
	}
	return n
}

// WaitForSleepers blocks until at least n Sleep calls are waiting, or ctx
// is done: a test calls it before Advance, so that the code under test
// has reached its backoff.
func (c *Clock) WaitForSleepers(ctx context.Context, n int) error {
	for {
		c.mu.Lock()
		ch := c.changed
		c.mu.Unlock()
		if c.Sleepers() >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WithTimeout returns a context that this clock ends: its Deadline is the
// fake now plus d, and it is done with context.DeadlineExceeded once
// Advance reaches that time (or when parent is done, or cancel is called).
// sqlretry compares its backoff with this deadline, so a test sees what
// the application's own timeout does to the retries without waiting.
func (c *Clock) WithTimeout(parent context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	fc := &clockCtx{Context: ctx}
	c.mu.Lock()
	fc.deadline = c.now.Add(d)
	w := &waiter{until: fc.deadline, fire: func() { cancel(context.DeadlineExceeded) }}
	if d <= 0 {
		c.mu.Unlock()
		w.fire()
	} else {
		c.addLocked(w)
		c.mu.Unlock()
	}
	return fc, func() {
		c.mu.Lock()
		c.removeLocked(w)
		c.mu.Unlock()
		cancel(context.Canceled)
	}
}

type clockCtx struct {
	context.Context
	deadline time.Time
}

// Deadline is the earlier of the clock's deadline and the parent's.
func (c *clockCtx) Deadline() (time.Time, bool) {
	if d, ok := c.Context.Deadline(); ok && d.Before(c.deadline) {
		return d, true
	}
	return c.deadline, true
}

// Err reports context.DeadlineExceeded when the clock ended the context,
// as a real deadline would.
func (c *clockCtx) Err() error {
	err := c.Context.Err()
	if err != nil && context.Cause(c.Context) == context.DeadlineExceeded {
		return context.DeadlineExceeded
	}
	return err
}

func (c *Clock) addLocked(w *waiter) {
	c.waiters = append(c.waiters, w)
	c.notifyLocked()
}

func (c *Clock) removeLocked(w *waiter) {
	for i, x := range c.waiters {
		if x == w {
			c.waiters = append(c.waiters[:i], c.waiters[i+1:]...)
			c.notifyLocked()
			return
		}
	}
}

func (c *Clock) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}
