package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"sync"
	"time"
)

var _ driver.Tx = (*tx)(nil)

// tx is the Tx decorator and the state of the transaction open on a conn.
// No statement inside a transaction is retried on its own. The first
// retryable error poisons the transaction: later statements and COMMIT fail
// with it without reaching the server. That matters on MySQL, where a
// deadlock rolls the transaction back and later statements would run in
// autocommit: a silent partial write if the caller swallowed the error.
type tx struct {
	c        *conn
	inner    driver.Tx
	ctx      context.Context // BeginTx's context: the deadline for resolving a lost COMMIT
	readOnly bool
	attempt  *txAttempt // set when RunInTx began this transaction

	poison   error // first retryable error
	firstErr error // first error of any class (PostgreSQL aborts on any)
	wrote    bool  // ran something other than a plain read
	xid      int64 // PostgreSQL transaction id taken before COMMIT, 0 if none
	token    []byte
	marker   string // the MySQL marker table token went into
	// nothingDurable: the server held the transaction read-only (a
	// PostgreSQL standby, a MySQL READ ONLY transaction): its COMMIT can
	// make nothing last, so a lost one needs no resolution.
	nothingDurable bool
}

// guard refuses statements in a poisoned transaction, except ROLLBACK TO
// SAVEPOINT, which may revive it.
func (t *tx) guard(query string) error {
	if t.poison != nil && !isRollbackToSavepoint(query) {
		return &poisonedError{cause: t.poison}
	}
	return nil
}

// done records a statement's result inside the transaction.
func (t *tx) done(err error, query string, isQuery bool) {
	if err == nil {
		t.c.r.succeeded(ticket{})
		if !t.wrote && (!isQuery || !isReadQuery(t.c.r.dialect, query)) {
			t.wrote = true
		}
		if (t.poison != nil || t.firstErr != nil) && isRollbackToSavepoint(query) {
			t.poison, t.firstErr = nil, nil // the server accepted it: the transaction lives on
			if t.attempt != nil {
				t.attempt.poison = nil
			}
		}
		return
	}
	t.failed(err, query)
}

// failed notes an error inside the transaction.
func (t *tx) failed(err error, query string) {
	if isPassThrough(err) {
		return
	}
	var p *poisonedError
	if errors.As(err, &p) {
		return
	}
	r := t.c.r
	cls := r.classify(err)
	pending := false
	if cls == Permanent && !t.readOnly && isReadOnlyAnswer(err) {
		// A write refused as read-only in a transaction the caller did not
		// declare read-only: the user's session setting, or a standby.
		switch r.dialect {
		case DialectMySQL: // the transaction lives on and can answer
			var standby bool
			if err, standby = t.c.judgeReadOnly(t.ctx, err); standby {
				cls = Unavailable
			}
		case DialectPostgres: // aborted: ask after the rollback; no COMMIT meanwhile
			pending = true
			t.c.readOnlyPending = true
			err = &readOnlyError{err: err}
		}
	}
	if isStandby(err) {
		r.record(Permanent) // the server answered: a standby is up
	} else {
		r.record(cls)
	}
	if cls == ConnectionLost || errors.Is(err, driver.ErrBadConn) {
		t.c.bad.Store(true)
		t.c.noteLost(err)
	}
	if t.firstErr == nil {
		t.firstErr = err
	}
	if (cls != Permanent || pending) && t.poison == nil {
		t.poison = err
		if t.attempt != nil {
			t.attempt.poison = err
		}
	}
}

func (t *tx) exec(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if err := t.guard(query); err != nil {
		return nil, err
	}
	res, err := t.c.execInner(ctx, query, args)
	t.done(err, query, false)
	return res, err
}

func (t *tx) query(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if err := t.guard(query); err != nil {
		return nil, err
	}
	rows, err := t.c.queryInner(ctx, query, args)
	t.done(err, query, true)
	if err != nil {
		return nil, err
	}
	return &txRows{inner: rows, tx: t, query: query}, nil
}

func (t *tx) stmtExec(ctx context.Context, s *stmt, args []driver.NamedValue) (driver.Result, error) {
	if err := t.guard(s.query); err != nil {
		return nil, err
	}
	res, err := s.execInner(ctx, args)
	t.done(err, s.query, false)
	return res, err
}

func (t *tx) stmtQuery(ctx context.Context, s *stmt, args []driver.NamedValue) (driver.Rows, error) {
	if err := t.guard(s.query); err != nil {
		return nil, err
	}
	rows, err := s.queryInner(ctx, args)
	t.done(err, s.query, true)
	if err != nil {
		return nil, err
	}
	return &txRows{inner: rows, tx: t, query: s.query}, nil
}

func (t *tx) Rollback() error {
	t.c.tx = nil
	return t.rollback()
}

// Commit refuses a poisoned transaction, remembers what it needs to
// resolve a lost COMMIT, and never reports a COMMIT whose outcome it does
// not know as either success or failure.
func (t *tx) Commit() error {
	c, r := t.c, t.c.r
	defer func() { c.tx = nil }()
	if t.poison != nil {
		_ = t.rollback()
		r.counters.poisoned.Add(1)
		return &poisonedError{cause: t.poison}
	}
	if t.wrote {
		if err := t.prepareResolution(); err != nil {
			_ = t.rollback()
			return err
		}
	}
	if err := t.ctx.Err(); err != nil {
		// The caller's deadline came before COMMIT was sent: do not send
		// it, so that the outcome is known (not committed).
		_ = t.rollback()
		return err
	}
	abandoned, err := t.commitWithinDeadline()
	if abandoned {
		r.counters.commitsAmbiguous.Add(1)
		r.observe(t.ctx, Event{Kind: EventCommitResolved, Op: "commit", Attempt: 1, Class: ConnectionLost, Outcome: CommitUnknown, Err: err})
		return newError("commit", 1, Ambiguous, ErrAmbiguousCommit, err)
	}
	if err == nil {
		r.succeeded(ticket{})
		t.afterCommit()
		return nil
	}
	return t.commitFailed(err)
}

// commitWithinDeadline runs the driver's COMMIT within the caller's
// deadline; abandoned means the deadline came first and the outcome is
// unknown (no time is left to ask).
func (t *tx) commitWithinDeadline() (abandoned bool, err error) {
	return t.withinDeadline("COMMIT", driver.Tx.Commit)
}

// withinDeadline runs a COMMIT or ROLLBACK of the driver within the
// BeginTx context. driver.Tx takes no context: pgx uses the BeginTx
// context itself, but go-sql-driver/mysql blocks on a silent network until
// TCP gives up. There the call runs on its own goroutine; when the deadline
// comes first the connection is marked bad, and closed only once the
// driver's call has returned, so the driver is never used from two
// goroutines at once.
//
// call is a method expression (driver.Tx.Commit), not a method value, so
// the common path allocates nothing.
func (t *tx) withinDeadline(what string, call func(driver.Tx) error) (abandoned bool, err error) {
	if t.c.r.dialect != DialectMySQL || t.ctx.Done() == nil {
		return false, call(t.inner)
	}
	done := make(chan error, 1)
	inner := t.inner
	go func() { done <- call(inner) }()
	select {
	case err := <-done:
		return false, err
	case <-t.ctx.Done():
		t.c.bad.Store(true)
		t.c.inflight.Store(&done)
		return true, fmt.Errorf("%s still in flight at the caller's deadline: %w", what, t.ctx.Err())
	}
}

// rollback ends the transaction on the server within the caller's deadline.
func (t *tx) rollback() error {
	_, err := t.withinDeadline("ROLLBACK", driver.Tx.Rollback)
	if t.c.readOnlyPending {
		t.c.readOnlyPending = false
		if err == nil {
			t.judgeReadOnlyAfterRollback()
		}
	}
	return err
}

// commitFailed decides what a failed COMMIT means. Errors that the server
// answered, and errors from before anything was sent, say it did not
// commit; a lost connection or an explicit "unknown" must be resolved.
func (t *tx) commitFailed(err error) error {
	r := t.c.r
	cls := r.classify(err)
	r.record(cls)
	if err.Error() == errTxCommitRollbackText && t.firstErr != nil {
		// PostgreSQL turned COMMIT into ROLLBACK because of an earlier error
		// the caller swallowed: report that error, with its class.
		return newError("commit", 1, r.classify(t.firstErr), nil, fmt.Errorf("%w: %w", err, t.firstErr))
	}
	// The caller's deadline while COMMIT was in flight: the driver gave up
	// waiting for the reply, not the server (issue 9).
	atDeadline := t.ctx.Err() != nil && !serverAnswered(err)
	if !atDeadline && !commitOutcomeUnknown(cls, err) {
		return err // the server answered: not committed
	}
	t.c.bad.Store(true)
	if !t.wrote || t.nothingDurable {
		// Nothing to lose: a transaction that provably only read, or that
		// the server held read-only, may be replayed.
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	outcome := CommitUnknown
	if !atDeadline && t.ctx.Err() == nil {
		// Within the caller's deadline only (shared/DESIGN.md): past it the
		// old session may still be committing, and waiting for it is time
		// the caller does not have. Then the answer is ErrAmbiguousCommit.
		outcome = r.resolveCommit(t.ctx, t)
	}
	if outcome == CommitUnknown && err == driver.ErrBadConn {
		// The driver contract: nothing was sent, and the server rolls back
		// on disconnect. Only the exact sentinel is trusted here.
		outcome = CommitNotCommitted
	}
	switch outcome {
	case CommitCommitted:
		return nil
	case CommitNotCommitted:
		return newError("commit", 1, RetryTransaction, nil, err)
	}
	r.counters.commitsAmbiguous.Add(1)
	if ctxErr := t.ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
		err = fmt.Errorf("%w (COMMIT in flight at the caller's deadline: %w)", err, ctxErr)
	}
	return newError("commit", 1, Ambiguous, ErrAmbiguousCommit, err)
}

// commitOutcomeUnknown reports a COMMIT error that does not say whether the
// COMMIT took effect: a lost connection, an "unknown" from the server, or
// any client-side failure. A client's claim that nothing was sent is not
// trusted at COMMIT: pgx reports a COMMIT it had already written, when the
// socket closed under it, as "conn closed" with SafeToRetry() true.
func commitOutcomeUnknown(cls Class, err error) bool {
	switch cls {
	case ConnectionLost, Ambiguous:
		return true
	case Unavailable:
		return !serverAnswered(err)
	}
	return false
}

// serverAnswered reports an error that the database server sent.
func serverAnswered(err error) bool {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return true
	}
	_, _, ok := mysqlErrorOf(err)
	return ok
}

// txAttempt links one RunInTx attempt to the transaction the driver
// opened for it, so RunInTx sees a poisoning even when the closure
// returned some other error. It is the context given to BeginTx (one
// allocation instead of a context.WithValue and a struct).
type txAttempt struct {
	context.Context
	poison error
}

func (a *txAttempt) Value(key any) any {
	if key == keyAttempt {
		return a
	}
	return a.Context.Value(key)
}

const keyAttempt ctxKey = 100

// slotHeld marks the context of a RunInTx body that holds a slot of the
// contention control, for a RunInTx nested in it.
type slotHeld struct{ context.Context }

const keySlotHeld ctxKey = 101

func (h slotHeld) Value(key any) any {
	if key == keySlotHeld {
		return true
	}
	return h.Context.Value(key)
}

// RunInTx runs fn in a transaction and commits it. When the transaction is
// aborted by something that is safe to retry (a serialization failure, a
// deadlock, a lock-wait timeout, a connection lost before COMMIT was sent)
// it rolls back, backs off and runs fn again from the start, so fn must
// do nothing outside the transaction that cannot be repeated. A COMMIT
// that lost its connection is resolved, never guessed: success,
// a replay, or ErrAmbiguousCommit.
//
// On a *sql.DB opened through sqlretry RunInTx uses its policy, breaker and
// budget; on any other *sql.DB the defaults. opts may override the backoff
// (WithBackoff, WithMaxAttempts), the observer and the classifier rules
// for this call.
func RunInTx(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, opts ...Option) error {
	if db == nil {
		return errors.New("sqlretry: RunInTx: db is nil")
	}
	if fn == nil {
		return errors.New("sqlretry: RunInTx: fn is nil")
	}
	r := retrierOf(db)
	if r == nil {
		r = plainRetrier()
	}
	if len(opts) > 0 {
		cfg := r.cfg
		cfg.rules = append([]Classifier(nil), cfg.rules...)
		if err := cfg.apply(opts); err != nil {
			return err
		}
		rc := *r // shares breaker, budget, counters and resolution state by pointer
		rc.cfg, rc.obs = cfg, cfg.observer
		r = &rc
	}
	lim := r.txLimit
	if ctx.Value(keySlotHeld) != nil {
		lim = nil // an outer RunInTx holds a slot: waiting for another could deadlock
	}
	// The clock is read once BEGIN has returned (the wait for a connection
	// is not the transaction's work, for contention control), and the first
	// of those reads starts the pacer: one clock read per attempt.
	p := pacer{b: r.cfg.backoff, clock: r.clock, rnd: r.rnd}
	for attempt := 1; ; attempt++ {
		var slot txSlot
		if lim != nil {
			var werr error
			if slot, werr = lim.acquire(ctx); werr != nil {
				return r.giveUp(ctx, "tx", max(attempt-1, 1), Permanent, werr, "caller's context is done")
			}
		}
		body := fn
		if slot.limited {
			body = func(ctx context.Context, tx *sql.Tx) error { return fn(slotHeld{ctx}, tx) }
		}
		began, err, phase, poison := runTxOnce(ctx, db, txOpts, body, r.clock)
		if p.start.IsZero() {
			p.start = began
		}
		if lim != nil {
			conflict := false
			if err != nil && ctx.Err() == nil {
				c := r.classify(err)
				if poison != nil {
					c = r.classify(poison)
				}
				conflict = c == RetryTransaction || c == RetryStatement
			}
			lim.release(slot, conflict, err == nil, r.clock.Now().Sub(began))
		}
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return r.giveUp(ctx, "tx", attempt, Permanent, err, "caller's context is done")
		}
		if errors.Is(err, ErrCircuitOpen) || errors.Is(err, ErrBudgetExhausted) || errors.Is(err, ErrAmbiguousCommit) {
			return err
		}
		cls := r.classify(err)
		if poison != nil {
			cls = r.classify(poison)
		}
		replay := false
		switch cls {
		case RetryStatement, RetryTransaction, Unavailable:
			replay = true
		case ConnectionLost, Ambiguous:
			replay = true // before COMMIT the server rolls back on disconnect
		}
		var own *Error
		var poisoned *poisonedError
		if phase == phaseCommit && !errors.As(err, &own) && !errors.As(err, &poisoned) && commitOutcomeUnknown(cls, err) {
			// A raw COMMIT error that sqlretry's Tx did not resolve (a *sql.DB
			// that sqlretry did not open): its outcome is unknown.
			return newError("commit", attempt, cls, ErrAmbiguousCommit, err)
		}
		if !replay || ctx.Value(keyNoRetry) != nil {
			if poison != nil && err != poison {
				err = fmt.Errorf("%w (the transaction had been aborted by: %w)", err, poison)
			}
			return r.giveUp(ctx, "tx", attempt, cls, err, "not retryable")
		}
		if cls == Unavailable || cls == ConnectionLost {
			if !r.budget.withdraw() {
				return r.refuse(ctx, "tx", attempt, cls, ErrBudgetExhausted, err)
			}
			r.counters.retriesConnection.Add(1)
		}
		d, stop := p.next(ctx, attempt)
		if stop != "" {
			return r.giveUp(ctx, "tx", max(attempt, 2), cls, err, stop)
		}
		r.counters.retriesTransaction.Add(1)
		r.observe(ctx, Event{Kind: EventRetry, Op: "tx", Attempt: attempt, Class: cls, Err: err, Delay: d, Reason: "transaction aborted; replaying it"})
		if serr := r.clock.Sleep(ctx, d); serr != nil {
			return r.giveUp(ctx, "tx", attempt, cls, err, "caller's context is done")
		}
	}
}

type txPhase uint8

const (
	phaseBegin txPhase = iota
	phaseBody
	phaseCommit
)

// runTxOnce runs one attempt of a RunInTx transaction; began is when
// BeginTx returned.
func runTxOnce(ctx context.Context, db *sql.DB, txOpts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, clock Clock) (began time.Time, err error, phase txPhase, poison error) {
	att := &txAttempt{Context: ctx}
	sqlTx, err := db.BeginTx(att, txOpts)
	began = clock.Now()
	if err != nil {
		return began, err, phaseBegin, nil
	}
	committed := false
	defer func() {
		if !committed {
			_ = sqlTx.Rollback() // also when fn panics
		}
	}()
	if err := fn(ctx, sqlTx); err != nil {
		return began, err, phaseBody, att.poison
	}
	committed = true
	if err := sqlTx.Commit(); err != nil {
		return began, err, phaseCommit, nil
	}
	return began, nil, phaseCommit, nil
}

var (
	plainOnce sync.Once
	plain     *retrier
)

// plainRetrier serves RunInTx on a *sql.DB that sqlretry did not open: the
// default backoff and budget, no breaker (it cannot see the dials).
func plainRetrier() *retrier {
	plainOnce.Do(func() {
		cfg := defaultConfig()
		cfg.breaker = nil
		plain = newRetrier(cfg, nil, DialectUnknown)
	})
	return plain
}
