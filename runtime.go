package sqlretry

import (
	"database/sql"
	"errors"
)

// Policy changes at run time (issue 11): a live *sql.DB opened through
// sqlretry takes a new backoff, budget or breaker settings without
// reopening. A call reads the backoff once, when it starts, and keeps it
// to its end; the budget is one token bucket and the breaker one state
// machine that every call shares, so a change applies to the next
// withdrawal or breaker decision. Shadow mode switches with SetShadow
// (shadow.go).

var errNotSqlretry = errors.New("sqlretry: the *sql.DB was not opened through sqlretry")

// backoff is the pacing in force: SetBackoff's, else the options'.
func (r *retrier) backoff() Backoff {
	if r.liveBackoff != nil {
		if b := r.liveBackoff.Load(); b != nil {
			return *b
		}
	}
	return r.cfg.backoff
}

// SetBackoff replaces the retry pacing of db (zero fields take
// DefaultBackoff's values, as WithBackoff). Calls under way keep the
// pacing they started with.
func SetBackoff(db *sql.DB, b Backoff) error {
	r := retrierOf(db)
	if r == nil {
		return errNotSqlretry
	}
	if err := b.validate(); err != nil {
		return optionError("SetBackoff", err)
	}
	b = b.withDefaults()
	r.liveBackoff.Store(&b)
	return nil
}

// SetBudget replaces the retry budget's settings of db (zero fields take
// DefaultBudget's values, as WithBudget); the tokens saved are kept, up to
// the new Max. A db opened WithoutBudget has no budget to change.
func SetBudget(db *sql.DB, b Budget) error {
	r := retrierOf(db)
	if r == nil {
		return errNotSqlretry
	}
	if r.budget == nil {
		return errors.New("sqlretry: SetBudget: the db was opened WithoutBudget")
	}
	if err := b.validate(); err != nil {
		return optionError("SetBudget", err)
	}
	r.budget.set(b.withDefaults())
	return nil
}

// SetBreaker replaces the circuit breaker's settings of db (zero fields
// take DefaultBreaker's values, as WithBreaker). The breaker keeps its
// state and the outcomes it counted: the next decision uses the new
// settings, an open breaker stays open until the time its opening was
// given (a new OpenTimeout applies from the next opening; ProbeInterval
// from the next failed probe), and a new Window sums the outcomes counted
// so far that fall within it. It changes the db's breaker only, not the
// per-endpoint breakers of NewEndpointsConnector. A db opened
// WithoutBreaker has no breaker to change.
func SetBreaker(db *sql.DB, b Breaker) error {
	r := retrierOf(db)
	if r == nil {
		return errNotSqlretry
	}
	if r.breaker == nil {
		return errors.New("sqlretry: SetBreaker: the db was opened WithoutBreaker")
	}
	if err := b.validate(); err != nil {
		return optionError("SetBreaker", err)
	}
	r.breaker.set(b.withDefaults())
	return nil
}
