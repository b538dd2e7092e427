package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"time"
)

// Compile-time checks: the decorators implement what database/sql looks for.
var (
	_ driver.Driver        = (*wrappedDriver)(nil)
	_ driver.DriverContext = (*wrappedDriver)(nil)
	_ driver.Connector     = (*connector)(nil)
	_ io.Closer            = (*connector)(nil)
)

// Open opens a *sql.DB like sql.Open, through sqlretry. driverName must be
// registered (import the driver: "pgx" from github.com/jackc/pgx/v5/stdlib,
// "mysql" from github.com/go-sql-driver/mysql). With no options it is
// already safe: the driver's error classifier, jittered backoff, a breaker
// and a retry budget.
func Open(driverName, dsn string, opts ...Option) (*sql.DB, error) {
	if !slices.Contains(sql.Drivers(), driverName) {
		return nil, fmt.Errorf("sqlretry: unknown driver %q (forgotten import?); registered: %s",
			driverName, strings.Join(sql.Drivers(), ", "))
	}
	// sql.Open does not connect; it gives the registered driver.
	probe, err := sql.Open(driverName, dsn)
	if err != nil {
		return nil, fmt.Errorf("sqlretry: %w", err)
	}
	d := probe.Driver()
	_ = probe.Close()
	if own, ok := d.(*wrappedDriver); ok { // registered through sqlretry already: do not wrap twice
		d, opts = own.inner, append(slices.Clone(own.opts), opts...)
	}
	wd, err := newWrappedDriver(d, opts)
	if err != nil {
		return nil, err
	}
	c, err := wd.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(c), nil
}

// OpenDB opens a *sql.DB on a connector, like sql.OpenDB, through sqlretry.
// Like sql.OpenDB it cannot fail: a nil connector or a bad option makes
// every call on the *sql.DB return the error (WrapConnector returns it).
func OpenDB(c driver.Connector, opts ...Option) *sql.DB {
	wc, err := WrapConnector(c, opts...)
	if err != nil {
		return sql.OpenDB(failingConnector{err})
	}
	return sql.OpenDB(wc)
}

// WrapConnector returns c with sqlretry around it.
func WrapConnector(c driver.Connector, opts ...Option) (driver.Connector, error) {
	if c == nil {
		return nil, errors.New("sqlretry: connector is nil")
	}
	if own, ok := c.(*connector); ok {
		return nil, fmt.Errorf("sqlretry: connector is already wrapped (by %T)", own)
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return newConnector(c, cfg, false), nil
}

// Wrap returns d with sqlretry around it, for sql.Register or for code that
// wants the driver.Driver.
func Wrap(d driver.Driver, opts ...Option) (driver.Driver, error) {
	return newWrappedDriver(d, opts)
}

// Register registers d, wrapped by sqlretry, under name. It returns an error
// (where sql.Register panics) for a nil driver or a name already taken.
func Register(name string, d driver.Driver, opts ...Option) error {
	if name == "" {
		return errors.New("sqlretry: Register: empty driver name")
	}
	wd, err := newWrappedDriver(d, opts)
	if err != nil {
		return err
	}
	if slices.Contains(sql.Drivers(), name) {
		return fmt.Errorf("sqlretry: Register: driver name %q is already registered", name)
	}
	defer func() {
		if p := recover(); p != nil { // a racing registration took the name
			err = fmt.Errorf("sqlretry: Register: %v", p)
		}
	}()
	sql.Register(name, wd)
	return err
}

func newConfig(opts []Option) (config, error) {
	cfg := defaultConfig()
	err := cfg.apply(opts)
	return cfg, err
}

func newWrappedDriver(d driver.Driver, opts []Option) (*wrappedDriver, error) {
	if d == nil || reflect.ValueOf(d).Kind() == reflect.Pointer && reflect.ValueOf(d).IsNil() {
		return nil, errors.New("sqlretry: driver is nil")
	}
	if _, err := newConfig(opts); err != nil {
		return nil, err
	}
	return &wrappedDriver{inner: d, opts: opts}, nil
}

// wrappedDriver is the Driver decorator. Registered through Register it has
// no retrier: each connector it opens gets one. Returned by a connector's
// Driver method it carries that connector's retrier, which is how RunInTx
// and StatsOf find the policy of a *sql.DB.
type wrappedDriver struct {
	inner driver.Driver
	opts  []Option
	r     *retrier
}

func (d *wrappedDriver) Open(dsn string) (driver.Conn, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return c.Connect(context.Background())
}

// OpenConnector always exists on the decorator, so database/sql keeps one
// connector (and so one breaker and budget) per *sql.DB.
func (d *wrappedDriver) OpenConnector(dsn string) (driver.Connector, error) {
	var ic driver.Connector
	if dc, ok := d.inner.(driver.DriverContext); ok {
		var err error
		if ic, err = dc.OpenConnector(dsn); err != nil {
			return nil, err
		}
	} else {
		ic = dsnConnector{dsn: dsn, d: d.inner}
	}
	cfg, err := newConfig(d.opts)
	if err != nil {
		return nil, err
	}
	// go-sql-driver/mysql takes server variables from the DSN: with
	// autocommit off every statement is inside a transaction.
	implicitTx := strings.Contains(strings.ToLower(dsn), "autocommit")
	return newConnector(ic, cfg, implicitTx), nil
}

// dsnConnector is database/sql's adapter for drivers without DriverContext.
type dsnConnector struct {
	dsn string
	d   driver.Driver
}

func (c dsnConnector) Connect(context.Context) (driver.Conn, error) { return c.d.Open(c.dsn) }
func (c dsnConnector) Driver() driver.Driver                        { return c.d }

// failingConnector stands in for a connector that could not be built.
type failingConnector struct{ err error }

func (c failingConnector) Connect(context.Context) (driver.Conn, error) { return nil, c.err }
func (c failingConnector) Driver() driver.Driver                        { return failingDriver(c) }

type failingDriver struct{ err error }

func (d failingDriver) Open(string) (driver.Conn, error) { return nil, d.err }

// detectDialect recognises the drivers by their package.
func detectDialect(d driver.Driver) Dialect {
	t := reflect.TypeOf(d)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil {
		return DialectUnknown
	}
	switch p := t.PkgPath(); {
	case strings.Contains(p, "jackc/pgx"), strings.Contains(p, "lib/pq"):
		return DialectPostgres
	case strings.Contains(p, "go-sql-driver/mysql"):
		return DialectMySQL
	}
	return DialectUnknown
}

// connector is the Connector decorator: it paces re-dials with backoff,
// bounds the dials in flight, and keeps the breaker and the budget.
type connector struct {
	inner  driver.Connector
	r      *retrier
	driver *wrappedDriver
}

func newConnector(ic driver.Connector, cfg config, implicitTx bool) *connector {
	dialect := cfg.dialect
	if !cfg.dialectSet {
		dialect = detectDialect(ic.Driver())
	}
	r := newRetrier(cfg, ic, dialect)
	r.implicitTx = implicitTx && dialect == DialectMySQL
	return &connector{inner: ic, r: r, driver: &wrappedDriver{inner: ic.Driver(), r: r}}
}

func (c *connector) Driver() driver.Driver { return c.driver }

// Close is here because database/sql asserts io.Closer on the connector it
// holds; the assertion does not pass through a decorator by itself. It also
// stops the commit marker's clean-up (db.Close calls it).
func (c *connector) Close() error {
	c.r.resolution.close()
	if cl, ok := c.inner.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// Connect dials with retries: dial failures are safe to retry (nothing was
// sent), paced by backoff, bounded by the dial limiter, the breaker, the
// budget and the caller's deadline.
func (c *connector) Connect(ctx context.Context) (driver.Conn, error) {
	if o := c.r.operations(); o != nil {
		return observed(ctx, o, Operation{Op: "dial", Dialect: c.r.dialect}, c.connect)
	}
	return c.connect(ctx)
}

func (c *connector) connect(ctx context.Context) (driver.Conn, error) {
	r := c.r
	if r.shadow.Load() {
		return c.shadowConnect(ctx)
	}
	p := newPacer(r.backoff(), r.clock, r.rnd)
	var last error
	paced := 0 // failed attempts after which the open breaker, not backoff, paced the next
	for attempt := 1; ; attempt++ {
		t, err := r.admit(ctx)
		if err != nil {
			return nil, r.refuse(ctx, "dial", attempt-1, Unavailable, ErrCircuitOpen, last)
		}
		if err := r.dials.acquire(ctx); err != nil {
			r.breaker.done(t, outcomeNeutral)
			return nil, r.stop(ctx, "dial", attempt, err, last, "caller's context is done")
		}
		opens := r.breaker.openCount() // before the dial: an opening during it makes the connection stale
		ic, err, ownTimeout := attemptWithTimeout(ctx, r.cfg, c.inner.Connect)
		r.dials.release()
		if err == nil {
			r.succeeded(t)
			r.counters.dials.Add(1)
			nc := newConn(ic, r)
			nc.opens = opens
			return nc, nil
		}
		prev := last
		last = err
		r.counters.dialFailures.Add(1)
		if ctx.Err() != nil || atDeadline(ctx) {
			r.breaker.done(t, outcomeNeutral)
			return nil, r.stop(ctx, "dial", attempt, err, prev, "caller's context is done")
		}
		// By code alone: a refusal at connect time ("too many
		// connections", "starting up", out of memory) is unavailability,
		// where the same code answered for a statement is not.
		cls := classifyDial(r.cfg.rules, err)
		if ownTimeout {
			cls = ConnectionLost
		}
		if cls == Permanent || cls == Ambiguous { // bad password, unknown database, TLS
			r.breaker.done(t, outcomeNeutral)
			return nil, r.giveUp(ctx, "dial", attempt, cls, err, "not retryable")
		}
		r.breaker.done(t, outcomeDialFailure)
		if wrongRoleAnswer(err) || recoveringAnswer(err) {
			// A host answered, only not writable yet (an election) or
			// not yet taking connections (crash recovery): probe again
			// soon, not in a whole OpenTimeout or ProbeInterval.
			r.breaker.reprobeSoon()
		}
		if !r.budget.withdraw() {
			return nil, r.refuse(ctx, "dial", attempt, cls, ErrBudgetExhausted, err)
		}
		if r.breaker != nil && BreakerState(r.breaker.state.Load()) == BreakerOpen {
			// The breaker paces the next dial (its probe interval): no
			// backoff on top, which after a failed probe kept this caller
			// away past the next probes, and no attempt counted against
			// MaxAttempts (a long outage is many probes); MaxElapsed and
			// the caller's deadline still hold (admit checks the deadline).
			paced++
			if r.clock.Now().Sub(p.start) > r.cfg.backoff.MaxElapsed {
				return nil, r.paceStop(ctx, "dial", attempt, cls, err, stopMaxElapsed)
			}
			r.counters.retriesConnection.Add(1)
			r.observe(ctx, Event{Kind: EventRetry, Op: "dial", Attempt: attempt, Class: cls, Err: err, Reason: "dial failed; nothing was sent; the breaker is open"})
			continue
		}
		d, stop := p.next(ctx, attempt-paced)
		if stop != "" {
			return nil, r.paceStop(ctx, "dial", attempt, cls, err, stop)
		}
		r.counters.retriesConnection.Add(1)
		r.observe(ctx, Event{Kind: EventRetry, Op: "dial", Attempt: attempt, Class: cls, Err: err, Delay: d, Reason: "dial failed; nothing was sent"})
		if serr := r.clock.Sleep(ctx, d); serr != nil {
			return nil, r.stop(ctx, "dial", attempt, err, nil, "caller's context is done")
		}
	}
}

// atDeadline reports a context whose deadline has passed, even if its
// timer has not yet marked it done: pgx's dial gives up at the deadline
// ("i/o timeout") a little before ctx.Err() says so, and a burst of calls
// with tiny deadlines counted as a dead server and opened the breaker.
func atDeadline(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

// retrierOf finds the retrier of a *sql.DB opened through sqlretry.
func retrierOf(db *sql.DB) *retrier {
	if db == nil {
		return nil
	}
	if wd, ok := db.Driver().(*wrappedDriver); ok {
		return wd.r
	}
	return nil
}
