package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

// retrier is the policy and the shared state of one wrapped connector: every
// connection it opens, and RunInTx on its *sql.DB, use the same breaker,
// budget, dial limiter and counters.
type retrier struct {
	cfg        config
	dialect    Dialect
	clock      Clock
	rnd        func() float64
	spread     *spreadState // the replay spread (tx.go: spreadOn), shared by per-call copies
	breaker    *breaker
	budget     *retryBudget
	dials      *dialLimiter
	obs        Observer
	ops        OperationObserver // obs as an OperationObserver, nil if it is not one: asserted once, not per call
	inner      driver.Connector  // the driver's connector, for side connections that resolve lost COMMITs
	implicitTx bool              // the DSN turns autocommit off: every statement is in a transaction
	counters   *counters
	resolution *resolveState
	txLimit    *txLimiter // RunInTx's contention control; nil when off
	shortWait  *shortWait // RunInTx's short lock waits (shortwait.go); nil when off

	// Run-time policy (shadow.go, runtime.go), shared by RunInTx's copies.
	shadow      *atomic.Bool             // shadow mode: report, do as the plain driver
	liveBackoff *atomic.Pointer[Backoff] // set by SetBackoff; nil in a RunInTx copy with options of its own
}

// resolveState is what the resolution of lost COMMITs learns as it goes.
type resolveState struct {
	broken atomic.Bool // the engine lacks txid_current (CockroachDB): stop asking
	// shapeForgotAt: unix ns of the last marker check forgotten for a
	// marker INSERT refused as a table of another shape (markerShadowed).
	shapeForgotAt atomic.Int64
	// pgVersion: server_version_num as a connection reported it, 0 until
	// then, -1 when the proof of resolve_failover.go is refused.
	pgVersion atomic.Int64
	// pgNoReplay: the role may not run pg_last_wal_replay_lsn, or the
	// server lacks it: the question without the proof goes without it
	// (pgAskXIDAndServerBare).
	pgNoReplay atomic.Bool

	markerMu sync.Mutex
	// markerName: the marker table, fully qualified and checked; nil
	// until then. Read without markerMu by every writing transaction.
	markerName  atomic.Pointer[markerInfo]
	markerErr   error     // a configuration error of the marker table, answered until markerErrAt+markerRecheck
	markerErrAt time.Time //
	markerCount atomic.Int64
	// markerOff: the default marker turned itself off (markerTurnOff).
	markerOff atomic.Bool
	// markerMissAt: when a 1146 last made the table be checked again
	// (UnixNano; markerMissing); markerMissSaid: the markerMissAt of the
	// last one said.
	markerMissAt   atomic.Int64
	markerMissSaid atomic.Int64
	// markerNoBlock: the server refused the marker's anonymous block
	// (commitWithMarker): separate INSERTs from now on.
	markerNoBlock atomic.Bool
	// noOwnPrefix: the server refused SET STATEMENT (mysqlOwnPrefix):
	// sqlretry's own statements go without it from then on.
	noOwnPrefix atomic.Bool

	// The marker clean-up runs on a goroutine of its own, started on first
	// use and stopped when the db is closed.
	cleanMu   sync.Mutex
	closed    bool
	cleanDue  chan string // the table to clean, when a clean-up is due
	cleanStop context.CancelFunc
	cleanDone chan struct{}
}

func newRetrier(cfg config, inner driver.Connector, dialect Dialect) *retrier {
	r := &retrier{cfg: cfg, dialect: dialect, clock: cfg.clock, rnd: cfg.rnd, obs: cfg.observer, inner: inner,
		counters: &counters{}, resolution: &resolveState{}, shortWait: newShortWait(cfg, dialect), spread: &spreadState{}}
	r.spread.db = r.spreads() // the db's own setting: every call of it counts in p
	if cfg.contentionControl && inner != nil {
		r.txLimit = &txLimiter{clock: cfg.clock}
	}
	// auto: PostgreSQL's default spread (spreadTracks), for the db: calls
	// given WithReplaySpread(false) count in p too.
	r.spread.auto = dialect == DialectPostgres && cfg.replaySpread && !cfg.replaySpreadSet && r.txLimit != nil
	if cfg.breaker != nil {
		r.breaker = newBreaker(*cfg.breaker, cfg.clock, cfg.rnd, func(from, to BreakerState) {
			r.observe(context.Background(), Event{Kind: EventBreaker, Op: "breaker", BreakerFrom: from, BreakerTo: to})
		})
		r.breaker.successes = &r.counters.successes
	}
	if cfg.budget != nil {
		r.budget = newRetryBudget(*cfg.budget, cfg.clock)
	}
	r.dials = newDialLimiter(cfg.dialParallel)
	r.shadow = new(atomic.Bool)
	r.liveBackoff = new(atomic.Pointer[Backoff])
	r.shadow.Store(cfg.shadow)
	r.ops, _ = r.obs.(OperationObserver)
	return r
}

func (r *retrier) classify(err error) Class { return classify(r.cfg.rules, err) }

// succeeded is the bookkeeping of every successful call: the hot path, so
// one atomic add on a shared counter; the breaker's window and the budget
// take the successes in batches.
func (r *retrier) succeeded(t ticket) {
	n := r.counters.successes.Add(1)
	if t.probe || r.breaker != nil && BreakerState(r.breaker.state.Load()) != BreakerClosed {
		r.breaker.done(t, outcomeSuccess)
	}
	if n%flushEvery == 0 {
		r.breaker.flush()
		r.budget.successes(flushEvery)
	}
}

// outcomeOf says how an error counts for the breaker: only unavailability
// and lost connections are failures; any other answer from the server shows
// it is up.
func outcomeOf(c Class) outcome {
	switch c {
	case Unavailable, ConnectionLost:
		return outcomeFailure
	case Permanent:
		return outcomeNeutral
	}
	return outcomeSuccess
}

// breakerOutcome is outcomeOf for a call on a pooled connection: the
// driver's driver.ErrBadConn, classed Unavailable, means it found the
// connection broken and sent nothing (a connection left from before a
// restart, found closed by go-sql-driver/mysql's liveness check). That says
// nothing about the server now: database/sql dials anew, and the dial is
// the evidence. Counted as a failure it took the half-open breaker's probe
// and opened it again after every restart, for as long as stale
// connections were left in the pool.
func breakerOutcome(cls Class, err error) outcome {
	if cls == Unavailable && errors.Is(err, driver.ErrBadConn) {
		return outcomeNeutral
	}
	return outcomeOf(cls)
}

// admit asks the breaker to let a call through. When it is open and the
// caller's deadline reaches past the moment it lets a probe through, the
// call waits for that moment, dialling nothing meanwhile, rather than fail:
// the outage may well end within the caller's patience. A caller without a
// deadline, or whose deadline (or the backoff's MaxElapsed) ends first,
// fails fast with ErrCircuitOpen.
//
// The closed breaker's path is small enough to be inlined: every statement
// passes here.
func (r *retrier) admit(ctx context.Context) (ticket, error) {
	if b := r.breaker; b == nil || BreakerState(b.state.Load()) == BreakerClosed {
		return b.closedTicket(), nil // what allow hands out when closed
	}
	return r.waitForProbe(ctx, nil)
}

// admitOn is admit for a call on the pooled connection c. While the
// breaker is not closed, a connection dialled before it last opened is
// refused at once with errStaleConn, whether it would wait or not: it may
// have died in the outage (a server crash leaves every pooled connection
// dead), and its failure, taken for the half-open breaker's probe, opened
// the breaker again after every restart for as long as such connections
// were left. The caller discards it and database/sql dials; only a fresh
// dial is the probe.
func (r *retrier) admitOn(ctx context.Context, c *conn) (ticket, error) {
	if b := r.breaker; b == nil || BreakerState(b.state.Load()) == BreakerClosed {
		return b.closedTicket(), nil
	}
	return r.waitForProbe(ctx, c)
}

// errStaleConn is admitOn's refusal of a connection from before the
// breaker's last opening; conn.admit turns it into a hand-off.
var errStaleConn = errors.New("sqlretry: the connection was opened before the breaker opened")

// waitForProbe is admit's path when the breaker is not closed; c is the
// connection of the call, nil for a dial.
func (r *retrier) waitForProbe(ctx context.Context, c *conn) (ticket, error) {
	var start time.Time
	for {
		closing := r.breaker.nextClosing()
		if c != nil && r.breaker.staleConn(c.opens) {
			return ticket{}, errStaleConn
		}
		t, err := r.breaker.allow()
		if err == nil {
			return t, nil
		}
		now := r.clock.Now()
		if start.IsZero() {
			start = now
		}
		d := time.Duration(r.breaker.openUntil.Load() - now.UnixNano())
		if d <= 0 {
			// Half-open with its probes out: look again shortly.
			d = time.Duration(float64(probeRecheck) * (0.5 + r.rnd()))
		}
		dl, ok := ctx.Deadline()
		if !ok || !now.Add(d).Before(dl) || now.Add(d).Sub(start) > r.backoff().MaxElapsed {
			r.breaker.rejectCount.Add(1)
			return ticket{}, err
		}
		r.counters.circuitWaits.Add(1)
		if sleepUntilClosed(ctx, r.clock, d, closing) != nil {
			r.breaker.rejectCount.Add(1)
			return ticket{}, err
		}
	}
}

// sleepUntilClosed sleeps for d, or until the breaker closes (closing is
// done), or until ctx is done; it returns ctx.Err().
func sleepUntilClosed(ctx context.Context, clock Clock, d time.Duration, closing context.Context) error {
	if closing.Done() == nil { // no breaker
		return clock.Sleep(ctx, d)
	}
	sctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(closing, cancel)
	_ = clock.Sleep(sctx, d) // woken or not: ctx.Err() below says whether the caller is done
	stop()
	cancel()
	return ctx.Err()
}

// probeRecheck is how often, on average, a waiting call looks again while
// a half-open breaker's probes are out.
const probeRecheck = 50 * time.Millisecond

// record feeds an outcome that did not go through allow (statements inside
// a transaction) to the breaker.
func (r *retrier) record(c Class) {
	if r.breaker != nil {
		r.breaker.done(ticket{gen: r.breaker.generation.Load()}, outcomeOf(c))
	}
}

// refuse builds the error for a call that sqlretry would not (re)try.
func (r *retrier) refuse(ctx context.Context, op string, attempts int, cls Class, reason, last error) error {
	if reason == ErrBudgetExhausted {
		r.counters.budgetRejections.Add(1)
	}
	if ctx.Err() != nil {
		// The caller's context ended while the call waited for the
		// breaker's probe: say so, beside the database's last error.
		last = stoppedBy(ctx, last, nil)
	}
	e := newError(op, attempts, cls, reason, last)
	r.observe(ctx, Event{Kind: EventGiveUp, Op: op, Attempt: attempts, Class: cls, Err: last, Reason: reason.Error()})
	return e
}

// giveUp returns the last error of a call that was retried, wrapped with
// the attempt count; a call that was not retried gets its error unchanged.
func (r *retrier) giveUp(ctx context.Context, op string, attempts int, cls Class, err error, why string) error {
	if attempts <= 1 {
		return err
	}
	return r.giveUpFinal(ctx, op, attempts, cls, err, why)
}

// giveUpFinal is a give-up that is an *Error even after one attempt: the
// driver's own error would be run again (by database/sql where it matches
// ErrBadConn, by an outer RunInTx where it is retryable).
func (r *retrier) giveUpFinal(ctx context.Context, op string, attempts int, cls Class, err error, why string) error {
	r.counters.giveUps.Add(1)
	r.observe(ctx, Event{Kind: EventGiveUp, Op: op, Attempt: attempts, Class: cls, Err: err, Reason: why})
	return newError(op, attempts, cls, nil, err)
}

// stop ends a call that the caller's context ended, or whose next attempt
// would end after the caller's deadline. The error matches the context's
// error and keeps the database's error that was being retried (err, or
// prev when err is only the context's): "context deadline exceeded" alone
// hides a refused connection or a deadlock.
func (r *retrier) stop(ctx context.Context, op string, attempts int, err, prev error, why string) error {
	err = stoppedBy(ctx, err, prev)
	cls := Permanent
	var s *stoppedError
	if errors.As(err, &s) {
		cls = r.classify(s.cause)
	}
	return r.giveUp(ctx, op, attempts, cls, err, why)
}

// paceStop ends a call whose pacing said stop: at the caller's deadline
// the error matches it, as when the context itself ended.
func (r *retrier) paceStop(ctx context.Context, op string, attempts int, cls Class, err error, why string) error {
	if why == stopDeadline {
		return r.stop(ctx, op, attempts, err, nil, why)
	}
	return r.giveUp(ctx, op, attempts, cls, err, why)
}

// stoppedError is what ended a call (the context's error) with the last
// error of the database before it.
type stoppedError struct{ stop, cause error }

func (e *stoppedError) Error() string {
	return e.stop.Error() + " (while retrying: " + e.cause.Error() + ")"
}
func (e *stoppedError) Unwrap() []error { return []error{e.stop, e.cause} }

func stoppedBy(ctx context.Context, err, prev error) error {
	stop := ctx.Err()
	if stop == nil {
		stop = context.DeadlineExceeded // the next attempt would end after the deadline
	}
	cause := err
	if err == nil || errors.Is(err, stop) {
		// The attempt only says the context ended (pgx: "timeout: context
		// deadline exceeded"): the cause is the attempt before.
		if err != nil {
			stop = err
		}
		cause = prev
	}
	if cause == nil || errors.Is(cause, stop) {
		return stop
	}
	return &stoppedError{stop: stop, cause: withoutBadConn(cause)}
}

// action is a row of the safety table for a statement outside a transaction.
type action uint8

const (
	actSurface   action = iota // return the error
	actRetryHere               // the server rolled the statement back: back off, run again on this connection
	actHandOff                 // connection unusable, re-running is safe: let database/sql re-run it on another
	actAmbiguous               // a write may have run before the connection broke: never re-run
)

// decideAutocommit is the safety table for autocommit statements
// (shared/DESIGN.md). manual is what conn.manualFor says: the caller
// opened a transaction by hand (BEGIN through Exec), where nothing but the
// driver's own ErrBadConn is retried, and whether the statement controls
// transactions itself. atomic is true when the server's rollback undid
// everything the call did (one atomic statement, or a call marked
// Idempotent): only then is it run again after a rollback (issue 9 item 1:
// "INSERT ...; UPDATE ..." or a CALL that commits inside keeps its first
// part).
func decideAutocommit(cls Class, err error, safeToRerun, atomic bool, manual manualState) action {
	switch cls {
	case RetryStatement, RetryTransaction:
		if manual != notManual || !atomic {
			return actSurface
		}
		return actRetryHere
	case Unavailable:
		if errors.Is(err, driver.ErrBadConn) {
			if manual == manualHandTx {
				// Nothing of this statement was sent, but the transaction
				// opened by hand died with the session: run on a new
				// connection in autocommit, it would commit alone, the
				// transaction's earlier work gone (hostile review
				// 2026-12-02).
				return actSurface
			}
			return actHandOff // nothing was sent, by the driver contract
		}
		if manual != notManual || !atomic {
			// In a session opened by hand, or a text of several
			// statements whose first ones may have run before the refusal
			// (a MySQL multi-statement text whose second part met Galera's
			// 1047, a dblink_exec before a standby's 25006).
			return actSurface
		}
		// The server refused the statement before running it (a standby, as
		// the server itself said; a pooler with no server for it): pause,
		// then let database/sql run it on a new connection.
		return actHandOff
	case ConnectionLost, Ambiguous:
		switch manual {
		case manualCtl:
			// The statement lost with its connection controls transactions
			// itself (a COMMIT typed by hand, a CALL, EXECUTE IMMEDIATE or a
			// block that may commit inside): it may have committed
			// (attack9: the driver's bare error was returned).
			return actAmbiguous
		case manualSession, manualHandTx:
			return actSurface
		case manualMaybe:
			// After a MySQL CALL or SET autocommit the session may be in
			// autocommit: a write may have committed (as the deadline's
			// path says, runStatement); a read has nothing to doubt.
			if safeToRerun {
				return actSurface
			}
			return actAmbiguous
		}
		if safeToRerun {
			return actHandOff
		}
		return actAmbiguous
	}
	return actSurface
}

// autocommitAction is decideAutocommit for a statement of c that failed
// with err (cls): the text is read only where the row needs it (a re-run
// after a lost connection, one after a rollback or a refusal).
func (c *conn) autocommitAction(ctx context.Context, cls Class, err error, query string, isQuery bool) action {
	d := c.r.dialect
	return decideAutocommit(cls, err, cls >= ConnectionLost && safeToRerun(ctx, d, query, isQuery),
		(cls == RetryStatement || cls == RetryTransaction || cls == Unavailable && !errors.Is(err, driver.ErrBadConn)) && rolledBackWhole(ctx, d, query),
		c.manualFor(query))
}

// manualState is what decideAutocommit needs of a session opened by hand.
type manualState uint8

const (
	notManual     manualState = iota
	manualSession             // every statement in a transaction (autocommit off in the DSN)
	manualHandTx              // in a transaction opened by hand (BEGIN through Exec)
	manualMaybe               // manual for good (a MySQL CALL, SET autocommit, XA): maybe in autocommit
	manualCtl                 // ... by this very statement, or one that controls transactions itself
)

// manualFor says whether the session is manual, and how, and whether
// query itself controls transactions.
func (c *conn) manualFor(query string) manualState {
	m := c.manual.Load()
	switch {
	case m == 0:
		return notManual
	case c.txControl(query) != sqltext.TxNone:
		return manualCtl
	case m == 1:
		return manualHandTx
	case !c.r.implicitTx:
		return manualMaybe
	}
	return manualSession
}

// safeToRerun: reads (exactly one statement, a plain read), and what the
// caller marked idempotent.
func safeToRerun(ctx context.Context, d Dialect, query string, isQuery bool) bool {
	if v, ok := ctx.Value(keyIdempotent).(bool); ok {
		return v
	}
	return isQuery && isReadQuery(d, query)
}

// rolledBackWhole: after the server rolled the call back, nothing of it
// remains when it was one atomic statement; a call marked Idempotent may
// run again whatever it holds.
func rolledBackWhole(ctx context.Context, d Dialect, query string) bool {
	if v, ok := ctx.Value(keyIdempotent).(bool); ok && v {
		return true
	}
	return isAtomicStatement(d, query)
}

// runStatement is the slow path of an autocommit statement: the first
// attempt failed with firstErr (or, with firstErr nil, has not run yet
// because each attempt needs its own timeout). It applies the safety table
// until the statement succeeds or a rule says stop.
func runStatement[T any](ctx context.Context, c *conn, t ticket, op, query string, isQuery bool, firstErr error,
	run func(context.Context) (T, error)) (T, error) {
	r := c.r
	var zero T
	p := newPacer(r.backoff(), r.clock, r.rnd)
	err := firstErr
	var prev error // the previous attempt's error, kept for a give-up at the deadline
	for attempt := 1; ; attempt++ {
		ownTimeout := false
		if attempt > 1 || err == nil {
			prev = err
			if attempt > 1 {
				var gateErr error
				if t, gateErr = c.admit(ctx, op, attempt-1, r.classify(err), err); gateErr != nil {
					return zero, gateErr
				}
			}
			var v T
			v, err, ownTimeout = attemptWithTimeout(ctx, r.cfg, run)
			if err == nil {
				r.succeeded(t)
				return v, nil
			}
			if isPassThrough(err) {
				r.breaker.done(t, outcomeNeutral)
				return zero, err
			}
		}
		if ctx.Err() != nil { // rule 3: the caller is gone
			r.breaker.done(t, outcomeNeutral)
			if m := c.manual.Load(); ctx.Err() == context.DeadlineExceeded && (m == 0 || m == 2 && !r.implicitTx) && cutInFlight(err) && !safeToRerun(ctx, r.dialect, query, isQuery) {
				// The caller's deadline came while a write was in flight (a
				// cancellation stops at once and returns the driver's error
				// as it is, as database/sql's callers expect): in
				// autocommit (or maybe: after a MySQL CALL, SET autocommit) it
				// is its own COMMIT, and it may have run (a COMMIT waiting for
				// a synchronous standby, a lock). Never a plain failure. In a
				// transaction opened by hand it did not commit.
				c.bad.Store(true)
				r.counters.giveUps.Add(1)
				stopped := stoppedBy(ctx, err, prev)
				r.observe(ctx, Event{Kind: EventGiveUp, Op: op, Attempt: attempt, Class: ConnectionLost, Err: stopped, Reason: "the caller's context ended while a write was in flight; it may have run"})
				return zero, newError(op, attempt, ConnectionLost, ErrAmbiguousCommit, stopped)
			}
			return zero, r.stop(ctx, op, attempt, err, prev, "caller's context is done")
		}
		cls := r.classify(err)
		switch {
		case cls == RetryTransaction && c.manual.Load() == 0 && pgInFailedTx(err):
			cls = Permanent // no transaction to replay in autocommit: the statement raised it
		case (cls == ConnectionLost || cls == Unavailable) && !ownTimeout && c.answeredOnLiveSession(ctx, err):
			cls = Permanent // a MySQL session-ended number on a live session: the statement's
		}
		if ownTimeout {
			cls = ConnectionLost // rule 2: a timeout sqlretry set; the statement may have run
		}
		notSent := false
		if cls == Unavailable && r.dialect == DialectPostgres && errors.Is(err, driver.ErrBadConn) {
			if c.lost {
				// The driver's connection was closed before this call began:
				// pgx's stdlib refuses it (IsClosed) before writing anything.
				notSent = true
			} else {
				// pgx's stdlib turns every SafeToRetry error into ErrBadConn,
				// and pgx calls a connection lost after a simple-protocol
				// statement was sent SafeToRetry ("conn closed"): a plain
				// database/sql re-runs such a write. Only reads and idempotent
				// calls are handed off.
				cls = ConnectionLost
			}
		}
		standby := false
		if cls == Permanent && (c.manual.Load() == 0 || r.dialect == DialectMySQL) && isReadOnlyAnswer(err) {
			// The user's read-only session, or a standby: ask the server. A
			// PostgreSQL transaction opened by hand was aborted and cannot
			// answer; a MySQL one can (with autocommit=0 in the DSN every
			// statement is in one): a standby's connection is then
			// discarded, and the error surfaced.
			if err, standby = c.judgeReadOnly(ctx, err); standby {
				cls = Unavailable
			}
		}
		if cls == ConnectionLost {
			c.noteLost(err)
		}
		if standby || notSent {
			// A standby answered: it is up. A connection already lost was
			// counted when it broke.
			r.breaker.done(t, outcomeNeutral)
		} else {
			r.breaker.done(t, breakerOutcome(cls, err))
		}
		if notSent {
			c.bad.Store(true)
			return zero, &connAlreadyLostError{cause: err}
		}
		if ctx.Value(keyNoRetry) != nil {
			return zero, err
		}
		act := c.autocommitAction(ctx, cls, err, query, isQuery)
		switch act {
		case actSurface:
			if errors.Is(err, driver.ErrBadConn) {
				// A session not in autocommit (a transaction opened by
				// hand) died with its connection: the error must not match
				// ErrBadConn, or database/sql runs the statement on a new
				// connection, outside the transaction.
				c.bad.Store(true)
				return zero, r.giveUpFinal(ctx, op, attempt, cls, err, "the session's transaction (opened by hand) was lost with the connection")
			}
			if cls == ConnectionLost {
				c.bad.Store(true)
			}
			return zero, r.giveUp(ctx, op, attempt, cls, err, "not retryable here")
		case actAmbiguous:
			c.bad.Store(cls == ConnectionLost)
			r.counters.giveUps.Add(1)
			r.observe(ctx, Event{Kind: EventGiveUp, Op: op, Attempt: attempt, Class: cls, Err: err, Reason: "a write may have run before the connection broke"})
			return zero, newError(op, attempt, cls, ErrAmbiguousCommit, err)
		case actHandOff:
			c.bad.Store(true)
			if !r.budget.withdraw() {
				return zero, r.refuse(ctx, op, attempt, cls, ErrBudgetExhausted, err)
			}
			if !errors.Is(err, driver.ErrBadConn) && cls == Unavailable {
				// The server answered with a refusal: pause before the re-run.
				d, stop := p.next(ctx, attempt)
				if stop != "" {
					return zero, r.paceStop(ctx, op, attempt, cls, err, stop)
				}
				if serr := r.clock.Sleep(ctx, d); serr != nil {
					return zero, r.stop(ctx, op, attempt, err, nil, "caller's context is done")
				}
			}
			r.counters.handOffs.Add(1)
			r.counters.retriesConnection.Add(1)
			why := handOffReason(cls, err, standby)
			r.observe(ctx, Event{Kind: EventHandOff, Op: op, Attempt: attempt, Class: cls, Err: err, Reason: why + "; database/sql re-runs the call on another connection"})
			return zero, handOffWith(err, why)
		}
		// actRetryHere: contention is not charged to the budget.
		d, stop := p.next(ctx, attempt)
		if stop != "" {
			return zero, r.paceStop(ctx, op, attempt, cls, err, stop)
		}
		r.counters.retriesStatement.Add(1)
		r.observe(ctx, Event{Kind: EventRetry, Op: op, Attempt: attempt, Class: cls, Err: err, Delay: d, Reason: "the server rolled the statement back"})
		if serr := r.clock.Sleep(ctx, d); serr != nil {
			return zero, r.stop(ctx, op, attempt, err, nil, "caller's context is done")
		}
	}
}

// attemptWithTimeout runs one attempt, inside the per-attempt timeout when
// one is set, and tells whether that timeout (not the caller's) ended it.
func attemptWithTimeout[T any](ctx context.Context, cfg config, run func(context.Context) (T, error)) (T, error, bool) {
	if cfg.attemptTimeout <= 0 {
		v, err := run(ctx)
		return v, err, false
	}
	actx, cancel := context.WithTimeout(ctx, cfg.attemptTimeout)
	defer cancel()
	v, err := run(actx)
	return v, err, err != nil && actx.Err() != nil && ctx.Err() == nil
}
