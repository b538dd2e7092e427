package sqlretry

import (
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
)

// Sentinels a caller can test with errors.Is.
var (
	// ErrCircuitOpen means the breaker of the wrapped connector is open: the
	// call failed fast without touching the database.
	ErrCircuitOpen = errors.New("sqlretry: circuit breaker is open")
	// ErrBudgetExhausted means more retries were refused to protect the
	// database: retries may be at most a share of recent successful work.
	ErrBudgetExhausted = errors.New("sqlretry: retry budget exhausted")
	// ErrAmbiguousCommit means a COMMIT (or an autocommit write) may or may
	// not have taken effect and sqlretry could not find out which.
	ErrAmbiguousCommit = errors.New("sqlretry: outcome of the commit is unknown")
)

// Error is returned when sqlretry retried and then stopped, or refused to
// run a call. It unwraps to Reason (one of the sentinels, if any) and to the
// last error of the database driver, so errors.As(err, &pgErr) still works.
type Error struct {
	Op       string // "exec", "query", "stmt.exec", "stmt.query", "begin", "dial", "commit", "tx"
	Attempts int    // attempts made, including the first
	Class    Class  // class of the last error
	Reason   error  // ErrCircuitOpen, ErrBudgetExhausted, ErrAmbiguousCommit, or nil
	Err      error  // the last error from the driver or the closure
}

// Error says what was given up on, after how many attempts, why, and the
// last error.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("sqlretry: ")
	b.WriteString(e.Op)
	switch {
	case errors.Is(e.Reason, ErrAmbiguousCommit):
		b.WriteString(": outcome unknown")
	case e.Reason != nil:
		b.WriteString(": ")
		b.WriteString(strings.TrimPrefix(e.Reason.Error(), "sqlretry: "))
	default:
		b.WriteString(": gave up")
	}
	if e.Attempts > 0 {
		fmt.Fprintf(&b, " after %d attempt", e.Attempts)
		if e.Attempts > 1 {
			b.WriteByte('s')
		}
	}
	if e.Err != nil {
		fmt.Fprintf(&b, " (%s): %v", e.Class, e.Err)
	}
	return b.String()
}

// newError builds every *Error sqlretry returns. The driver's error is
// kept from matching driver.ErrBadConn: database/sql re-runs any call whose
// error does, and an *Error means sqlretry decided the call must stop.
func newError(op string, attempts int, cls Class, reason, err error) *Error {
	return &Error{Op: op, Attempts: attempts, Class: cls, Reason: reason, Err: withoutBadConn(err)}
}

// Unwrap exposes both the reason and the driver's error to errors.Is/As.
func (e *Error) Unwrap() []error {
	switch {
	case e.Reason == nil:
		return []error{e.Err}
	case e.Err == nil:
		return []error{e.Reason}
	}
	return []error{e.Reason, e.Err}
}

// errConnUnusable stands in for driver.ErrBadConn in an error that is given
// to the caller: database/sql re-runs every call whose error matches
// driver.ErrBadConn, and a refusal (open breaker, spent budget) must stop it.
var errConnUnusable = errors.New("sqlretry: connection unusable (driver: bad connection)")

// handOffError tells database/sql to re-run the call on another connection
// (it matches driver.ErrBadConn) while saying what happened: the caller
// sees it when database/sql cannot re-run the call (a pinned *sql.Conn, a
// prepared statement of one) or has used up its own re-runs. database/sql
// discards the connection either way.
type handOffError struct {
	cause error
	why   string // what happened, in the caller's words
}

func (e *handOffError) Error() string {
	why := e.why
	if why == "" {
		why = "the connection is unusable"
	}
	cause := e.cause
	if ro, ok := cause.(*readOnlyError); ok {
		cause = ro.err // why says it already
	}
	return "sqlretry: " + why + "; the connection is discarded and the call was handed back to database/sql " +
		"to run on another connection (a pinned *sql.Conn cannot move to another connection): " + cause.Error()
}
func (e *handOffError) Is(target error) bool { return target == driver.ErrBadConn }
func (e *handOffError) Unwrap() error        { return e.cause }

// handOff returns the error that makes database/sql re-run a call.
func handOff(cause error) error { return handOffWith(cause, "") }

// handOffWith is handOff with what happened (handOffReason).
func handOffWith(cause error, why string) error {
	return &handOffError{cause: cause, why: why}
}

// handOffReason says why a statement is handed off, for the caller.
func handOffReason(cls Class, err error, standby bool) string {
	switch {
	case standby:
		return "the server is read-only (a standby or a demoted primary)"
	case cls == ConnectionLost:
		return "the connection was lost (the server closed it or the network failed) before the statement finished; it is safe to run again"
	case errors.Is(err, driver.ErrBadConn):
		return "the driver found the connection unusable before sending anything"
	}
	return "the server refused the statement before running it"
}

// connAlreadyLostError is returned for a call on a connection that had
// already been lost: the driver refused it before sending anything. It
// does not match driver.ErrBadConn, so that database/sql's own re-runs do
// not replace it with "sql: connection is already closed"; the connection
// is discarded all the same (sqlretry's IsValid and ResetSession say so).
// Only a pinned *sql.Conn (or a statement prepared on one) gets here: the
// pool never hands out a connection sqlretry saw break.
type connAlreadyLostError struct{ cause error }

func (e *connAlreadyLostError) Error() string {
	return "sqlretry: the connection had already been lost (the server closed it or the network failed); " +
		"nothing was sent, and a pinned *sql.Conn cannot move to another connection: " + e.cause.Error()
}
func (e *connAlreadyLostError) Unwrap() error { return withoutBadConn(e.cause) }

// withoutBadConn keeps an error from matching driver.ErrBadConn.
func withoutBadConn(err error) error {
	if errors.Is(err, driver.ErrBadConn) {
		var h *handOffError
		if errors.As(err, &h) && !errors.Is(h.cause, driver.ErrBadConn) {
			return h.cause
		}
		return errConnUnusable
	}
	return err
}

// poisonedError is returned by every statement and by COMMIT of a
// transaction after a statement in it failed with a retryable error that the
// caller may have swallowed.
type poisonedError struct{ cause error }

func (e *poisonedError) Error() string {
	return "sqlretry: transaction aborted by an earlier error: " + e.cause.Error()
}
func (e *poisonedError) Unwrap() error { return e.cause }

// isPassThrough reports errors that database/sql compares by identity.
func isPassThrough(err error) bool {
	return err == driver.ErrSkip || err == driver.ErrRemoveArgument
}
