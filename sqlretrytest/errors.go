package sqlretrytest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/sqlretrytest/internal/go-sql-driver/mysql"
)

// Fault is a failure the Injector makes a statement or a COMMIT meet.
type Fault uint8

const (
	// NoFault lets the statement run.
	NoFault Fault = iota
	// SerializationFailure: PostgreSQL's 40001; on MySQL/MariaDB, which
	// raise no such error under their default settings, MariaDB's 1020
	// "Record has changed since last read" (innodb_snapshot_isolation).
	// The statement does not run; the transaction must be replayed.
	SerializationFailure
	// Deadlock: PostgreSQL's 40P01, MySQL/MariaDB's 1213. The statement
	// does not run; the transaction must be replayed.
	Deadlock
	// ConnectionLost: the statement reaches the server and runs, then the
	// connection breaks before its reply arrives (the server rolls back an
	// open transaction when the connection closes). An autocommit write
	// may therefore have happened, as after a real cut.
	ConnectionLost
	// CommitReplyLost: at COMMIT only, the transaction commits on the
	// server and the connection breaks before the reply arrives. sqlretry
	// then resolves the outcome (PostgreSQL; MySQL with the commit marker,
	// WithMySQLCommitMarker) or returns ErrAmbiguousCommit. At a statement
	// it acts as ConnectionLost.
	CommitReplyLost
)

// String names the fault.
func (f Fault) String() string {
	switch f {
	case NoFault:
		return "no fault"
	case SerializationFailure:
		return "serialization failure"
	case Deadlock:
		return "deadlock"
	case ConnectionLost:
		return "lost connection"
	case CommitReplyLost:
		return "lost COMMIT reply"
	}
	return fmt.Sprintf("Fault(%d)", uint8(f))
}

// PgError has the fields sqlretry reads of pgx's *pgconn.PgError (Code
// through SQLState, the severities) and the same text. Code that does
// errors.As(err, &pgErr) with pgx's own type does not find it; code that
// asks for interface{ SQLState() string }, as sqlretry does, does.
type PgError struct {
	Severity            string // "ERROR" or "FATAL" (FATAL: the server ended the session)
	SeverityUnlocalized string // the same, never translated
	Code                string // the SQLSTATE
	Message             string // the server's message
}

// Error has pgconn.PgError's format.
func (pe *PgError) Error() string {
	return pe.Severity + ": " + pe.Message + " (SQLSTATE " + pe.Code + ")"
}

// SQLState returns the SQLSTATE, as pgconn.PgError's does.
func (pe *PgError) SQLState() string { return pe.Code }

// lostConnError is shaped like pgconn's error for a connection that broke
// while a reply was awaited: "failed to receive message: ..." around the
// network error, and not safe to retry (the request was sent).
type lostConnError struct {
	msg string
	err error
}

func (e *lostConnError) Error() string     { return e.msg + ": " + e.err.Error() }
func (e *lostConnError) Unwrap() error     { return e.err }
func (e *lostConnError) SafeToRetry() bool { return false }

// errMySQLInvalidConn is go-sql-driver/mysql's ErrInvalidConn: an errors.New
// value with this text, which the driver returns when the connection broke
// after the request was written. sqlretry recognises it by type and text.
var errMySQLInvalidConn = errors.New("invalid connection")

// Err returns the error the engine's driver gives for f, as sqlretry
// classifies it: DialectMySQL gives go-sql-driver/mysql's shapes, any
// other dialect pgx's. NoFault gives nil.
func Err(d sqlretry.Dialect, f Fault) error {
	if d == sqlretry.DialectMySQL {
		switch f {
		case SerializationFailure:
			return &mysql.MySQLError{Number: 1020, SQLState: [5]byte{'H', 'Y', '0', '0', '0'},
				Message: "Record has changed since last read in table 't'"}
		case Deadlock:
			return &mysql.MySQLError{Number: 1213, SQLState: [5]byte{'4', '0', '0', '0', '1'},
				Message: "Deadlock found when trying to get lock; try restarting transaction"}
		case ConnectionLost, CommitReplyLost:
			return errMySQLInvalidConn
		}
		return nil
	}
	switch f {
	case SerializationFailure:
		return &PgError{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: "40001",
			Message: "could not serialize access due to read/write dependencies among transactions"}
	case Deadlock:
		return &PgError{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: "40P01",
			Message: "deadlock detected"}
	case ConnectionLost, CommitReplyLost:
		return &lostConnError{msg: "failed to receive message", err: &net.OpError{
			Op: "read", Net: "tcp",
			Source: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50000},
			Addr:   &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5432},
			Err:    os.NewSyscallError("read", syscall.ECONNRESET),
		}}
	}
	return nil
}
