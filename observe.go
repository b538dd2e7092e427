package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"
)

// EventKind names a decision sqlretry made.
type EventKind uint8

const (
	// EventRetry: an attempt failed and another follows after Delay.
	EventRetry EventKind = iota + 1
	// EventHandOff: the connection is unusable and the call is safe to
	// re-run, so it was handed back to database/sql to run on another one.
	EventHandOff
	// EventGiveUp: sqlretry stopped and returned Err to the caller.
	EventGiveUp
	// EventBreaker: the circuit breaker went from BreakerFrom to BreakerTo.
	EventBreaker
	// EventCommitResolved: a COMMIT lost its connection and sqlretry found
	// out whether it took effect (Outcome).
	EventCommitResolved
	// EventResolutionOff: the resolution of lost COMMITs turned itself off
	// for this db (Reason says why and what to do); from now on a lost
	// COMMIT is ErrAmbiguousCommit. At most once per db.
	EventResolutionOff
)

// String names the kind: "retry", "hand-off", ...
func (k EventKind) String() string {
	switch k {
	case EventRetry:
		return "retry"
	case EventHandOff:
		return "hand-off"
	case EventGiveUp:
		return "give-up"
	case EventBreaker:
		return "breaker"
	case EventCommitResolved:
		return "commit-resolved"
	case EventResolutionOff:
		return "resolution-off"
	}
	return "unknown"
}

// CommitOutcome is what the resolution of a lost COMMIT found.
type CommitOutcome uint8

const (
	CommitUnknown      CommitOutcome = iota // could not be found out: ErrAmbiguousCommit
	CommitCommitted                         // it committed: reported as success
	CommitNotCommitted                      // it did not: safe to replay
)

// String names the outcome.
func (o CommitOutcome) String() string {
	switch o {
	case CommitCommitted:
		return "committed"
	case CommitNotCommitted:
		return "not-committed"
	}
	return "unknown"
}

// Event describes one decision. Successful first attempts are not events
// (they would cost on every call); Stats counts them.
type Event struct {
	Kind        EventKind     // what was decided: EventRetry, EventHandOff, EventGiveUp, EventBreaker, EventCommitResolved
	Op          string        // "exec", "query", "stmt.exec", "stmt.query", "begin", "dial", "commit", "tx"
	Attempt     int           // the attempt that just ended, from 1
	Class       Class         // class of Err
	Err         error         // the error of that attempt
	Delay       time.Duration // EventRetry: the pause before the next attempt
	Reason      string        // why: the rule that applied or why it stopped
	BreakerFrom BreakerState  // EventBreaker
	BreakerTo   BreakerState  // EventBreaker
	Outcome     CommitOutcome // EventCommitResolved
	// Shadow: the decision was not carried out (shadow mode, WithShadow):
	// it says what enforcement would have done, and the caller got what
	// the plain driver gave.
	Shadow bool
}

// Observer sees every decision. Observe is called synchronously on the
// calling goroutine and must be quick and safe for concurrent use.
type Observer interface {
	Observe(ctx context.Context, e Event)
}

// ObserverFunc adapts a function to Observer.
type ObserverFunc func(ctx context.Context, e Event)

// Observe calls f.
func (f ObserverFunc) Observe(ctx context.Context, e Event) { f(ctx, e) }

// SlogObserver logs every decision to l: retries and hand-offs at Debug,
// breaker changes and commit resolutions at Info (Warn when the breaker
// opens or a commit stays unknown), give-ups and a resolution turned off at
// Warn.
func SlogObserver(l *slog.Logger) Observer {
	return ObserverFunc(func(ctx context.Context, e Event) {
		level := slog.LevelDebug
		attrs := []slog.Attr{slog.String("op", e.Op)}
		switch e.Kind {
		case EventBreaker:
			level = slog.LevelInfo
			if e.BreakerTo == BreakerOpen {
				level = slog.LevelWarn
			}
			attrs = []slog.Attr{slog.String("from", e.BreakerFrom.String()), slog.String("to", e.BreakerTo.String())}
		case EventCommitResolved:
			level = slog.LevelInfo
			if e.Outcome == CommitUnknown {
				level = slog.LevelWarn
			}
			attrs = append(attrs, slog.String("outcome", e.Outcome.String()))
		case EventGiveUp, EventResolutionOff:
			level = slog.LevelWarn
		}
		if e.Kind != EventBreaker {
			attrs = append(attrs, slog.Int("attempt", e.Attempt), slog.String("class", e.Class.String()))
		}
		if e.Delay > 0 {
			attrs = append(attrs, slog.Duration("delay", e.Delay))
		}
		if e.Reason != "" {
			attrs = append(attrs, slog.String("reason", e.Reason))
		}
		if e.Shadow {
			attrs = append(attrs, slog.Bool("shadow", true))
		}
		if e.Err != nil {
			attrs = append(attrs, slog.String("error", e.Err.Error()))
		}
		l.LogAttrs(ctx, level, "sqlretry "+e.Kind.String(), attrs...)
	})
}

// Stats is a snapshot of what one wrapped connector has done, read like
// db.Stats(). Counters only grow.
type Stats struct {
	Successes          int64        // calls that succeeded (statements, begins, commits, dials)
	RetriesStatement   int64        // statements re-run on the same connection after the server rolled them back
	RetriesTransaction int64        // RunInTx replays of a whole transaction
	RetriesConnection  int64        // re-dials, and replays after connection loss or unavailability
	HandOffs           int64        // calls handed back to database/sql to re-run on another connection (its ErrBadConn loop)
	GiveUps            int64        // retryable errors returned to the caller after retrying
	Dials              int64        // connections opened
	DialFailures       int64        // dial attempts that failed
	CircuitRejections  int64        // calls refused with ErrCircuitOpen
	CircuitWaits       int64        // waits of calls whose deadline let them wait for an open breaker's probe
	BudgetRejections   int64        // retries refused with ErrBudgetExhausted
	CommitsResolved    int64        // lost COMMITs whose outcome was found out
	CommitsAmbiguous   int64        // lost COMMITs returned as ErrAmbiguousCommit
	Poisoned           int64        // transactions poisoned by a swallowed retryable error
	ContentionWaits    int64        // RunInTx attempts that waited for contention control
	ContentionCuts     int64        // times contention control cut the number of transactions at once
	ContentionLetGo    int64        // times it let go because the db committed less with it than without
	BreakerTransitions int64        // changes of the breaker's state
	ShadowDecisions    int64        // decisions shadow mode reported and did not carry out (events with Shadow set)
	Breaker            BreakerState // the breaker's state now (BreakerClosed without a breaker)
	BudgetTokens       float64      // retries the budget would allow now (before time refill)
	// ContentionLimit is how many RunInTx transactions contention control
	// lets run at once now; 0 while it is not engaged (no limit) or off.
	ContentionLimit float64
}

type counters struct {
	successes, retriesStatement, retriesTransaction, retriesConnection atomic.Int64
	handOffs, giveUps, dials, dialFailures, budgetRejections           atomic.Int64
	commitsResolved, commitsAmbiguous, poisoned, circuitWaits          atomic.Int64
	breakerTransitions, shadowDecisions                                atomic.Int64
}

// StatsOf returns the statistics of a *sql.DB opened through sqlretry, and
// false for any other *sql.DB.
func StatsOf(db *sql.DB) (Stats, bool) {
	r := retrierOf(db)
	if r == nil {
		return Stats{}, false
	}
	return r.stats(), true
}

func (r *retrier) stats() Stats {
	c := r.counters
	s := Stats{
		Successes:          c.successes.Load(),
		RetriesStatement:   c.retriesStatement.Load(),
		RetriesTransaction: c.retriesTransaction.Load(),
		RetriesConnection:  c.retriesConnection.Load(),
		HandOffs:           c.handOffs.Load(),
		GiveUps:            c.giveUps.Load(),
		Dials:              c.dials.Load(),
		DialFailures:       c.dialFailures.Load(),
		BudgetRejections:   c.budgetRejections.Load(),
		CommitsResolved:    c.commitsResolved.Load(),
		CommitsAmbiguous:   c.commitsAmbiguous.Load(),
		Poisoned:           c.poisoned.Load(),
		CircuitWaits:       c.circuitWaits.Load(),
		BreakerTransitions: c.breakerTransitions.Load(),
		ShadowDecisions:    c.shadowDecisions.Load(),
		Breaker:            r.breaker.State(),
		BudgetTokens:       r.budget.tokens(),
	}
	if r.breaker != nil {
		s.CircuitRejections = r.breaker.rejectCount.Load()
	}
	if l := r.txLimit; l != nil {
		s.ContentionWaits, s.ContentionCuts, s.ContentionLetGo = l.queued.Load(), l.decrease.Load(), l.letGo.Load()
		if l.engaged.Load() {
			l.mu.Lock()
			s.ContentionLimit = l.limit
			l.mu.Unlock()
		}
	}
	return s
}

func (r *retrier) observe(ctx context.Context, e Event) {
	if e.Kind == EventBreaker {
		r.counters.breakerTransitions.Add(1)
	}
	if r.obs != nil {
		r.obs.Observe(ctx, e)
	}
}

// ErrorCode returns the database's code for err, for dashboards and the
// OpenTelemetry attribute db.response.status_code: the SQLSTATE of a
// PostgreSQL error (any error in the chain with a SQLState method, as
// pgconn.PgError and lib/pq's have), or the error number of a MySQL or
// MariaDB one (go-sql-driver/mysql's MySQLError), as a decimal string.
// It returns "" when err carries no code.
func ErrorCode(err error) string {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return pg.SQLState()
	}
	if n, _, ok := mysqlErrorOf(err); ok {
		return strconv.Itoa(int(n))
	}
	return ""
}

// Operation is one call into sqlretry, from the moment it enters to the
// moment it returns, with all its attempts: the logical operation of the
// OpenTelemetry database conventions.
type Operation struct {
	Op      string // "exec", "query", "stmt.exec", "stmt.query", "dial", or "tx" for RunInTx
	Query   string // the statement's text; "" for dial and tx
	InTx    bool   // a statement inside a transaction (sqlretry does not retry it on its own)
	Dialect Dialect
}

// OperationObserver is an Observer that also sees each call start and end
// (an OpenTelemetry span, a duration histogram). Give it to WithObserver;
// sqlretry finds the two methods by a type assertion.
type OperationObserver interface {
	Observer
	// StartOperation is called as a call enters sqlretry. The context it
	// returns is the call's from then on: every attempt is made with it
	// (so a driver wrapped in otelsql below sqlretry makes its spans
	// children of the operation), and the call's events are observed with
	// it.
	StartOperation(ctx context.Context, op Operation) context.Context
	// EndOperation is called with the context StartOperation returned
	// when the call returns, with the error it returns (nil on success).
	// A call handed off to database/sql (EventHandOff) ends here with an
	// error that matches driver.ErrBadConn; database/sql's re-run on
	// another connection is an operation of its own. An err that is
	// driver.ErrSkip means the driver did not run the call (database/sql
	// prepares the statement instead): no operation took place.
	EndOperation(ctx context.Context, op Operation, err error)
}

// operations is the observer's OperationObserver, or nil, asserted once
// when the retrier is made (newRetrier, RunInTx's copy): the hot path pays
// a field load, not a type assertion per call.
func (r *retrier) operations() OperationObserver {
	return r.ops
}

// observed runs call as op between StartOperation and EndOperation.
func observed[T any](ctx context.Context, o OperationObserver, op Operation, call func(context.Context) (T, error)) (T, error) {
	ctx = o.StartOperation(ctx, op)
	v, err := call(ctx)
	o.EndOperation(ctx, op, err)
	return v, err
}
