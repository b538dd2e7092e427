// Package otelsqlretry reports what sqlretry does to OpenTelemetry: the
// database client metrics and spans of the semantic conventions, measured
// around the logical operation (all its retries included), and sqlretry's
// own metrics under the prefix "sqlretry.". It is a module of its own so
// that sqlretry's users who do not use OpenTelemetry do not build it.
//
//	obs, err := otelsqlretry.NewObserver()
//	db, err := sqlretry.Open("pgx", dsn, sqlretry.WithObserver(obs))
//	reg, err := obs.RegisterStats(db) // the breaker, budget and contention gauges
//
// With XSAM/otelsql, sqlretry goes outside and otelsql inside: register the
// driver through otelsql, then open the *sql.DB through sqlretry. The
// operation's span is then the parent of otelsql's span for each attempt
// (see Example_withOtelsql).
package otelsqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sqlretry/sqlretry"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of the meter and the tracer.
const ScopeName = "github.com/sqlretry/sqlretry/otelsqlretry"

// Compile-time check: sqlretry finds the operation methods by assertion.
var _ sqlretry.OperationObserver = (*Observer)(nil)

// Attribute keys. The db.* and error.type keys are the semantic
// conventions'; the sqlretry.* keys are this package's.
const (
	keyDBSystem     = attribute.Key("db.system.name")
	keyDBOperation  = attribute.Key("db.operation.name")
	keyStatusCode   = attribute.Key("db.response.status_code")
	keyErrorType    = attribute.Key("error.type")
	keyOp           = attribute.Key("sqlretry.op")
	keyResendCount  = attribute.Key("sqlretry.resend_count")
	keyAttempt      = attribute.Key("sqlretry.attempt")
	keyClass        = attribute.Key("sqlretry.class")
	keyReason       = attribute.Key("sqlretry.reason")
	keyDelay        = attribute.Key("sqlretry.delay")
	keyRetryKind    = attribute.Key("sqlretry.retry.kind")
	keyBreakerFrom  = attribute.Key("sqlretry.breaker.from")
	keyBreakerTo    = attribute.Key("sqlretry.breaker.to")
	keyBreakerState = attribute.Key("sqlretry.breaker.state")
	keyOutcome      = attribute.Key("sqlretry.commit.outcome")
	keyShadow       = attribute.Key("sqlretry.shadow") // true: shadow mode reported the decision and did not carry it out
)

// durationBuckets are the explicit bucket boundaries the conventions
// advise for db.client.operation.duration, in seconds.
var durationBuckets = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10}

type config struct {
	mp     metric.MeterProvider
	tp     trace.TracerProvider
	system string
	attrs  []attribute.KeyValue
}

// Option configures an Observer.
type Option func(*config)

// WithMeterProvider sets the meter provider (default: the global one).
func WithMeterProvider(mp metric.MeterProvider) Option { return func(c *config) { c.mp = mp } }

// WithTracerProvider sets the tracer provider (default: the global one).
func WithTracerProvider(tp trace.TracerProvider) Option { return func(c *config) { c.tp = tp } }

// WithDBSystem sets db.system.name (default: from sqlretry's dialect,
// "postgresql" or "mysql", else "other_sql"). A MariaDB server speaks
// MySQL's protocol and cannot be told apart by the driver: say "mariadb".
func WithDBSystem(name string) Option { return func(c *config) { c.system = name } }

// WithAttributes adds attributes to every span and measurement, such as
// db.namespace or server.address, to tell databases apart.
func WithAttributes(attrs ...attribute.KeyValue) Option {
	return func(c *config) { c.attrs = append(c.attrs, attrs...) }
}

// Observer is a sqlretry.OperationObserver that records spans and metrics.
// Give it to sqlretry.WithObserver; one Observer may serve many databases.
type Observer struct {
	cfg    config
	tracer trace.Tracer
	meter  metric.Meter

	duration    metric.Float64Histogram
	retries     metric.Int64Counter
	giveUps     metric.Int64Counter
	transitions metric.Int64Counter
	commits     metric.Int64Counter

	sets sync.Map // [2]string{system, operation name} -> attribute.Set of a success
}

// NewObserver builds the instruments.
func NewObserver(opts ...Option) (*Observer, error) {
	o := &Observer{}
	for _, opt := range opts {
		opt(&o.cfg)
	}
	if o.cfg.mp == nil {
		o.cfg.mp = otel.GetMeterProvider()
	}
	if o.cfg.tp == nil {
		o.cfg.tp = otel.GetTracerProvider()
	}
	o.meter = o.cfg.mp.Meter(ScopeName)
	o.tracer = o.cfg.tp.Tracer(ScopeName)
	var err, e error
	o.duration, e = o.meter.Float64Histogram("db.client.operation.duration", metric.WithUnit("s"),
		metric.WithDescription("Duration of database client operations, each with all its retries."),
		metric.WithExplicitBucketBoundaries(durationBuckets...))
	err = errors.Join(err, e)
	o.retries, e = o.meter.Int64Counter("sqlretry.retries", metric.WithUnit("{retry}"),
		metric.WithDescription("Attempts that failed and were run again: by sqlretry after a pause (kind retry), or by database/sql on another connection (kind hand_off); by op, class and reason. With sqlretry.shadow true: would have been run again (shadow mode)."))
	err = errors.Join(err, e)
	o.giveUps, e = o.meter.Int64Counter("sqlretry.give_ups", metric.WithUnit("{call}"),
		metric.WithDescription("Calls sqlretry stopped retrying or refused (breaker open, budget spent, ambiguous write, attempts or time used up), by op, class and reason. With sqlretry.shadow true: would have refused or reported ambiguous (shadow mode)."))
	err = errors.Join(err, e)
	o.transitions, e = o.meter.Int64Counter("sqlretry.breaker.transitions", metric.WithUnit("{transition}"),
		metric.WithDescription("Changes of the circuit breaker's state, by from and to state."))
	err = errors.Join(err, e)
	o.commits, e = o.meter.Int64Counter("sqlretry.commits.lost", metric.WithUnit("{commit}"),
		metric.WithDescription("COMMITs that lost their connection, by what their resolution found: committed, not-committed (replayed) or unknown (returned as ErrAmbiguousCommit)."))
	err = errors.Join(err, e)
	if err != nil {
		return nil, err
	}
	return o, nil
}

// operation is what StartOperation keeps in the call's context.
type operation struct {
	start   time.Time
	span    trace.Span
	resends atomic.Int64
	system  string
	name    string // db.operation.name, "" when not known
}

type operationKey struct{}

func systemName(cfg config, d sqlretry.Dialect) string {
	switch {
	case cfg.system != "":
		return cfg.system
	case d == sqlretry.DialectPostgres:
		return "postgresql"
	case d == sqlretry.DialectMySQL:
		return "mysql"
	}
	return "other_sql"
}

// operationName is the first keyword of a single statement, when it is
// one of the SQL commands a dashboard groups by; "" otherwise (the
// conventions: only where known).
func operationName(op sqlretry.Operation) string {
	if op.Op == "tx" {
		return ""
	}
	q := strings.TrimLeft(op.Query, " \t\r\n(")
	end := strings.IndexAny(q, " \t\r\n(;")
	if end < 0 {
		end = len(q)
	}
	w := q[:end]
	for _, name := range operationNames {
		if strings.EqualFold(w, name) {
			return name
		}
	}
	return ""
}

// operationNames are the SQL commands db.operation.name takes.
var operationNames = []string{"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "CALL", "WITH", "VALUES",
	"CREATE", "ALTER", "DROP", "TRUNCATE", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE",
	"SET", "SHOW", "EXPLAIN", "LOCK", "COPY", "DO"}

// StartOperation starts the operation's span (kind client, named after
// db.operation.name, else "RunInTx" for a RunInTx call and "connect" for
// a dial, else db.system.name, as the conventions name spans).
func (o *Observer) StartOperation(ctx context.Context, op sqlretry.Operation) context.Context {
	system := systemName(o.cfg, op.Dialect)
	name := operationName(op)
	attrs := make([]attribute.KeyValue, 0, 3+len(o.cfg.attrs))
	attrs = append(attrs, keyDBSystem.String(system), keyOp.String(op.Op))
	spanName := system
	switch {
	case name != "":
		attrs = append(attrs, keyDBOperation.String(name))
		spanName = name
	case op.Op == "tx":
		spanName = "RunInTx"
	case op.Op == "dial":
		spanName = "connect"
	}
	attrs = append(attrs, o.cfg.attrs...)
	ctx, span := o.tracer.Start(ctx, spanName, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
	return context.WithValue(ctx, operationKey{}, &operation{start: time.Now(), span: span, system: system, name: name})
}

// EndOperation ends the span and records db.client.operation.duration
// (for a dial only when it failed).
// The number of attempts after the first is the span's
// sqlretry.resend_count, set only when there were some, as HTTP's
// http.request.resend_count is: the database conventions have no retry
// attribute.
func (o *Observer) EndOperation(ctx context.Context, op sqlretry.Operation, err error) {
	st, _ := ctx.Value(operationKey{}).(*operation)
	if st == nil {
		return
	}
	took := time.Since(st.start).Seconds()
	if errors.Is(err, driver.ErrSkip) {
		// The driver did not run it; database/sql prepares the statement
		// and runs it again, as another operation.
		st.span.End()
		return
	}
	if op.Op == "dial" && err == nil {
		// A dial that succeeded precedes the operation that needed it,
		// which is measured itself; one that failed is where the caller's
		// call ended.
		st.span.End()
		return
	}
	if err == nil {
		if n := st.resends.Load(); n > 0 {
			st.span.SetAttributes(keyResendCount.Int64(n))
		}
		o.duration.Record(ctx, took, metric.WithAttributeSet(o.successSet(st.system, st.name)))
		st.span.End()
		return
	}
	attrs := make([]attribute.KeyValue, 0, 5+len(o.cfg.attrs))
	attrs = append(attrs, keyDBSystem.String(st.system))
	if st.name != "" {
		attrs = append(attrs, keyDBOperation.String(st.name))
	}
	attrs = append(attrs, o.cfg.attrs...)
	et := errorType(err)
	attrs = append(attrs, keyErrorType.String(et))
	st.span.SetAttributes(keyErrorType.String(et))
	if code := sqlretry.ErrorCode(err); code != "" {
		attrs = append(attrs, keyStatusCode.String(code))
		st.span.SetAttributes(keyStatusCode.String(code))
	}
	st.span.SetStatus(codes.Error, err.Error())
	if n := st.resends.Load(); n > 0 {
		st.span.SetAttributes(keyResendCount.Int64(n))
	}
	o.duration.Record(ctx, took, metric.WithAttributes(attrs...))
	st.span.End()
}

// successSet is the attribute set of a successful operation, built once
// per system and operation name: the hot path sorts nothing.
func (o *Observer) successSet(system, name string) attribute.Set {
	k := [2]string{system, name}
	if v, ok := o.sets.Load(k); ok {
		return v.(attribute.Set)
	}
	attrs := append([]attribute.KeyValue{keyDBSystem.String(system)}, o.cfg.attrs...)
	if name != "" {
		attrs = append(attrs, keyDBOperation.String(name))
	}
	set := attribute.NewSet(attrs...)
	o.sets.Store(k, set)
	return set
}

// errorType is error.type: the database's code when it gave one, else
// the name of the sentinel the error matches, else "_OTHER".
func errorType(err error) string {
	if code := sqlretry.ErrorCode(err); code != "" {
		return code
	}
	for _, s := range []struct {
		err  error
		name string
	}{
		{sqlretry.ErrCircuitOpen, "sqlretry.ErrCircuitOpen"},
		{sqlretry.ErrBudgetExhausted, "sqlretry.ErrBudgetExhausted"},
		{sqlretry.ErrAmbiguousCommit, "sqlretry.ErrAmbiguousCommit"},
		{context.DeadlineExceeded, "context.DeadlineExceeded"},
		{context.Canceled, "context.Canceled"},
		{driver.ErrBadConn, "driver.ErrBadConn"},
		{sql.ErrTxDone, "sql.ErrTxDone"},
	} {
		if errors.Is(err, s.err) {
			return s.name
		}
	}
	return "_OTHER"
}

// Observe counts sqlretry's decisions and adds each attempt that is run
// again to the operation's span as an event ("sqlretry.retry" or
// "sqlretry.hand_off") with its attempt number, class, reason and the
// pause before the next attempt (sqlretry.delay, in seconds); a give-up
// is a "sqlretry.give_up" event.
func (o *Observer) Observe(ctx context.Context, e sqlretry.Event) {
	st, _ := ctx.Value(operationKey{}).(*operation)
	common := append([]attribute.KeyValue{keyOp.String(e.Op), keyClass.String(e.Class.String()), keyReason.String(e.Reason),
		keyShadow.Bool(e.Shadow)}, o.cfg.attrs...)
	switch e.Kind {
	case sqlretry.EventRetry, sqlretry.EventHandOff:
		kind := "retry"
		if e.Kind == sqlretry.EventHandOff {
			kind = "hand_off"
		}
		o.retries.Add(ctx, 1, metric.WithAttributes(append(common, keyRetryKind.String(kind))...))
		if st != nil {
			if !e.Shadow { // in shadow mode nothing was sent again
				st.resends.Add(1)
			}
			st.span.AddEvent("sqlretry."+kind, trace.WithAttributes(o.eventAttrs(e)...))
		}
	case sqlretry.EventGiveUp:
		o.giveUps.Add(ctx, 1, metric.WithAttributes(common...))
		if st != nil {
			st.span.AddEvent("sqlretry.give_up", trace.WithAttributes(o.eventAttrs(e)...))
		}
	case sqlretry.EventBreaker:
		o.transitions.Add(ctx, 1, metric.WithAttributes(append([]attribute.KeyValue{
			keyBreakerFrom.String(e.BreakerFrom.String()), keyBreakerTo.String(e.BreakerTo.String())}, o.cfg.attrs...)...))
	case sqlretry.EventCommitResolved:
		o.commits.Add(ctx, 1, metric.WithAttributes(append([]attribute.KeyValue{keyOutcome.String(e.Outcome.String()), keyShadow.Bool(e.Shadow)}, o.cfg.attrs...)...))
		if st != nil {
			st.span.AddEvent("sqlretry.commit_resolved", trace.WithAttributes(keyOutcome.String(e.Outcome.String())))
		}
	}
}

func (o *Observer) eventAttrs(e sqlretry.Event) []attribute.KeyValue {
	a := []attribute.KeyValue{keyOp.String(e.Op), keyAttempt.Int(e.Attempt), keyClass.String(e.Class.String()), keyReason.String(e.Reason)}
	if e.Shadow {
		a = append(a, keyShadow.Bool(true))
	}
	if e.Delay > 0 {
		a = append(a, keyDelay.Float64(e.Delay.Seconds()))
	}
	if e.Err != nil {
		a = append(a, keyErrorType.String(errorType(e.Err)))
		if code := sqlretry.ErrorCode(e.Err); code != "" {
			a = append(a, keyStatusCode.String(code))
		}
	}
	return a
}

// RegisterStats registers asynchronous instruments over sqlretry.StatsOf(db),
// read at each collection: the breaker's state, the budget's tokens,
// contention control's limit and waits, and the counters of dials, failed
// dials, breaker and budget refusals. Unregister the returned
// registration when db is closed.
func (o *Observer) RegisterStats(db *sql.DB) (metric.Registration, error) {
	if _, ok := sqlretry.StatsOf(db); !ok {
		return nil, errors.New("otelsqlretry: the *sql.DB was not opened through sqlretry")
	}
	m := o.meter
	var err, e error
	breaker, e := m.Int64ObservableGauge("sqlretry.breaker.state", metric.WithUnit("{state}"),
		metric.WithDescription("1 for the circuit breaker's current state (attribute sqlretry.breaker.state: closed, open, half-open), 0 for the others; closed when the breaker is off."))
	err = errors.Join(err, e)
	tokens, e := m.Float64ObservableGauge("sqlretry.budget.tokens", metric.WithUnit("{retry}"),
		metric.WithDescription("Retries the retry budget would allow now."))
	err = errors.Join(err, e)
	limit, e := m.Float64ObservableGauge("sqlretry.contention.limit", metric.WithUnit("{transaction}"),
		metric.WithDescription("Transactions contention control lets RunInTx run at once; 0 while it is not engaged (no limit)."))
	err = errors.Join(err, e)
	counter := func(name, unit, desc string) metric.Int64ObservableCounter {
		c, e := m.Int64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		err = errors.Join(err, e)
		return c
	}
	waits := counter("sqlretry.contention.waits", "{transaction}", "RunInTx attempts that waited for contention control to let them run.")
	dials := counter("sqlretry.dials", "{connection}", "Connections opened.")
	dialFailures := counter("sqlretry.dial.failures", "{dial}", "Dial attempts that failed: the dials made during an outage.")
	rejections := counter("sqlretry.circuit.rejections", "{call}", "Calls refused with ErrCircuitOpen while the breaker was open.")
	budgetRejections := counter("sqlretry.budget.rejections", "{retry}", "Retries refused with ErrBudgetExhausted.")
	if err != nil {
		return nil, err
	}
	set := metric.WithAttributes(o.cfg.attrs...)
	return m.RegisterCallback(func(_ context.Context, obs metric.Observer) error {
		s, ok := sqlretry.StatsOf(db)
		if !ok {
			return nil
		}
		for _, state := range []sqlretry.BreakerState{sqlretry.BreakerClosed, sqlretry.BreakerOpen, sqlretry.BreakerHalfOpen} {
			v := int64(0)
			if s.Breaker == state {
				v = 1
			}
			obs.ObserveInt64(breaker, v, metric.WithAttributes(append([]attribute.KeyValue{keyBreakerState.String(state.String())}, o.cfg.attrs...)...))
		}
		obs.ObserveFloat64(tokens, s.BudgetTokens, set)
		obs.ObserveFloat64(limit, s.ContentionLimit, set)
		obs.ObserveInt64(waits, s.ContentionWaits, set)
		obs.ObserveInt64(dials, s.Dials, set)
		obs.ObserveInt64(dialFailures, s.DialFailures, set)
		obs.ObserveInt64(rejections, s.CircuitRejections, set)
		obs.ObserveInt64(budgetRejections, s.BudgetRejections, set)
		return nil
	}, breaker, tokens, limit, waits, dials, dialFailures, rejections, budgetRejections)
}
