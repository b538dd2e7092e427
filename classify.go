package sqlretry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
)

// Class is what an error means for a retry decision; docs/errors.md is
// the catalogue the defaults follow.
type Class uint8

const (
	// Permanent errors are never retried: constraints, syntax, auth, ...
	Permanent Class = iota
	// RetryStatement: the server rolled back the statement (or nothing ran);
	// running it again is safe in autocommit. Inside a transaction on
	// PostgreSQL the transaction is aborted, so it becomes RetryTransaction.
	RetryStatement
	// RetryTransaction: the server aborted the whole transaction
	// (deadlock, serialization failure); replay it from the start.
	RetryTransaction
	// Unavailable: the server could not be reached or refused the work
	// before running it (dial failures, too many connections, read-only
	// after a failover). Counts for the breaker.
	Unavailable
	// ConnectionLost: the connection broke after the request may have been
	// sent. Safe to re-run only for reads and idempotent work; a lost COMMIT
	// must be resolved. Counts for the breaker.
	ConnectionLost
	// Ambiguous: the server itself says the outcome is unknown.
	Ambiguous
)

// String names the class as docs/errors.md does: "permanent",
// "retry-statement", ...
func (c Class) String() string {
	switch c {
	case Permanent:
		return "permanent"
	case RetryStatement:
		return "retry-statement"
	case RetryTransaction:
		return "retry-transaction"
	case Unavailable:
		return "unavailable"
	case ConnectionLost:
		return "connection-lost"
	case Ambiguous:
		return "ambiguous"
	}
	return "class(" + string(rune('0'+c)) + ")"
}

// Classifier is a user rule. It returns ok=false to leave the error to the
// next rule and finally to the defaults.
type Classifier func(err error) (class Class, ok bool)

// classify is the class of an error a statement (or BEGIN, COMMIT, a
// transaction) got: the user rules, then the defaults as they read in that
// phase (classifyAnswer).
func classify(rules []Classifier, err error) Class {
	for _, rule := range rules {
		if c, ok := rule(err); ok {
			return c
		}
	}
	return classifyAnswer(err)
}

// classifyDial is the class of an error the driver's Connect returned: the
// user rules, then the defaults by code alone. A refusal at connect time
// ("too many connections", "the database system is starting up") is
// unavailability: nothing was sent, and the breaker counts it.
//
// A multi-host DSN (pgx: host=a,b target_session_attrs=read-write) fails
// with one error per host, joined: each host is classified on its own, and
// the dial is unavailable when every host's failure is (down, starting up,
// timed out, or not the kind of server the DSN asks for, as while a
// cluster elects its leader); a host that refuses for good (a wrong
// password, an unknown database, TLS) makes it permanent.
func classifyDial(rules []Classifier, err error) Class {
	for _, rule := range rules {
		if c, ok := rule(err); ok {
			return c
		}
	}
	if hosts := perHostErrors(err); hosts != nil {
		for _, h := range hosts {
			if c := classifyDialOne(h); c == Permanent || c == Ambiguous {
				return c
			}
		}
		return Unavailable
	}
	return classifyDialOne(err)
}

// classifyDialOne is the class of one host's connect failure.
func classifyDialOne(err error) Class {
	if isWrongRoleAtConnect(err) {
		return Unavailable
	}
	// The connector looks at the caller's context before classifying: a
	// deadline inside a dial error is the driver's own connect_timeout (a
	// hung or blackholed host), not the caller's.
	if errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return Unavailable
	}
	return classifyDefault(err)
}

// wrongRoleAnswer reports a connect failure in which some host answered,
// only not as the kind of server asked for (a standby while a read-write
// host is wanted): that host is up, and a host may take writes any moment
// (an election). The connector counts the dial against the breaker like
// any other, but has an open breaker probe again soon (reprobeSoon).
func wrongRoleAnswer(err error) bool {
	hosts := perHostErrors(err)
	if hosts == nil {
		return isWrongRoleAtConnect(err)
	}
	for _, h := range hosts {
		if isWrongRoleAtConnect(h) {
			return true
		}
	}
	return false
}

// recoveringAnswer reports a connect failure in which some PostgreSQL
// host answered 57P03 because it is starting up or in crash recovery: it
// is up and takes connections once recovery ends, so an open breaker
// probes again soon (reprobeSoon), as for wrongRoleAnswer. 57P03 also says
// "shutting down" (a server going away: the ProbeInterval pacing stays).
// A standby with hot_standby off answers "not yet accepting connections"
// for good; it is probed at that pace, like a standby in an election.
func recoveringAnswer(err error) bool {
	hosts := perHostErrors(err)
	if hosts == nil {
		hosts = []error{err}
	}
	for _, h := range hosts {
		if pgCodeOf(h) != "57P03" {
			continue
		}
		msg := h.Error()
		for _, s := range recoveringAtConnect {
			if strings.Contains(msg, s) {
				return true
			}
		}
	}
	return false
}

// recoveringAtConnect are PostgreSQL's 57P03 texts for a server on its way
// up (postmaster.c, canAcceptConnections: CAC_STARTUP, CAC_NOTCONSISTENT
// from PostgreSQL 14, CAC_RECOVERY before it).
var recoveringAtConnect = [...]string{
	"the database system is starting up",
	"the database system is not yet accepting connections",
	"the database system is in recovery mode",
}

// perHostErrors returns the per-host failures of a connect error that
// joins several (pgconn.ConnectError around errors.Join, even for one
// host), or nil.
func perHostErrors(err error) []error {
	for err != nil {
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			return u.Unwrap()
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		default:
			return nil
		}
	}
	return nil
}

// wrongRoleAtConnect are the texts of pgconn's ValidateConnect errors for
// target_session_attrs (ErrReadOnlyConnection, ErrStandbyConnection,
// ErrReadWriteConnection, ErrPrimaryConnection): the host answered, but it
// is not the kind of server asked for, for now. Matched by text on the
// innermost error, to keep pgx out of this package's dependencies.
var wrongRoleAtConnect = [...]string{
	"read only connection",
	"server is in standby mode",
	"connection is not read only",
	"server is not in hot standby mode",
}

func isWrongRoleAtConnect(err error) bool {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			break
		}
		next := u.Unwrap()
		if next == nil {
			break
		}
		err = next
	}
	msg := err.Error()
	for _, s := range wrongRoleAtConnect {
		if msg == s {
			return true
		}
	}
	return false
}

// classifyAnswer reads an error of the statement phase. A server that
// answered a statement is up: a resource limit it hit (out of memory, out
// of shared memory, temp_file_limit, disk full), or a connection error it
// relays from elsewhere (dblink or postgres_fdw to a remote that is down),
// is that statement's error, never unavailability (issue 9, item 6). The
// same codes at connect time mean the server refused the connection; the
// connector classifies those with classifyDial.
//
// The codes of an ended or refused session (admin shutdown, terminated
// backend, too many connections, idle-in-transaction timeout) count as
// such only when the session really ended: PostgreSQL sends them at FATAL
// (or PANIC) and closes the connection. The same code at ERROR on a live
// session was raised by the statement (a function's RAISE ... USING
// ERRCODE, a remote's error relayed by postgres_fdw): it is the
// statement's. MySQL errors carry no severity: the connection itself is
// asked (conn.answeredOnLiveSession).
func classifyAnswer(err error) Class {
	cls := classifyDefault(err)
	switch cls {
	case Unavailable, ConnectionLost:
		if answeredForStatement(err) {
			return Permanent
		}
	case RetryTransaction:
		// The idle-in-transaction and transaction timeouts end the
		// session: at ERROR a statement raised them.
		if code := pgCodeOf(err); (code == "25P03" || code == "25P04") && pgSessionAnswered(err) {
			return Permanent
		}
	}
	return cls
}

// answeredForStatement reports a server error that, once a session is up,
// concerns only the statement it answered.
func answeredForStatement(err error) bool {
	var own *Error
	if errors.As(err, &own) {
		return false // sqlretry's own verdict stands
	}
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return pgAnsweredForStatement(pg.SQLState()) || pgSessionAnswered(err)
	}
	if n, _, ok := mysqlErrorOf(err); ok {
		return mysqlAnsweredForStatement(n)
	}
	return false
}

// classifyDefault knows PostgreSQL (by SQLSTATE, through SQLState() so that
// pgx and lib/pq both work), MySQL/MariaDB (by error number) and the Go
// network and context errors.
func classifyDefault(err error) Class {
	if err == nil {
		return Permanent
	}
	var own *Error
	if errors.As(err, &own) {
		return own.Class
	}
	if errors.Is(err, driver.ErrBadConn) {
		// By the driver contract nothing was sent.
		return Unavailable
	}
	if isStandby(err) {
		return Unavailable // the server said it is read-only (readonly.go)
	}
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		return classifyPostgres(pg.SQLState(), err.Error())
	}
	if c, ok := classifyMySQL(err); ok {
		return c
	}
	return classifyNetwork(err)
}

// errTxCommitRollbackText is pgx.ErrTxCommitRollback's text: COMMIT of an
// aborted transaction turned into a rollback, so it did not commit. Matched
// by text to keep pgx out of this package's dependencies.
const errTxCommitRollbackText = "commit unexpectedly resulted in rollback"

func classifyNetwork(err error) Class {
	// Caller cancellation is rule 3 and handled by the callers; a timeout
	// that sqlretry set itself is turned into ConnectionLost there.
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return Permanent
	}
	var safe interface{ SafeToRetry() bool }
	if errors.As(err, &safe) && safe.SafeToRetry() {
		return Unavailable // pgconn: nothing was sent
	}
	if err.Error() == errTxCommitRollbackText {
		return RetryTransaction
	}
	var (
		unknownAuthority x509.UnknownAuthorityError
		hostname         x509.HostnameError
		certInvalid      x509.CertificateInvalidError
		verify           *tls.CertificateVerificationError
		header           tls.RecordHeaderError
	)
	if errors.As(err, &unknownAuthority) || errors.As(err, &hostname) || errors.As(err, &certInvalid) ||
		errors.As(err, &verify) || errors.As(err, &header) {
		return Permanent
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return Unavailable
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return Unavailable
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) {
		return Unavailable
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return ConnectionLost
	}
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return ConnectionLost
	}
	return Permanent
}
