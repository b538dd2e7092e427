package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
)

// Read-only answers (issue 9, item 5). PostgreSQL's 25006 and MySQL's
// 1792/1290/1836 mean one of two things that the code cannot tell apart:
//
//   - the user asked for it (a read-only transaction, SET
//     default_transaction_read_only / SET SESSION TRANSACTION READ ONLY, a
//     role or database setting): a permanent error of the statement, never
//     to be bypassed by running the write on another connection;
//   - the server is read-only (a standby, a demoted or fenced primary): the
//     connection points at the wrong server, so it is discarded and the
//     work goes elsewhere.
//
// The classifiers call every read-only answer Permanent. sqlretry then asks
// the server on the same connection (one round trip, on the error path
// only) and marks the answer as a standby's (readOnlyError), which is
// Unavailable, only when the server itself is read-only and the session is
// not. A
// PostgreSQL transaction that got 25006 is aborted and answers nothing
// until it is rolled back, so there the question waits for the rollback.

// readOnlyError is a read-only answer that sqlretry asked the server
// about. standby is the verdict: the server itself is read-only. It is an
// atomic that may be set after the error was handed on (a PostgreSQL
// transaction is judged after its rollback, which database/sql may run
// from its own goroutine): RunInTx reads it when it classifies.
type readOnlyError struct {
	err     error
	standby atomic.Bool
}

func newStandbyError(err error) *readOnlyError {
	e := &readOnlyError{err: err}
	e.standby.Store(true)
	return e
}

func (e *readOnlyError) Error() string {
	if e.standby.Load() {
		return e.err.Error() + " (sqlretry: the server is read-only: a standby or a demoted primary)"
	}
	return e.err.Error()
}
func (e *readOnlyError) Unwrap() error { return e.err }

// isStandby reports a read-only answer judged to come from a read-only server.
func isStandby(err error) bool {
	var ro *readOnlyError
	return errors.As(err, &ro) && ro.standby.Load()
}

// isReadOnlyAnswer reports a server's refusal of a write as read-only.
func isReadOnlyAnswer(err error) bool {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return pg.SQLState() == "25006"
	}
	n, msg, ok := mysqlErrorOf(err)
	return ok && mysqlReadOnlyAnswer(n, msg)
}

// pgReadOnlyQuery answers (server read-only, session read-only by the
// user's choice). A standby is in recovery; a fenced primary has
// default_transaction_read_only on from its configuration (ALTER SYSTEM or
// the file). The user's own choice shows as a source other than the server's
// configuration: session (SET), client (the DSN), user or database (ALTER
// ROLE / ALTER DATABASE ... SET). The view is named with its schema: it
// runs on the user's session, where a temporary table named pg_settings
// comes first in the search path (attack17: one that said "configuration
// file" made sqlretry take a session the user made read-only for a fenced
// primary, and run the write elsewhere).
const pgReadOnlyQuery = `SELECT pg_is_in_recovery() OR (setting = 'on' AND source IN ('configuration file', 'command line', 'environment variable')),
	setting = 'on' AND source NOT IN ('default', 'configuration file', 'command line', 'environment variable', 'override')
	FROM pg_catalog.pg_settings WHERE name = 'default_transaction_read_only'`

// mysqlReadOnlyQuery works on MySQL and MariaDB alike: SHOW VARIABLES
// leaves out the variables a server lacks (MariaDB 10.11 has no
// super_read_only and names transaction_read_only tx_read_only), where
// SELECT @@name would fail. super_read_only implies read_only.
const mysqlReadOnlyQuery = "SHOW VARIABLES WHERE Variable_name IN ('read_only', 'super_read_only', 'innodb_read_only', 'tx_read_only', 'transaction_read_only')"

// serverReadOnly asks the server on dc whether it, rather than the user,
// made the session read-only. Any doubt (no answer, an unknown dialect)
// is false: the user's setting is never bypassed on a guess.
func serverReadOnly(ctx context.Context, dc driver.Conn, d Dialect) bool {
	switch d {
	case DialectPostgres:
		vals, err := queryRow(ctx, dc, pgReadOnlyQuery)
		return err == nil && len(vals) == 2 && asBool(vals[0]) && !asBool(vals[1])
	case DialectMySQL:
		server, user, err := mysqlReadOnly(ctx, dc)
		return err == nil && server && !user
	}
	return false
}

func mysqlReadOnly(ctx context.Context, dc driver.Conn) (server, user bool, err error) {
	var rows driver.Rows
	if q, ok := dc.(driver.QueryerContext); ok {
		rows, err = q.QueryContext(ctx, mysqlReadOnlyQuery, nil)
	} else {
		err = driver.ErrSkip
	}
	if err == driver.ErrSkip {
		var s driver.Stmt
		if s, err = prepare(ctx, dc, mysqlReadOnlyQuery); err != nil {
			return false, false, err
		}
		defer s.Close()
		sq, ok := s.(driver.StmtQueryContext)
		if !ok {
			return false, false, errors.New("sqlretry: driver statement lacks QueryContext")
		}
		rows, err = sq.QueryContext(ctx, nil)
	}
	if err != nil {
		return false, false, err
	}
	defer rows.Close()
	vals := make([]driver.Value, len(rows.Columns()))
	if len(vals) < 2 {
		return false, false, errors.New("sqlretry: unexpected answer to SHOW VARIABLES")
	}
	for {
		if err := rows.Next(vals); err != nil {
			if err == io.EOF {
				return server, user, nil
			}
			return false, false, err
		}
		on := asBool(vals[1])
		switch strings.ToLower(asString(vals[0])) {
		case "read_only", "super_read_only", "innodb_read_only":
			server = server || on
		case "tx_read_only", "transaction_read_only":
			user = user || on
		}
	}
}

func asString(v driver.Value) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	}
	return ""
}

func asBool(v driver.Value) bool {
	switch x := v.(type) {
	case bool:
		return x
	case int64:
		return x != 0
	case string, []byte:
		switch strings.ToLower(asString(x)) {
		case "1", "on", "t", "true", "yes":
			return true
		}
	}
	return false
}

// judgeReadOnly turns a read-only answer into a standbyError when the
// server says it is read-only, and marks the connection for discarding.
func (c *conn) judgeReadOnly(ctx context.Context, err error) (error, bool) {
	if ctx.Err() != nil || !serverReadOnly(ctx, c.inner, c.r.dialect) {
		return err, false
	}
	c.bad.Store(true)
	return newStandbyError(err), true
}

// judgeReadOnlyAfterRollback is the PostgreSQL half of tx.failed: the
// transaction that got 25006 has been rolled back on this connection, which
// can answer again. When the server is a standby the transaction's poison
// (a readOnlyError that RunInTx holds already) is marked so, and RunInTx
// replays it on another connection: this one is discarded. Otherwise it
// stays the user's permanent error.
func (t *tx) judgeReadOnlyAfterRollback() {
	var ro *readOnlyError
	if !errors.As(t.poison, &ro) {
		return
	}
	if _, standby := t.c.judgeReadOnly(t.ctx, ro.err); standby {
		ro.standby.Store(true)
	}
}

// noteLost remembers that the driver's connection is closed for good,
// after a lost connection: from then on its driver.ErrBadConn proves that
// nothing was sent. A driver with driver.Validator says so itself. pgx's
// stdlib has none, but pgconn closes the connection for good on any
// network error and on a FATAL answer (the server ended the session), and
// its stdlib then refuses every call before writing (IsClosed). A timeout
// is not taken as proof: how pgx ends a cancelled query is configurable.
func (c *conn) noteLost(err error) {
	if v, ok := c.inner.(driver.Validator); ok {
		c.lost = c.lost || !v.IsValid()
		return
	}
	if c.r.dialect != DialectPostgres {
		return
	}
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		// pgconn.PgError reads "SEVERITY: message (SQLSTATE code)".
		if e, ok := pg.(error); ok {
			msg := e.Error()
			c.lost = c.lost || strings.HasPrefix(msg, "FATAL: ") || strings.HasPrefix(msg, "PANIC: ")
		}
		return
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		c.lost = true
	}
}
