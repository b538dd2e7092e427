package sqlretry

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Budget caps retries that load a struggling database: re-dials and
// re-runs after connection loss or unavailability. Retries may be at most
// Ratio of recent successful calls plus PerSecond as a floor, as Finagle's
// RetryBudget and the AWS SDK's retry token bucket do. Contention retries
// (deadlocks, serialization failures, lock timeouts) are not charged: the
// database asked for them, and backoff paces them. The zero value of a field
// means its default; the fields are finite numbers, PerSecond and Max at
// most 1e9.
type Budget struct {
	Ratio     float64 // tokens earned per successful call, in [0, 1]; default 0.2
	PerSecond float64 // tokens earned per second regardless of traffic; default 10
	Max       float64 // most tokens saved up (and the starting balance); default 100
}

// DefaultBudget is what Open uses when no WithBudget option is given.
var DefaultBudget = Budget{Ratio: 0.2, PerSecond: 10, Max: 100}

func (b Budget) withDefaults() Budget {
	if b.Ratio == 0 {
		b.Ratio = DefaultBudget.Ratio
	}
	if b.PerSecond == 0 {
		b.PerSecond = DefaultBudget.PerSecond
	}
	if b.Max == 0 {
		b.Max = DefaultBudget.Max
	}
	return b
}

func (b Budget) validate() error {
	switch {
	case !finite(b.Ratio), !finite(b.PerSecond), !finite(b.Max):
		return errors.New("the fields must be finite numbers")
	case b.Ratio < 0, b.Ratio > 1:
		return errors.New("the field Ratio must be in [0, 1]")
	case b.PerSecond < 0:
		return errors.New("the field PerSecond must not be negative")
	case b.Max < 0:
		return errors.New("the field Max must not be negative")
	case b.Max != 0 && b.Max < 1:
		return errors.New("the field Max must be at least 1 (one retry)")
	case b.PerSecond > maxBudgetTokens, b.Max > maxBudgetTokens:
		// The balance is kept in fixed point in an int64: more would
		// overflow it (Max: +Inf became a negative balance, no retries).
		return errors.New("the fields PerSecond and Max must not exceed 1e9 (WithoutBudget turns the budget off)")
	}
	return nil
}

// milli is the fixed-point scale of the token balance.
const milli = 1000

// maxBudgetTokens bounds Max and PerSecond: at this scale a day of
// PerSecond still fits the int64 balance many times over.
const maxBudgetTokens = 1e9

// retryBudget is the token bucket. Deposits on success are one atomic add;
// withdrawals take the lock to add the time-based floor and clamp.
type retryBudget struct {
	b       Budget // guarded by mu (SetBudget changes it)
	clock   Clock
	deposit atomic.Int64 // Ratio in milli-tokens
	max     atomic.Int64

	balance atomic.Int64
	mu      sync.Mutex
	last    time.Time
}

func newRetryBudget(b Budget, clock Clock) *retryBudget {
	rb := &retryBudget{b: b, clock: clock, last: clock.Now()}
	rb.deposit.Store(int64(b.Ratio * milli))
	rb.max.Store(int64(b.Max * milli))
	rb.balance.Store(rb.max.Load())
	return rb
}

// set replaces the settings (SetBudget); the tokens saved are kept, up to
// the new Max.
func (rb *retryBudget) set(b Budget) {
	rb.mu.Lock()
	defer rb.mu.Unlock()
	rb.b = b
	rb.deposit.Store(int64(b.Ratio * milli))
	rb.max.Store(int64(b.Max * milli))
	rb.balance.Store(min(rb.balance.Load(), rb.max.Load()))
}

func (rb *retryBudget) success() { rb.successes(1) }

// successes deposits the tokens earned by n successful calls.
func (rb *retryBudget) successes(n int64) {
	if rb == nil {
		return
	}
	if d := rb.deposit.Load(); d > 0 {
		rb.balance.Add(d * n)
	}
}

// withdraw takes one token, or reports that the budget is spent.
func (rb *retryBudget) withdraw() bool {
	if rb == nil {
		return true
	}
	rb.mu.Lock()
	defer rb.mu.Unlock()
	now := rb.clock.Now()
	earned := int64(now.Sub(rb.last).Seconds() * rb.b.PerSecond * milli)
	if earned > 0 {
		rb.last = now
	}
	bal := min(rb.balance.Load()+earned, rb.max.Load())
	if bal < milli {
		rb.balance.Store(bal)
		return false
	}
	rb.balance.Store(bal - milli)
	return true
}

func (rb *retryBudget) tokens() float64 {
	if rb == nil {
		return 0
	}
	return float64(min(rb.balance.Load(), rb.max.Load())) / milli
}

// dialLimiter bounds the dials in flight so that a recovering database is
// not hit by every pooled connection at once.
type dialLimiter struct{ slots chan struct{} }

func newDialLimiter(n int) *dialLimiter { return &dialLimiter{slots: make(chan struct{}, n)} }

func (l *dialLimiter) acquire(ctx context.Context) error {
	select {
	case l.slots <- struct{}{}:
		return nil
	default:
	}
	select {
	case l.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l *dialLimiter) release() { <-l.slots }
