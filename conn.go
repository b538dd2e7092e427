package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"reflect"
	"strings"
	"sync/atomic"

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

// Compile-time checks: every optional interface that database/sql looks for
// is implemented, and each method falls back to what database/sql would do
// when the driver's connection lacks it, so wrapping changes nothing a
// program can observe except the retries. The deprecated Stmt
// ColumnConverter is not forwarded: database/sql would then skip argument
// conversion for drivers whose NumInput is -1, and neither pgx nor
// go-sql-driver/mysql implements it.
var (
	_ driver.Conn               = (*conn)(nil)
	_ driver.ConnBeginTx        = (*conn)(nil)
	_ driver.ConnPrepareContext = (*conn)(nil)
	_ driver.ExecerContext      = (*conn)(nil)
	_ driver.QueryerContext     = (*conn)(nil)
	_ driver.Pinger             = (*conn)(nil)
	_ driver.SessionResetter    = (*conn)(nil)
	_ driver.Validator          = (*conn)(nil)
	_ driver.NamedValueChecker  = (*conn)(nil)

	_ driver.Stmt              = (*stmt)(nil)
	_ driver.StmtExecContext   = (*stmt)(nil)
	_ driver.StmtQueryContext  = (*stmt)(nil)
	_ driver.NamedValueChecker = (*stmt)(nil)

	_ driver.Rows                           = (*txRows)(nil)
	_ driver.RowsNextResultSet              = (*txRows)(nil)
	_ driver.RowsColumnTypeScanType         = (*txRows)(nil)
	_ driver.RowsColumnTypeDatabaseTypeName = (*txRows)(nil)
	_ driver.RowsColumnTypeLength           = (*txRows)(nil)
	_ driver.RowsColumnTypeNullable         = (*txRows)(nil)
	_ driver.RowsColumnTypePrecisionScale   = (*txRows)(nil)
)

// Unwrapper is implemented by every connection sqlretry hands to
// database/sql: sql.Conn.Raw users reach the driver's own connection
// through it (see UnwrapConn).
type Unwrapper interface {
	Unwrap() driver.Conn
}

// UnwrapConn returns the driver's own connection under any stack of
// wrappers that follow the Unwrap() driver.Conn convention, for use inside
// sql.Conn.Raw:
//
//	conn.Raw(func(dc any) error {
//		pgxConn := sqlretry.UnwrapConn(dc).(*stdlib.Conn).Conn()
//		...
//	})
func UnwrapConn(dc any) driver.Conn {
	for {
		u, ok := dc.(Unwrapper)
		if !ok {
			c, _ := dc.(driver.Conn)
			return c
		}
		dc = u.Unwrap()
	}
}

// conn is the Conn decorator. database/sql serialises the calls on one
// connection; bad is atomic because IsValid may be read from another
// goroutine when the pool takes the connection back.
type conn struct {
	inner   driver.Conn
	execer  driver.ExecerContext  // nil when the driver lacks it
	queryer driver.QueryerContext // nil when the driver lacks it
	r       *retrier
	tx      *tx          // the open transaction (&txBuf), nil in autocommit
	txBuf   tx           // one transaction at a time per connection: no allocation per BeginTx
	manual  atomic.Int32 // >0: a transaction opened by hand (BEGIN via Exec); no statement retries
	bad     atomic.Bool  // discard at the next reset: it broke or may be on a standby

	// resetter and validator: asserted once (newConn), not each time the
	// pool takes the connection back (ResetSession, IsValid); nil when the
	// driver lacks them. (ConnBeginTx asserted once as well, a field more,
	// made TestMySQLCommitEndsAtTheDeadline return late under CPU
	// starvation in 3-29 runs of 200 where main never did; the cause was
	// not found, so BeginTx asserts it each time, as before.)
	resetter  driver.SessionResetter
	validator driver.Validator

	// lost: the driver's connection was seen closed after a lost
	// connection; from then on the driver refuses every call before sending
	// anything (pgx checks IsClosed first), so its ErrBadConn is a proven
	// "not sent". readOnlyPending: a PostgreSQL transaction got a read-only
	// answer, to be judged after its rollback (readonly.go).
	lost            bool
	readOnlyPending bool
	shadowTx        bool // a transaction begun in shadow mode is open (shadow.go)

	opens uint64 // the breaker's open count when it was dialled (breaker.opens)

	serverID    int64 // PostgreSQL backend pid / MySQL connection id, 0 until asked
	serverStart int64 // PostgreSQL server start time, µs, asked with serverID
	// serverReplay: where the PostgreSQL server's last recovery ended (0:
	// none since it started; replayUnknown: the question did not ask),
	// set with serverStart. Without the WAL proof it tells a recovery since (a crash
	// cycle keeps the start time) from one before the connection asked.
	serverReplay uint64
	mysqlServer  mysqlServer // the MySQL server the session runs on, asked with serverID (resolve.go)
	noMarker     bool        // MySQL: the session may not write the commit marker a new one may (markerRefused)
	// boundRefusedAt: when this session was refused the short-wait bound's
	// SET (42501) on a db whose bound other sessions did set: a role of
	// the session's own (SET ROLE) may not set it. Its replays run
	// unbounded until a statement on it may change its role back
	// (noteRole), or shortWaitRelearn has passed (unix ns, the db's clock;
	// 0: none). Atomic: database/sql rolls a transaction back from its own
	// goroutine when the caller's context ends, and hands the connection
	// to the next caller while the attempt's goroutine may still read it.
	boundRefusedAt atomic.Int64

	// inflight is a COMMIT abandoned at the caller's deadline (see
	// commitWithinDeadline): the driver's connection is closed after it.
	inflight atomic.Pointer[chan error]

	facts queryFacts // what the SQL reader said of the last statement's text
}

// queryFacts remembers what the SQL reader (txControl, escapesTx,
// isReadQuery: pure functions of the dialect and the text) said of the
// last statement's text on this connection, each worked out on first
// use. A program runs the same few texts again and again, mostly the same
// string constant: comparing it with the last one costs a length and
// pointer check, where reading it costs a scan. Calls on a connection are
// serialised by database/sql, so no lock.
type queryFacts struct {
	q     string
	known uint8 // factCtl, factEsc, factRead: which of the below are worked out
	ctl   int   // txControl
	esc   bool  // escapesTx
	read  bool  // isReadQuery
}

// factsMaxLen: a longer text (a generated bulk INSERT) is read each time
// rather than kept alive by the connection until its next statement.
const factsMaxLen = 4096

const (
	factCtl = 1 << iota
	factEsc
	factRead
)

// of returns f for query q, forgetting what it knew of another text.
func (f *queryFacts) of(q string) *queryFacts {
	if f.q != q || f.known == 0 {
		*f = queryFacts{q: q}
	}
	return f
}

// remembered is read(c.r.dialect, q), kept in the fact that bit and field
// name for the last text (queryFacts).
func remembered[T any](c *conn, q string, bit uint8, field func(*queryFacts) *T, read func(Dialect, string) T) T {
	if len(q) > factsMaxLen {
		return read(c.r.dialect, q)
	}
	f := c.facts.of(q)
	v := field(f)
	if f.known&bit == 0 {
		*v, f.known = read(c.r.dialect, q), f.known|bit
	}
	return *v
}

// txControl, escapesTx and isReadQuery are the SQL reader's verdicts on
// q, remembered for the last text.
// Each first answers a repeat of the last text inline, without the
// generic call and its field closure.
func (c *conn) txControl(q string) int {
	if f := &c.facts; f.known&factCtl != 0 && f.q == q {
		return f.ctl
	}
	return remembered(c, q, factCtl, func(f *queryFacts) *int { return &f.ctl }, txControl)
}

func (c *conn) escapesTx(q string) bool {
	if f := &c.facts; f.known&factEsc != 0 && f.q == q {
		return f.esc
	}
	return remembered(c, q, factEsc, func(f *queryFacts) *bool { return &f.esc }, escapesTx)
}

func (c *conn) isReadQuery(q string) bool {
	if f := &c.facts; f.known&factRead != 0 && f.q == q {
		return f.read
	}
	return remembered(c, q, factRead, func(f *queryFacts) *bool { return &f.read }, isReadQuery)
}

func newConn(ic driver.Conn, r *retrier) *conn {
	c := &conn{inner: ic, r: r}
	c.execer, _ = ic.(driver.ExecerContext)
	c.queryer, _ = ic.(driver.QueryerContext)
	c.resetter, _ = ic.(driver.SessionResetter)
	c.validator, _ = ic.(driver.Validator)
	if r.implicitTx {
		c.manual.Store(2)
	}
	return c
}

// Unwrap returns the driver's own connection (the http.ResponseController
// convention), so that sql.Conn.Raw reaches *stdlib.Conn or the mysql conn.
func (c *conn) Unwrap() driver.Conn { return c.inner }

func (c *conn) Close() error {
	if done := c.inflight.Load(); done != nil {
		go func() { <-*done; c.inner.Close() }()
		return nil
	}
	return c.inner.Close()
}

func (c *conn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	var (
		si  driver.Stmt
		err error
	)
	if pc, ok := c.inner.(driver.ConnPrepareContext); ok {
		si, err = pc.PrepareContext(ctx, query)
	} else {
		// As database/sql's ctxDriverPrepare.
		si, err = c.inner.Prepare(query)
		if err == nil && ctx.Err() != nil {
			si.Close()
			return nil, ctx.Err()
		}
	}
	if err != nil {
		if c.tx != nil {
			c.tx.failed(err, query)
			return nil, err
		}
		return nil, c.prepareFailed(ctx, query, err)
	}
	return &stmt{inner: si, c: c, query: query}, nil
}

// prepareFailed judges a prepare that failed outside a transaction. A
// prepare has no effect on the data, so one whose connection was lost
// (go-sql-driver/mysql's "invalid connection" while the reply was awaited;
// it prepares every statement with arguments) is handed to database/sql
// to run on a new connection, like a statement that sent nothing; within
// the retry budget, not in shadow mode (the plain driver's error), and
// not while a transaction opened by hand is open.
func (c *conn) prepareFailed(ctx context.Context, query string, err error) error {
	if ctx.Err() != nil || c.r.shadow.Load() || c.manual.Load() != 0 {
		// manual: a transaction the driver does not see is open (BEGIN as
		// a statement, autocommit=0); on a new connection the statement
		// would run outside it.
		return err
	}
	cls := c.r.classify(err)
	if cls != ConnectionLost && !errors.Is(err, driver.ErrBadConn) {
		return err
	}
	c.bad.Store(true)
	if !c.r.budget.withdraw() {
		return c.r.refuse(ctx, "prepare", 1, cls, ErrBudgetExhausted, err)
	}
	c.r.counters.handOffs.Add(1)
	c.r.counters.retriesConnection.Add(1)
	const why = "the connection was lost while the statement was prepared; nothing ran"
	c.r.observe(ctx, Event{Kind: EventHandOff, Op: "prepare", Attempt: 1, Class: cls, Err: err, Reason: why + "; database/sql re-runs the call on another connection"})
	return handOffWith(err, why)
}

// noteTxControl follows transactions opened by hand with Exec("BEGIN"),
// through every statement of the text: "INSERT ...; BEGIN" opens one, and
// COMMIT AND CHAIN keeps it open (issue 9 item 3). A connection that is
// manual for good (SET autocommit, XA) stays so.
func (c *conn) noteTxControl(query string) {
	switch c.txControl(query) {
	case txOpens:
		c.manual.CompareAndSwap(0, 1)
	case txForGood:
		c.manual.Store(2)
	case txEnds:
		c.manual.CompareAndSwap(1, 0)
	}
}

// ExecContext reports the call to an OperationObserver when there is one
// (not sqlretry's own short-wait statements, as no statement of its own is).
func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.tx == nil && inClosure() {
		res, err := c.execObserved(ctx, query, args)
		c.noteEscape(ctx, query, err)
		return res, err
	}
	return c.execObserved(ctx, query, args)
}

func (c *conn) execObserved(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if o := c.r.operations(); o != nil && !isShortWaitQuery(query) {
		op := Operation{Op: "exec", Query: query, InTx: c.tx != nil, Dialect: c.r.dialect}
		return observed(ctx, o, op, func(ctx context.Context) (driver.Result, error) { return c.execContext(ctx, query, args) })
	}
	return c.execContext(ctx, query, args)
}

func (c *conn) execContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.boundRefusedAt.Load() != 0 {
		c.noteRole(query)
	}
	if c.shadowTx {
		return c.execInner(ctx, query, args)
	}
	if c.tx != nil {
		return c.tx.exec(ctx, query, args)
	}
	if c.r.shadow.Load() {
		return shadowStatement(ctx, c, "exec", query, false, func(ctx context.Context) (driver.Result, error) { return c.execInner(ctx, query, args) })
	}
	t, err := c.enter(ctx, "exec", query)
	if err != nil {
		return nil, err
	}
	// The first attempt is a direct call: a closure is built only on the
	// slow path, so a successful call allocates nothing of sqlretry's.
	if c.r.cfg.attemptTimeout == 0 {
		var res driver.Result
		var err error
		if c.execer != nil { // execInner's path, without the call
			res, err = c.execer.ExecContext(ctx, query, args)
		} else {
			res, err = c.execInner(ctx, query, args)
		}
		if err == nil {
			c.r.succeeded(t)
			return res, nil
		}
		if c.firstAttemptDone(t, err) {
			return res, err
		}
		return runStatement(ctx, c, t, "exec", query, false, err, func(ctx context.Context) (driver.Result, error) {
			return c.execInner(ctx, query, args)
		})
	}
	return runStatement(ctx, c, t, "exec", query, false, nil, func(ctx context.Context) (driver.Result, error) {
		return c.execInner(ctx, query, args)
	})
}

// QueryContext reports the call to an OperationObserver when there is one
// (not sqlretry's own short-wait statement, as no statement of its own is).
func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if c.tx == nil && inClosure() {
		rows, err := c.queryObserved(ctx, query, args)
		c.noteEscape(ctx, query, err)
		return rows, err
	}
	return c.queryObserved(ctx, query, args)
}

func (c *conn) queryObserved(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if o := c.r.operations(); o != nil && !isShortWaitQuery(query) {
		op := Operation{Op: "query", Query: query, InTx: c.tx != nil, Dialect: c.r.dialect}
		return observed(ctx, o, op, func(ctx context.Context) (driver.Rows, error) { return c.queryContext(ctx, query, args) })
	}
	return c.queryContext(ctx, query, args)
}

func (c *conn) queryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if c.boundRefusedAt.Load() != 0 {
		c.noteRole(query)
	}
	if c.shadowTx {
		return c.queryInner(ctx, query, args)
	}
	if c.tx != nil {
		return c.tx.query(ctx, query, args)
	}
	if c.r.shadow.Load() {
		return shadowStatement(ctx, c, "query", query, true, func(ctx context.Context) (driver.Rows, error) { return c.queryInner(ctx, query, args) })
	}
	t, err := c.enter(ctx, "query", query)
	if err != nil {
		return nil, err
	}
	if c.r.cfg.attemptTimeout == 0 {
		var rows driver.Rows
		var err error
		if c.queryer != nil { // execInner's path, without the call
			rows, err = c.queryer.QueryContext(ctx, query, args)
		} else {
			rows, err = c.queryInner(ctx, query, args)
		}
		if err == nil {
			c.r.succeeded(t)
			return rows, nil
		}
		if c.firstAttemptDone(t, err) {
			return rows, err
		}
		return runStatement(ctx, c, t, "query", query, true, err, func(ctx context.Context) (driver.Rows, error) {
			return c.queryInner(ctx, query, args)
		})
	}
	return runStatement(ctx, c, t, "query", query, true, nil, func(ctx context.Context) (driver.Rows, error) {
		return c.queryInner(ctx, query, args)
	})
}

// enter admits an autocommit statement: the breaker fails it fast when
// open, and transactions opened by hand are noted.
//
// The closed breaker's path is a few loads, small enough to be inlined
// into every statement (issue 13 goal 3: each call layer was a
// measurable share of sqlretry's cost per statement).
func (c *conn) enter(ctx context.Context, op, query string) (ticket, error) {
	if b := c.r.breaker; b == nil || BreakerState(b.state.Load()) == BreakerClosed {
		if f := &c.facts; f.known&factCtl == 0 || f.q != query || f.ctl != sqltext.TxNone {
			c.noteTxControl(query) // not the last text again, which controls nothing
		}
		return b.closedTicket(), nil
	}
	return c.enterSlow(ctx, op, query)
}

// enterSlow is enter while the breaker is not closed.
func (c *conn) enterSlow(ctx context.Context, op, query string) (ticket, error) {
	t, err := c.admit(ctx, op, 0, Unavailable, nil)
	if err != nil {
		return t, err
	}
	c.noteTxControl(query)
	return t, nil
}

// admit asks the breaker to let a call on c through (retrier.admitOn) and
// returns the caller's error when it does not: ErrCircuitOpen, or, for a
// connection from before the breaker last opened, a hand-off (it matches
// driver.ErrBadConn, and ErrCircuitOpen for a pinned *sql.Conn) that
// discards the connection so that database/sql dials; nothing was sent.
// attempts, cls and last describe the call so far.
func (c *conn) admit(ctx context.Context, op string, attempts int, cls Class, last error) (ticket, error) {
	t, err := c.r.admitOn(ctx, c)
	switch {
	case err == nil:
		return t, nil
	case err == errStaleConn:
		c.bad.Store(true)
		why := "the breaker is open and the connection was opened before it opened (it may have died in the outage)"
		c.r.observe(ctx, Event{Kind: EventHandOff, Op: op, Attempt: attempts, Class: Unavailable, Err: last, Reason: why + "; database/sql dials anew"})
		return t, handOffWith(newError(op, attempts, Unavailable, ErrCircuitOpen, last), why)
	}
	return t, c.r.refuse(ctx, op, attempts, cls, err, last)
}

// firstAttemptDone books a first attempt that needs no retry decision: a
// success, or an error database/sql compares by identity.
func (c *conn) firstAttemptDone(t ticket, err error) bool {
	switch {
	case err == nil:
		c.r.succeeded(t)
		return true
	case isPassThrough(err):
		c.r.breaker.done(t, outcomeNeutral)
		return true
	}
	return false
}

// execInner calls the driver as database/sql would: ExecerContext, else the
// deprecated Execer, else ErrSkip (database/sql then prepares).
func (c *conn) execInner(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.execer != nil {
		return c.execer.ExecContext(ctx, query, args)
	}
	//lint:ignore SA1019 forwarding the deprecated interface on purpose
	if e, ok := c.inner.(driver.Execer); ok {
		values, err := namedValueToValue(args)
		if err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return e.Exec(query, values)
	}
	return nil, driver.ErrSkip
}

func (c *conn) queryInner(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if c.queryer != nil {
		return c.queryer.QueryContext(ctx, query, args)
	}
	//lint:ignore SA1019 forwarding the deprecated interface on purpose
	if q, ok := c.inner.(driver.Queryer); ok {
		values, err := namedValueToValue(args)
		if err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return q.Query(query, values)
	}
	return nil, driver.ErrSkip
}

func namedValueToValue(named []driver.NamedValue) ([]driver.Value, error) {
	args := make([]driver.Value, len(named))
	for n, param := range named {
		if len(param.Name) > 0 {
			return nil, errors.New("sql: driver does not support the use of Named Parameters")
		}
		args[n] = param.Value
	}
	return args, nil
}

func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if c.r.shadow.Load() {
		return c.shadowBeginTx(ctx, opts)
	}
	var t ticket
	if b := c.r.breaker; b == nil || BreakerState(b.state.Load()) == BreakerClosed {
		t = b.closedTicket()
	} else {
		var err error
		if t, err = c.admit(ctx, "begin", 0, Unavailable, nil); err != nil {
			return nil, err
		}
	}
	var itx driver.Tx
	var err error
	if bt, ok := c.inner.(driver.ConnBeginTx); ok {
		itx, err = bt.BeginTx(ctx, opts)
	} else {
		itx, err = beginWithoutContext(ctx, c.inner, opts)
	}
	if err != nil {
		cls := c.r.classify(err)
		c.r.breaker.done(t, breakerOutcome(cls, err))
		if cls == ConnectionLost {
			c.bad.Store(true)
		}
		return nil, err
	}
	c.r.succeeded(t)
	c.txBuf = tx{c: c, inner: itx, ctx: ctx, readOnly: opts.ReadOnly}
	c.readOnlyPending = false
	if a, ok := ctx.Value(keyAttempt).(*txAttempt); ok {
		c.txBuf.attempt = a
		a.tracked = true
		if a.rare != nil { // an attempt that may get a bound (runTxOnce)
			a.rare.conn = c
		}
	}
	c.tx = &c.txBuf
	return c.tx, nil
}

// noteEscape: a statement outside any transaction of sqlretry's, run in
// an attempt's closure (a write through the outer *sql.DB, or another
// db of sqlretry's), that may have written and committed by itself: the
// attempt must not be replayed, or it runs again (noteCommit; a hostile
// review found the audit row of such a closure written twice,
// 2026-12-02). Not one: a statement that provably did not run (the
// driver sent nothing; the server refused one atomic statement whole),
// one marked Idempotent, a plain read unless marked NotIdempotent. A
// failed CALL, a multi-statement text or a write lost with its connection
// may have committed part of its work: one.
func (c *conn) noteEscape(ctx context.Context, query string, err error) {
	if err != nil && !errors.Is(err, ErrAmbiguousCommit) &&
		(errors.Is(err, driver.ErrBadConn) || serverAnswered(err) && isAtomicStatement(c.r.dialect, query)) {
		return
	}
	if v, ok := ctx.Value(keyIdempotent).(bool); ok {
		if v {
			return
		}
	} else if c.isReadQuery(query) {
		return
	}
	noteCommit()
}

// noteRole forgets the session's refusal of the short-wait bound
// (boundRefusedAt) at a statement that may change its role: "role" with
// "set" (SET ROLE, RESET ROLE, set_config('role', ...), a function
// reset_role()), "authorization" (SET SESSION AUTHORIZATION), RESET ALL,
// DISCARD. A false match costs one more refused attempt (attack23: a
// SELECT of a column named role, 'reset password' in data, the tenant
// idiom set_config('app.tenant', ...) had each replay refused); a change
// back it does not see (a function of another name, a trigger) leaves the
// session's replays unbounded, as the plain driver runs them, for up to
// shortWaitRelearn.
func (c *conn) noteRole(query string) {
	q := strings.ToLower(query)
	if strings.Contains(q, "role") && strings.Contains(q, "set") || strings.Contains(q, "authorization") ||
		strings.Contains(q, "reset") && strings.Contains(q, "all") || strings.Contains(q, "discard") {
		c.boundRefusedAt.Store(0)
	}
}

// boundRefused says whether the session was refused the short-wait bound
// within shortWaitRelearn (boundRefusedAt).
func (c *conn) boundRefused(clock Clock) bool {
	at := c.boundRefusedAt.Load()
	if at == 0 {
		return false
	}
	if clock.Now().UnixNano()-at < int64(shortWaitRelearn) {
		return true
	}
	c.boundRefusedAt.CompareAndSwap(at, 0)
	return false
}

// beginWithoutContext is database/sql's ctxDriverBegin for old drivers.
func beginWithoutContext(ctx context.Context, ci driver.Conn, opts driver.TxOptions) (driver.Tx, error) {
	if opts.Isolation != driver.IsolationLevel(0) {
		return nil, errors.New("sql: driver does not support non-default isolation level")
	}
	if opts.ReadOnly {
		return nil, errors.New("sql: driver does not support read-only transactions")
	}
	//lint:ignore SA1019 the fallback database/sql itself uses
	txi, err := ci.Begin()
	if err == nil && ctx.Err() != nil {
		txi.Rollback()
		return nil, ctx.Err()
	}
	return txi, err
}

func (c *conn) Ping(ctx context.Context) error {
	if p, ok := c.inner.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

// ResetSession discards a connection that sqlretry saw break.
func (c *conn) ResetSession(ctx context.Context) error {
	if c.bad.Load() {
		return driver.ErrBadConn
	}
	if c.r.breaker.staleConn(c.opens) {
		// From before the breaker's last opening, taken while it is not
		// closed: admit would refuse it anyway; the driver's own check
		// (pgx pings) could wait on a dead server.
		c.bad.Store(true)
		return driver.ErrBadConn
	}
	if c.resetter != nil {
		return c.resetter.ResetSession(ctx)
	}
	return nil
}

func (c *conn) IsValid() bool {
	if c.bad.Load() {
		return false
	}
	if c.validator != nil {
		return c.validator.IsValid()
	}
	return true
}

func (c *conn) CheckNamedValue(nv *driver.NamedValue) error {
	if nvc, ok := c.inner.(driver.NamedValueChecker); ok {
		return nvc.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

// stmt is the Stmt decorator: the same rules as conn, for prepared statements.
type stmt struct {
	inner driver.Stmt
	c     *conn
	query string
}

func (s *stmt) Close() error  { return s.inner.Close() }
func (s *stmt) NumInput() int { return s.inner.NumInput() }

func (s *stmt) Exec(args []driver.Value) (driver.Result, error) {
	//lint:ignore SA1019 database/sql calls the context method; this keeps the interface whole
	return s.inner.Exec(args)
}

func (s *stmt) Query(args []driver.Value) (driver.Rows, error) {
	//lint:ignore SA1019 as Exec
	return s.inner.Query(args)
}

// ExecContext reports the call to an OperationObserver when there is one.
func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if s.c.tx == nil && inClosure() {
		res, err := s.execObserved(ctx, args)
		s.c.noteEscape(ctx, s.query, err)
		return res, err
	}
	return s.execObserved(ctx, args)
}

func (s *stmt) execObserved(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if o := s.c.r.operations(); o != nil {
		op := Operation{Op: "stmt.exec", Query: s.query, InTx: s.c.tx != nil, Dialect: s.c.r.dialect}
		return observed(ctx, o, op, func(ctx context.Context) (driver.Result, error) { return s.execContext(ctx, args) })
	}
	return s.execContext(ctx, args)
}

func (s *stmt) execContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	c := s.c
	if c.boundRefusedAt.Load() != 0 {
		c.noteRole(s.query) // a prepared RESET ROLE
	}
	if c.shadowTx {
		return s.execInner(ctx, args)
	}
	if c.tx != nil {
		return c.tx.stmtExec(ctx, s, args)
	}
	if c.r.shadow.Load() {
		return shadowStatement(ctx, c, "stmt.exec", s.query, false, func(ctx context.Context) (driver.Result, error) { return s.execInner(ctx, args) })
	}
	t, err := c.enter(ctx, "stmt.exec", s.query)
	if err != nil {
		return nil, err
	}
	if c.r.cfg.attemptTimeout == 0 {
		res, err := s.execInner(ctx, args)
		if c.firstAttemptDone(t, err) {
			return res, err
		}
		return runStatement(ctx, c, t, "stmt.exec", s.query, false, err, func(ctx context.Context) (driver.Result, error) {
			return s.execInner(ctx, args)
		})
	}
	return runStatement(ctx, c, t, "stmt.exec", s.query, false, nil, func(ctx context.Context) (driver.Result, error) {
		return s.execInner(ctx, args)
	})
}

// QueryContext reports the call to an OperationObserver when there is one.
func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if s.c.tx == nil && inClosure() {
		rows, err := s.queryObserved(ctx, args)
		s.c.noteEscape(ctx, s.query, err)
		return rows, err
	}
	return s.queryObserved(ctx, args)
}

func (s *stmt) queryObserved(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if o := s.c.r.operations(); o != nil {
		op := Operation{Op: "stmt.query", Query: s.query, InTx: s.c.tx != nil, Dialect: s.c.r.dialect}
		return observed(ctx, o, op, func(ctx context.Context) (driver.Rows, error) { return s.queryContext(ctx, args) })
	}
	return s.queryContext(ctx, args)
}

func (s *stmt) queryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	c := s.c
	if c.boundRefusedAt.Load() != 0 {
		c.noteRole(s.query)
	}
	if c.shadowTx {
		return s.queryInner(ctx, args)
	}
	if c.tx != nil {
		return c.tx.stmtQuery(ctx, s, args)
	}
	if c.r.shadow.Load() {
		return shadowStatement(ctx, c, "stmt.query", s.query, true, func(ctx context.Context) (driver.Rows, error) { return s.queryInner(ctx, args) })
	}
	t, err := c.enter(ctx, "stmt.query", s.query)
	if err != nil {
		return nil, err
	}
	if c.r.cfg.attemptTimeout == 0 {
		rows, err := s.queryInner(ctx, args)
		if c.firstAttemptDone(t, err) {
			return rows, err
		}
		return runStatement(ctx, c, t, "stmt.query", s.query, true, err, func(ctx context.Context) (driver.Rows, error) {
			return s.queryInner(ctx, args)
		})
	}
	return runStatement(ctx, c, t, "stmt.query", s.query, true, nil, func(ctx context.Context) (driver.Rows, error) {
		return s.queryInner(ctx, args)
	})
}

// execInner is database/sql's ctxDriverStmtExec.
func (s *stmt) execInner(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if e, ok := s.inner.(driver.StmtExecContext); ok {
		return e.ExecContext(ctx, args)
	}
	values, err := namedValueToValue(args)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	//lint:ignore SA1019 fallback for old drivers, as database/sql does
	return s.inner.Exec(values)
}

func (s *stmt) queryInner(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if q, ok := s.inner.(driver.StmtQueryContext); ok {
		return q.QueryContext(ctx, args)
	}
	values, err := namedValueToValue(args)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	//lint:ignore SA1019 fallback for old drivers, as database/sql does
	return s.inner.Query(values)
}

// CheckNamedValue keeps database/sql's order: the statement's checker, then
// the connection's, then the default conversion.
func (s *stmt) CheckNamedValue(nv *driver.NamedValue) error {
	if nvc, ok := s.inner.(driver.NamedValueChecker); ok {
		return nvc.CheckNamedValue(nv)
	}
	return s.c.CheckNamedValue(nv)
}

// txRows watches the rows of a statement inside a transaction: an error
// while reading them poisons the transaction like any other. Rows outside
// a transaction are not wrapped (nothing to watch, nothing to retry: an
// error after rows were consumed is never retried).
type txRows struct {
	inner driver.Rows
	tx    *tx
	query string
}

func (r *txRows) Columns() []string { return r.inner.Columns() }

// Close reads what is left of the result set (go-sql-driver/mysql does),
// and Row.Scan returns its error: one there, such as a Galera
// certification failure that aborted the query while it sent its rows,
// poisons the transaction like one from Next (issue 10).
func (r *txRows) Close() error {
	err := r.inner.Close()
	if err != nil && err != io.EOF {
		r.tx.failed(err, r.query)
	}
	return err
}

func (r *txRows) Next(dest []driver.Value) error {
	err := r.inner.Next(dest)
	if err != nil && err != io.EOF {
		r.tx.failed(err, r.query)
	}
	return err
}

func (r *txRows) HasNextResultSet() bool {
	if n, ok := r.inner.(driver.RowsNextResultSet); ok {
		return n.HasNextResultSet()
	}
	return false
}

func (r *txRows) NextResultSet() error {
	if n, ok := r.inner.(driver.RowsNextResultSet); ok {
		err := n.NextResultSet()
		if err != nil && err != io.EOF {
			r.tx.failed(err, r.query)
		}
		return err
	}
	return io.EOF
}

// The column-type methods return what database/sql assumes when a driver
// lacks the interface.
func (r *txRows) ColumnTypeScanType(i int) reflect.Type {
	if c, ok := r.inner.(driver.RowsColumnTypeScanType); ok {
		return c.ColumnTypeScanType(i)
	}
	return reflect.TypeFor[any]()
}

func (r *txRows) ColumnTypeDatabaseTypeName(i int) string {
	if c, ok := r.inner.(driver.RowsColumnTypeDatabaseTypeName); ok {
		return c.ColumnTypeDatabaseTypeName(i)
	}
	return ""
}

func (r *txRows) ColumnTypeLength(i int) (int64, bool) {
	if c, ok := r.inner.(driver.RowsColumnTypeLength); ok {
		return c.ColumnTypeLength(i)
	}
	return 0, false
}

func (r *txRows) ColumnTypeNullable(i int) (bool, bool) {
	if c, ok := r.inner.(driver.RowsColumnTypeNullable); ok {
		return c.ColumnTypeNullable(i)
	}
	return false, false
}

func (r *txRows) ColumnTypePrecisionScale(i int) (int64, int64, bool) {
	if c, ok := r.inner.(driver.RowsColumnTypePrecisionScale); ok {
		return c.ColumnTypePrecisionScale(i)
	}
	return 0, 0, false
}
