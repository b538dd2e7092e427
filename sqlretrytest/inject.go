package sqlretrytest

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/sqlretry/sqlretry"
)

// Compile-time checks: the wrapped connection offers every optional
// interface sqlretry and database/sql look for, and falls back to what
// database/sql would do when the driver's connection lacks one.
var (
	_ driver.Connector          = (*Injector)(nil)
	_ io.Closer                 = (*Injector)(nil)
	_ driver.Conn               = (*conn)(nil)
	_ driver.ConnBeginTx        = (*conn)(nil)
	_ driver.ConnPrepareContext = (*conn)(nil)
	_ driver.ExecerContext      = (*conn)(nil)
	_ driver.QueryerContext     = (*conn)(nil)
	_ driver.Pinger             = (*conn)(nil)
	_ driver.SessionResetter    = (*conn)(nil)
	_ driver.Validator          = (*conn)(nil)
	_ driver.NamedValueChecker  = (*conn)(nil)
	_ sqlretry.Unwrapper        = (*conn)(nil)
	_ driver.StmtExecContext    = (*stmt)(nil)
	_ driver.StmtQueryContext   = (*stmt)(nil)
	_ driver.NamedValueChecker  = (*stmt)(nil)
)

// Statement is what a Rule sees of a statement or a COMMIT about to be
// sent. Only the application's own calls count: the queries sqlretry runs itself (the transaction id it
// asks for before COMMIT, the commit marker, the resolution of a lost
// COMMIT) are neither counted nor failed. BEGIN and ROLLBACK are not
// counted either.
type Statement struct {
	Seq    int    // the application's statements and COMMITs so far through the Injector, this one included, from 1
	Tx     int    // the transaction it belongs to, from 1 in the order of BEGIN; 0 in autocommit
	InTx   int    // its place in that transaction, from 1 (a COMMIT comes after the last statement); 0 in autocommit
	Query  string // its text; "COMMIT" for a commit
	Commit bool   // a COMMIT
}

// Rule chooses the fault a statement meets; NoFault lets it run. It is
// called with the Injector's lock held, one statement at a time.
type Rule func(Statement) Fault

// FailNth makes the nth statement (counting COMMITs, from 1) meet f, and
// every other run.
func FailNth(n int, f Fault) Rule {
	return func(s Statement) Fault {
		if s.Seq == n {
			return f
		}
		return NoFault
	}
}

// FailInTx makes the statement at place pos (from 1; the COMMIT comes
// after the last statement) of the txth transaction meet f.
func FailInTx(tx, pos int, f Fault) Rule {
	return func(s Statement) Fault {
		if s.Tx == tx && s.InTx == pos {
			return f
		}
		return NoFault
	}
}

// FailRandom makes a share (0 to 1) of the statements meet one of faults,
// chosen at random from a generator seeded with seed, so that a failing
// run can be repeated. With no faults it picks among SerializationFailure,
// Deadlock and ConnectionLost, and CommitReplyLost at a COMMIT.
func FailRandom(share float64, seed uint64, faults ...Fault) Rule {
	rnd := rand.New(rand.NewPCG(seed, seed^0x5eed))
	return func(s Statement) Fault {
		if rnd.Float64() >= share {
			return NoFault
		}
		fs := faults
		if len(fs) == 0 {
			fs = []Fault{SerializationFailure, Deadlock, ConnectionLost}
			if s.Commit {
				fs = append(fs, CommitReplyLost)
			}
		}
		return fs[rnd.IntN(len(fs))]
	}
}

// Injected is one fault the Injector made a statement meet.
type Injected struct {
	Statement Statement // the statement or COMMIT that met it
	Fault     Fault     // the fault
	Err       error     // the error the driver call returned
}

// Injector is a driver.Connector for tests that wraps a real one (the
// test database's) and makes the statements its Rule picks fail as the
// engine's driver would make them fail. Put it under sqlretry:
//
//	inj := sqlretrytest.NewInjector(connector, sqlretrytest.FailNth(2, sqlretrytest.Deadlock))
//	db := sqlretry.OpenDB(inj)
//
// The errors have the shapes of the driver in use (see Err), so sqlretry
// classifies them as the real ones. Faults act on the real connection as
// the real failure would: a lost connection closes it (the server rolls
// back an open transaction), a lost COMMIT reply commits first.
type Injector struct {
	inner   driver.Connector
	dialect sqlretry.Dialect

	mu       sync.Mutex
	rule     Rule
	errFunc  func(Fault) error
	seq      int
	txs      int
	injected []Injected
}

// NewInjector wraps c with rule (nil: no faults until SetRule). The
// engine is told by c's driver, as sqlretry tells it; SetDialect
// overrides it.
func NewInjector(c driver.Connector, rule Rule) *Injector {
	return &Injector{inner: c, rule: rule, dialect: dialectOf(c.Driver())}
}

// dialectOf recognises the drivers by their package, as sqlretry does.
func dialectOf(d driver.Driver) sqlretry.Dialect {
	t := reflect.TypeOf(d)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil {
		return sqlretry.DialectUnknown
	}
	switch p := t.PkgPath(); {
	case strings.Contains(p, "jackc/pgx"), strings.Contains(p, "lib/pq"):
		return sqlretry.DialectPostgres
	case strings.Contains(p, "go-sql-driver/mysql"):
		return sqlretry.DialectMySQL
	}
	return sqlretry.DialectUnknown
}

// Dialect is the engine whose errors the Injector makes.
func (i *Injector) Dialect() sqlretry.Dialect {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.dialect
}

// SetDialect chooses the engine whose errors the Injector makes.
func (i *Injector) SetDialect(d sqlretry.Dialect) {
	i.mu.Lock()
	i.dialect = d
	i.mu.Unlock()
}

// SetErrorFunc makes the Injector return errFunc's error for a fault
// instead of Err's (nil: Err's again). Err's errors have the drivers'
// shapes but not their types: an application that matches
// *pgconn.PgError or *mysql.MySQLError with errors.As can return the
// driver's own type here, e.g. &pgconn.PgError{Severity: "ERROR",
// Code: "40P01"} for Deadlock. What it returns is what sqlretry
// classifies.
func (i *Injector) SetErrorFunc(errFunc func(Fault) error) {
	i.mu.Lock()
	i.errFunc = errFunc
	i.mu.Unlock()
}

// SetRule replaces the rule; nil stops injecting.
func (i *Injector) SetRule(r Rule) {
	i.mu.Lock()
	i.rule = r
	i.mu.Unlock()
}

// Injected returns the faults made so far, in order.
func (i *Injector) Injected() []Injected {
	i.mu.Lock()
	defer i.mu.Unlock()
	return append([]Injected(nil), i.injected...)
}

// Statements returns how many statements and COMMITs of the application
// went through the Injector.
func (i *Injector) Statements() int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.seq
}

// Connect opens a connection of the wrapped connector.
func (i *Injector) Connect(ctx context.Context) (driver.Conn, error) {
	c, err := i.inner.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &conn{inj: i, inner: c}, nil
}

// Driver returns the wrapped connector's driver, so that sqlretry detects
// the engine from it as it would without the Injector.
func (i *Injector) Driver() driver.Driver { return i.inner.Driver() }

// Close closes the wrapped connector if it is an io.Closer (sql.DB.Close
// calls it).
func (i *Injector) Close() error {
	if c, ok := i.inner.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// fromApplication reports a statement of the application's, not one of
// the queries sqlretry runs itself on a driver connection (the transaction
// id before COMMIT, the commit marker, the resolution of a lost COMMIT,
// the read-only check), which all go through three functions of its
// (sqlretryOwnQueries). The stack is read because a COMMIT or a query of
// sqlretry's may run inside database/sql's call, or on a goroutine of its
// own (a MySQL COMMIT under a deadline).
func fromApplication() bool {
	var pcs [64]uintptr
	n := runtime.Callers(3, pcs[:])
	frames := runtime.CallersFrames(pcs[:n])
	for {
		f, more := frames.Next()
		if fn, ok := strings.CutPrefix(f.Function, "github.com/sqlretry/sqlretry."); ok {
			for _, own := range sqlretryOwnQueries {
				if fn == own || strings.HasPrefix(fn, own+".") {
					return false
				}
			}
		}
		if !more {
			return true
		}
	}
}

// sqlretryOwnQueries are the functions through which sqlretry runs its own
// queries on a driver connection (resolve.go), and the short lock wait's
// statement in a replay's transaction (shortwait.go).
var sqlretryOwnQueries = [...]string{"queryRow", "queryRows", "execConn", "(*shortWait).set"}

type conn struct {
	inj     *Injector
	inner   driver.Conn
	broken  atomic.Bool // a fault closed the driver's connection
	tx      int         // the open transaction's number, 0 in autocommit
	pos     int         // statements of the open transaction so far
	skipped string      // the statement last answered with ErrSkip, to be run prepared
}

// decision is the fault a statement meets and the error it gets.
type decision struct {
	fault Fault
	err   error
}

// decide numbers an application statement and asks the rule; counted is
// false for sqlretry's own queries. A statement the driver answered with
// ErrSkip (database/sql then prepares it and runs the prepared statement)
// was numbered already: the prepared statement's run is not numbered
// again.
func (c *conn) decide(query string, commit bool) (d decision, counted bool) {
	if c.skipped != "" {
		skipped := c.skipped
		c.skipped = ""
		if skipped == query && !commit {
			return decision{}, false
		}
	}
	if !commit && !fromApplication() {
		return decision{}, false // a COMMIT is the application's, whoever sends it
	}
	i := c.inj
	i.mu.Lock()
	defer i.mu.Unlock()
	i.seq++
	s := Statement{Seq: i.seq, Tx: c.tx, Query: query, Commit: commit}
	if c.tx != 0 {
		c.pos++
		s.InTx = c.pos
	}
	f := NoFault
	if i.rule != nil {
		f = i.rule(s)
	}
	if f == CommitReplyLost && !commit {
		f = ConnectionLost
	}
	if f == NoFault {
		return decision{}, true
	}
	err := Err(i.dialect, f)
	if i.errFunc != nil {
		err = i.errFunc(f)
	}
	i.injected = append(i.injected, Injected{Statement: s, Fault: f, Err: err})
	return decision{fault: f, err: err}, true
}

// breakConn closes the driver's connection as a network cut would: the
// server ends the session and rolls back what was open.
func (c *conn) breakConn() {
	if c.broken.CompareAndSwap(false, true) {
		c.inner.Close()
	}
}

func (c *conn) Unwrap() driver.Conn { return c.inner }

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if c.broken.Load() {
		return nil, driver.ErrBadConn
	}
	s, err := c.prepareInner(ctx, query)
	if err != nil {
		return nil, err
	}
	return &stmt{c: c, inner: s, query: query}, nil
}

func (c *conn) prepareInner(ctx context.Context, query string) (driver.Stmt, error) {
	if pc, ok := c.inner.(driver.ConnPrepareContext); ok {
		return pc.PrepareContext(ctx, query)
	}
	return c.inner.Prepare(query)
}

func (c *conn) Close() error {
	if c.broken.Load() {
		return nil
	}
	return c.inner.Close()
}

func (c *conn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if c.broken.Load() {
		return nil, driver.ErrBadConn
	}
	var (
		t   driver.Tx
		err error
	)
	if bt, ok := c.inner.(driver.ConnBeginTx); ok {
		t, err = bt.BeginTx(ctx, opts)
	} else {
		if opts.Isolation != 0 || opts.ReadOnly {
			return nil, errors.New("sqlretrytest: the driver supports neither isolation levels nor read-only transactions")
		}
		//lint:ignore SA1019 the driver has nothing else
		t, err = c.inner.Begin()
	}
	if err != nil {
		return nil, err
	}
	c.inj.mu.Lock()
	c.inj.txs++
	c.tx, c.pos = c.inj.txs, 0
	c.inj.mu.Unlock()
	return &tx{c: c, inner: t}, nil
}

func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.broken.Load() {
		return nil, driver.ErrBadConn
	}
	ec, ok := c.inner.(driver.ExecerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	if c.tx != 0 && isMarkerCommit(query) {
		return c.commitWithMarker(ctx, ec, query, args)
	}
	d, counted := c.decide(query, false)
	switch d.fault {
	case SerializationFailure, Deadlock:
		return nil, d.err
	case ConnectionLost:
		_, _ = c.execAnyway(ctx, ec, query, args)
		c.breakConn()
		return nil, d.err
	}
	res, err := ec.ExecContext(ctx, query, args)
	if err == driver.ErrSkip && counted {
		c.skipped = query
	}
	return res, err
}

// isMarkerCommit reports the statement in which sqlretry sends the
// application's COMMIT on MariaDB, with its commit marker: an anonymous
// block that inserts the marker and commits, run under SET STATEMENT ...
// FOR (free of the session's limits) where the server takes it.
func isMarkerCommit(query string) bool {
	if strings.HasPrefix(query, "SET STATEMENT ") {
		const block = " FOR BEGIN NOT ATOMIC INSERT INTO "
		i := strings.Index(query, block)
		if i < 0 {
			return false
		}
		query = query[i+len(" FOR "):]
	}
	return strings.HasPrefix(query, "BEGIN NOT ATOMIC INSERT INTO ") && strings.HasSuffix(query, "; COMMIT; END")
}

// commitWithMarker is Commit for the COMMIT that travels in sqlretry's
// marker block: the same point and the same faults.
func (c *conn) commitWithMarker(ctx context.Context, ec driver.ExecerContext, query string, args []driver.NamedValue) (driver.Result, error) {
	d, _ := c.decide("COMMIT", true)
	c.tx = 0
	switch d.fault {
	case SerializationFailure, Deadlock:
		_, _ = ec.ExecContext(ctx, "ROLLBACK", nil)
		return nil, d.err
	case ConnectionLost:
		c.breakConn()
		return nil, d.err
	case CommitReplyLost:
		if _, err := ec.ExecContext(ctx, query, args); err != nil {
			return nil, err
		}
		c.breakConn()
		return nil, d.err
	}
	return ec.ExecContext(ctx, query, args)
}

// execAnyway runs a statement that is to lose its reply, through a
// prepared statement when the driver answers ErrSkip (go-sql-driver/mysql
// does for arguments without interpolateParams), as database/sql would.
func (c *conn) execAnyway(ctx context.Context, ec driver.ExecerContext, query string, args []driver.NamedValue) (driver.Result, error) {
	res, err := ec.ExecContext(ctx, query, args)
	if err != driver.ErrSkip {
		return res, err
	}
	s, err := c.prepareInner(ctx, query)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return (&stmt{inner: s}).exec(ctx, args)
}

func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if c.broken.Load() {
		return nil, driver.ErrBadConn
	}
	qc, ok := c.inner.(driver.QueryerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	d, counted := c.decide(query, false)
	switch d.fault {
	case SerializationFailure, Deadlock:
		return nil, d.err
	case ConnectionLost:
		rows, err := qc.QueryContext(ctx, query, args)
		if err == driver.ErrSkip {
			var s driver.Stmt
			if s, err = c.prepareInner(ctx, query); err == nil {
				defer s.Close()
				rows, err = (&stmt{inner: s}).runQuery(ctx, args)
			}
		}
		if err == nil {
			rows.Close()
		}
		c.breakConn()
		return nil, d.err
	}
	rows, err := qc.QueryContext(ctx, query, args)
	if err == driver.ErrSkip && counted {
		c.skipped = query
	}
	return rows, err
}

func (c *conn) Ping(ctx context.Context) error {
	if c.broken.Load() {
		return driver.ErrBadConn
	}
	if p, ok := c.inner.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

func (c *conn) ResetSession(ctx context.Context) error {
	if c.broken.Load() {
		return driver.ErrBadConn
	}
	if r, ok := c.inner.(driver.SessionResetter); ok {
		return r.ResetSession(ctx)
	}
	return nil
}

func (c *conn) IsValid() bool {
	if c.broken.Load() {
		return false
	}
	if v, ok := c.inner.(driver.Validator); ok {
		return v.IsValid()
	}
	return true
}

func (c *conn) CheckNamedValue(nv *driver.NamedValue) error {
	if n, ok := c.inner.(driver.NamedValueChecker); ok {
		return n.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

type tx struct {
	c     *conn
	inner driver.Tx
}

func (t *tx) Commit() error {
	c := t.c
	if c.broken.Load() {
		return driver.ErrBadConn
	}
	d, _ := c.decide("COMMIT", true)
	f, ferr := d.fault, d.err
	c.tx = 0
	switch f {
	case SerializationFailure, Deadlock:
		// The server refuses the COMMIT and rolls the transaction back,
		// as PostgreSQL does when a SERIALIZABLE transaction fails its
		// check at COMMIT.
		_ = t.inner.Rollback()
		return ferr
	case ConnectionLost:
		// The connection broke before COMMIT reached the server.
		c.breakConn()
		return ferr
	case CommitReplyLost:
		if err := t.inner.Commit(); err != nil {
			return err
		}
		c.breakConn()
		return ferr
	}
	return t.inner.Commit()
}

func (t *tx) Rollback() error {
	t.c.tx = 0
	if t.c.broken.Load() {
		return driver.ErrBadConn
	}
	return t.inner.Rollback()
}

type stmt struct {
	c     *conn
	inner driver.Stmt
	query string
}

func (s *stmt) Close() error {
	if s.c.broken.Load() {
		return nil
	}
	return s.inner.Close()
}

func (s *stmt) NumInput() int { return s.inner.NumInput() }

func (s *stmt) Exec(args []driver.Value) (driver.Result, error) {
	return s.ExecContext(context.Background(), named(args))
}

func (s *stmt) Query(args []driver.Value) (driver.Rows, error) {
	return s.QueryContext(context.Background(), named(args))
}

func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	return faultedStmt(s, func() (driver.Result, error) { return s.exec(ctx, args) }, func(driver.Result) {})
}

// faultedStmt runs a prepared statement's execution (run) unless the rule
// fails it: a serialization failure or deadlock before it runs, or a lost
// connection after it ran (its result dropped by discard).
func faultedStmt[T any](s *stmt, run func() (T, error), discard func(T)) (T, error) {
	var zero T
	if s.c.broken.Load() {
		return zero, driver.ErrBadConn
	}
	d, _ := s.c.decide(s.query, false)
	switch d.fault {
	case SerializationFailure, Deadlock:
		return zero, d.err
	case ConnectionLost:
		if v, err := run(); err == nil {
			discard(v)
		}
		s.c.breakConn()
		return zero, d.err
	}
	return run()
}

func (s *stmt) exec(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if se, ok := s.inner.(driver.StmtExecContext); ok {
		return se.ExecContext(ctx, args)
	}
	vals, err := values(args)
	if err != nil {
		return nil, err
	}
	//lint:ignore SA1019 the driver has nothing else
	return s.inner.Exec(vals)
}

func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	return faultedStmt(s, func() (driver.Rows, error) { return s.runQuery(ctx, args) }, func(r driver.Rows) { r.Close() })
}

func (s *stmt) runQuery(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if sq, ok := s.inner.(driver.StmtQueryContext); ok {
		return sq.QueryContext(ctx, args)
	}
	vals, err := values(args)
	if err != nil {
		return nil, err
	}
	//lint:ignore SA1019 the driver has nothing else
	return s.inner.Query(vals)
}

// CheckNamedValue keeps database/sql's order: the statement's checker,
// then the connection's.
func (s *stmt) CheckNamedValue(nv *driver.NamedValue) error {
	if n, ok := s.inner.(driver.NamedValueChecker); ok {
		return n.CheckNamedValue(nv)
	}
	return s.c.CheckNamedValue(nv)
}

func named(args []driver.Value) []driver.NamedValue {
	nv := make([]driver.NamedValue, len(args))
	for i, a := range args {
		nv[i] = driver.NamedValue{Ordinal: i + 1, Value: a}
	}
	return nv
}

func values(args []driver.NamedValue) ([]driver.Value, error) {
	v := make([]driver.Value, len(args))
	for i, a := range args {
		if a.Name != "" {
			return nil, errors.New("sqlretrytest: the driver does not support named arguments")
		}
		v[i] = a.Value
	}
	return v, nil
}
