package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"time"
)

// Shadow mode (issue 11): sqlretry sees every call and reports, as events
// with Shadow set, what it would have done (retry, hand off, refuse,
// resolve a lost COMMIT, replay a transaction), while the program sees
// what the plain driver gives it: one attempt, the driver's own error,
// no breaker refusal, no pause, no contention wait, no extra round trip.
// The breaker still follows the outcomes, so that the events say when
// enforcement would refuse calls. Teams turn it on in production first,
// read the events, then turn enforcement on (SetShadow) without reopening
// the *sql.DB.

// WithShadow starts the *sql.DB in shadow mode (default off: enforce).
func WithShadow(on bool) Option {
	return func(c *config) error { c.shadow = on; return nil }
}

// SetShadow switches a live *sql.DB opened through sqlretry between shadow
// mode (on) and enforcement (off). A call follows the mode it started in
// to its end, and a transaction the mode of its BEGIN. It returns false
// for a *sql.DB not opened through sqlretry.
func SetShadow(db *sql.DB, on bool) bool {
	r := retrierOf(db)
	if r == nil {
		return false
	}
	r.shadow.Store(on)
	return true
}

// ShadowOf reports whether db is in shadow mode.
func ShadowOf(db *sql.DB) bool {
	r := retrierOf(db)
	return r != nil && r.shadow.Load()
}

// WithFallback makes RunInTx call fallback instead of returning an error
// that matches ErrCircuitOpen (default: none): the breaker is open, and the
// transaction did not commit (it did not begin, or an attempt was rolled
// back and its replay was refused). fallback gets the error as reason (an
// *Error with the database's last error, when there was one) and returns
// what RunInTx returns: serve from a cache, queue the write, or say so.
// Give it to RunInTx for one call, or to Open for every RunInTx on the db.
func WithFallback(fallback func(ctx context.Context, reason error) error) Option {
	return func(c *config) error {
		if fallback == nil {
			return optionError("WithFallback", errors.New("fallback is nil"))
		}
		c.fallback = fallback
		return nil
	}
}

// wouldDo reports a decision that shadow mode did not carry out.
func (r *retrier) wouldDo(ctx context.Context, e Event) {
	e.Shadow = true
	r.counters.shadowDecisions.Add(1)
	r.observe(ctx, e)
}

// wouldPause is the pause enforcement would take before a second attempt.
func (r *retrier) wouldPause(ctx context.Context) time.Duration {
	p := newPacer(r.backoff(), r.clock, r.rnd)
	d, _ := p.next(ctx, 1)
	return d
}

// shadowAdmit gives the breaker's ticket for a call, never refusing it:
// a call the open breaker would refuse is reported and let through.
func (r *retrier) shadowAdmit(ctx context.Context, op string) ticket {
	b := r.breaker
	if b == nil || BreakerState(b.state.Load()) == BreakerClosed {
		return b.closedTicket()
	}
	t, err := b.allow()
	if err != nil {
		r.wouldDo(ctx, Event{Kind: EventGiveUp, Op: op, Class: Unavailable, Err: err,
			Reason: "the breaker is open: enforcement would refuse the call with ErrCircuitOpen"})
		return ticket{} // of no generation: its outcome is not counted
	}
	return t
}

// shadowStatement runs an autocommit statement once, as the plain driver
// would, and reports what the safety table would have done with its error.
func shadowStatement[T any](ctx context.Context, c *conn, op, query string, isQuery bool, run func(context.Context) (T, error)) (T, error) {
	r := c.r
	t := r.shadowAdmit(ctx, op)
	c.noteTxControl(query)
	v, err := run(ctx)
	if err == nil {
		r.succeeded(t)
		return v, nil
	}
	if isPassThrough(err) || ctx.Err() != nil {
		r.breaker.done(t, outcomeNeutral)
		return v, err
	}
	cls := r.classify(err)
	r.breaker.done(t, breakerOutcome(cls, err))
	act := c.autocommitAction(ctx, cls, err, query, isQuery)
	switch act {
	case actRetryHere:
		d := r.wouldPause(ctx)
		r.wouldDo(ctx, Event{Kind: EventRetry, Op: op, Attempt: 1, Class: cls, Err: err, Delay: d,
			Reason: "the server rolled the statement back: enforcement would run it again here after Delay"})
	case actHandOff:
		r.wouldDo(ctx, Event{Kind: EventHandOff, Op: op, Attempt: 1, Class: cls, Err: err,
			Reason: "safe to re-run: enforcement would hand it to database/sql to run on another connection"})
	case actAmbiguous:
		r.wouldDo(ctx, Event{Kind: EventGiveUp, Op: op, Attempt: 1, Class: cls, Err: err,
			Reason: "a write may have run before the connection broke: enforcement would return ErrAmbiguousCommit"})
	}
	return v, err
}

// shadowConnect dials once.
func (c *connector) shadowConnect(ctx context.Context) (driver.Conn, error) {
	r := c.r
	t := r.shadowAdmit(ctx, "dial")
	ic, err := c.inner.Connect(ctx)
	if err == nil {
		r.succeeded(t)
		r.counters.dials.Add(1)
		return newConn(ic, r), nil
	}
	r.counters.dialFailures.Add(1)
	if ctx.Err() != nil {
		r.breaker.done(t, outcomeNeutral)
		return nil, err
	}
	cls := classifyDial(r.cfg.rules, err)
	if cls == Permanent || cls == Ambiguous {
		r.breaker.done(t, outcomeNeutral)
		return nil, err
	}
	r.breaker.done(t, outcomeDialFailure)
	d := r.wouldPause(ctx)
	r.wouldDo(ctx, Event{Kind: EventRetry, Op: "dial", Attempt: 1, Class: cls, Err: err, Delay: d,
		Reason: "dial failed; nothing was sent: enforcement would dial again after Delay"})
	return nil, err
}

// shadowBeginTx begins a transaction that sqlretry only watches.
func (c *conn) shadowBeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	r := c.r
	t := r.shadowAdmit(ctx, "begin")
	var itx driver.Tx
	var err error
	if bt, ok := c.inner.(driver.ConnBeginTx); ok {
		itx, err = bt.BeginTx(ctx, opts)
	} else {
		itx, err = beginWithoutContext(ctx, c.inner, opts)
	}
	if err != nil {
		r.breaker.done(t, breakerOutcome(r.classify(err), err))
		return nil, err
	}
	r.succeeded(t)
	c.shadowTx = true
	return &shadowTx{c: c, inner: itx, ctx: ctx}, nil
}

// shadowTx is a transaction begun in shadow mode: its statements go to the
// driver as they are (sqlretry retries none inside a transaction anyway),
// and a COMMIT that lost its connection is reported as one enforcement
// would have resolved.
type shadowTx struct {
	c     *conn
	inner driver.Tx
	ctx   context.Context
}

func (t *shadowTx) Commit() error {
	t.c.shadowTx = false
	err := t.inner.Commit()
	if err != nil {
		if cls := t.c.r.classify(err); commitOutcomeUnknown(cls, err) {
			t.c.r.wouldDo(t.ctx, Event{Kind: EventCommitResolved, Op: "commit", Attempt: 1, Class: cls, Err: err, Outcome: CommitUnknown,
				Reason: "the COMMIT lost its connection: enforcement would find out whether it took effect"})
		}
	}
	return err
}

func (t *shadowTx) Rollback() error {
	t.c.shadowTx = false
	return t.inner.Rollback()
}

// shadowRunInTx runs fn once in a transaction, as a plain helper would
// (begin, fn, commit or roll back), and reports a replay enforcement would
// have made.
func (r *retrier) shadowRunInTx(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, txOpts)
	if err != nil {
		return err
	}
	began := r.clock.Now()
	if err = fn(ctx, tx); err != nil {
		_ = tx.Rollback()
	} else {
		err = tx.Commit()
	}
	spreads, auto := r.spreadTracks(r.txLimit, true) // PostgreSQL: as if contention control were not engaged
	if err == nil || ctx.Err() != nil {
		if err == nil && spreads && r.spread.p.Load() != 0 {
			r.spreadOn(false)
		}
		return err
	}
	switch cls := r.classify(err); cls {
	case RetryStatement, RetryTransaction, ConnectionLost, Unavailable:
		if errors.Is(err, sql.ErrTxDone) {
			break
		}
		d := r.wouldPause(ctx)
		// With the replay spread, the pause enforcement would take after
		// a conflict (attack24: shadow mode reported the backoff's 0.2-4
		// ms where enforcing paused 28-752 ms).
		if spreads && r.isConflict(err, cls) && timeoutOf(err) == 0 {
			r.spreadOn(true)
			if r.spreading(auto) {
				d = r.spreadReplayAuto(ctx, d, since(r.clock, began), 1, nil, auto)
			}
		}
		r.wouldDo(ctx, Event{Kind: EventRetry, Op: "tx", Attempt: 1, Class: cls, Err: err, Delay: d,
			Reason: "transaction aborted: enforcement would replay it after Delay (if it did not reach COMMIT)"})
	}
	return err
}
