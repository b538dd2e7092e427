package sqlretry

import (
	"database/sql/driver"
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
)

// classifyPostgres maps a SQLSTATE (PostgreSQL, CockroachDB, YugabyteDB) to
// a class; docs/errors.md is the table.
func classifyPostgres(code, msg string) Class {
	switch code {
	case "40001": // serialization_failure, also hot-standby conflicts and Cockroach/Yugabyte restarts
		return RetryStatement
	case "55P03": // lock_not_available (NOWAIT, lock_timeout)
		return RetryStatement
	case "40P01", // deadlock_detected
		"25P02",          // in_failed_transaction: the caller should look at the first error
		"25P03", "25P04", // idle-in-transaction / transaction timeout: the session is gone, the transaction rolled back
		"CR000": // CockroachDB: transaction retry
		return RetryTransaction
	case "40003", "08007": // statement completion / transaction resolution unknown
		return Ambiguous
	case "57P01", "57P02": // admin / crash shutdown
		return ConnectionLost
	case "08000", "08003", "08006": // connection exceptions
		return ConnectionLost
	case "08001", "08004", // could not connect / rejected
		"57P03", "53300", "57P05", // cannot connect now, too many connections, idle session timeout
		"53000", "53100", "53200", "53400", "58000", "58030": // resources, system / io error
		// At connect time the server refused the session. Answered for a
		// statement these are the statement's (classifyAnswer).
		return Unavailable
	case "25006":
		// read_only_sql_transaction: the user's read-only transaction or
		// session, or a standby. The code cannot tell: sqlretry asks the
		// server (readonly.go) and only a standby becomes Unavailable.
		return Permanent
	case "08P01":
		// From PostgreSQL a protocol violation is a bug; from PgBouncer it
		// is how pool exhaustion and queue timeouts are reported.
		if isPgBouncerUnavailable(msg) {
			return Unavailable
		}
		return Permanent
	}
	return Permanent
}

func isPgBouncerUnavailable(msg string) bool {
	for _, s := range []string{"max_client_conn", "query_wait_timeout", "pgbouncer", "server login has been failing", "no more connections allowed"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// pgAnsweredForStatement: SQLSTATEs that, sent by a live server for a
// statement, are about that statement (a limit it hit) or about a remote
// that dblink or postgres_fdw could not reach (08001), not about this
// session. 53300 and 57P03 are left to the severity (pgSessionAnswered):
// PostgreSQL sends them only while a session starts, at FATAL, and so does
// a pooler that could not get a server session for the statement; at
// ERROR on a live session a statement raised them.
func pgAnsweredForStatement(code string) bool {
	if len(code) != 5 || code == "53300" {
		return false
	}
	switch code[:2] {
	case "53", "58": // insufficient resources, system error
		return true
	case "08": // connection exceptions relayed from a remote
		return code != "08P01" && code != "08007"
	}
	return false
}

// pgSessionAnswered reports a PostgreSQL error sent at a severity that
// leaves the session open (ERROR): whatever its code says, the server is
// up and the error is the statement's. An ended session gets its error at
// FATAL or PANIC (pgx then closes the connection; lib/pq turns such an
// error into driver.ErrBadConn). False when the severity cannot be read (a
// driver that does not keep it): the code alone decides then. A standby's
// refusal (readonly.go), a connection the driver refused (ErrBadConn) and
// PgBouncer's refusals (08P01 with its texts) keep their class.
func pgSessionAnswered(err error) bool {
	if isStandby(err) || errors.Is(err, driver.ErrBadConn) {
		return false
	}
	var pg interface{ SQLState() string }
	if !errors.As(err, &pg) {
		return false
	}
	sev, ok := pgSeverityOf(pg)
	if !ok || sev == "FATAL" || sev == "PANIC" {
		return false
	}
	return pg.SQLState() != "08P01" || !isPgBouncerUnavailable(err.Error())
}

// pgSeverityLayout is where an error type keeps its severity: the field
// indexes of SeverityUnlocalized (pgconn's, from the protocol's V field,
// PostgreSQL 9.6 on) and Severity (pgconn's and lib/pq's, maybe
// localized); -1 when it has none.
type pgSeverityLayout struct {
	typ                   reflect.Type
	unlocalized, severity int
}

// lastPgSeverityLayout caches the last error type seen: the type is
// inspected once, not on every error. The drivers are read by their
// fields' names, to keep them out of this package's dependencies.
var lastPgSeverityLayout atomic.Pointer[pgSeverityLayout]

// pgSeverityOf returns the severity a PostgreSQL error carries, the
// unlocalized one when there is one.
func pgSeverityOf(e any) (string, bool) {
	t := reflect.TypeOf(e)
	l := lastPgSeverityLayout.Load()
	if l == nil || l.typ != t {
		l = pgSeverityLayoutOf(t)
		lastPgSeverityLayout.Store(l)
	}
	if l.unlocalized < 0 && l.severity < 0 {
		return "", false
	}
	v := reflect.ValueOf(e)
	if v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return "", false
		}
		v = v.Elem()
	}
	for _, i := range [2]int{l.unlocalized, l.severity} {
		if i >= 0 {
			if s := v.Field(i).String(); s != "" {
				return s, true
			}
		}
	}
	return "", false
}

func pgSeverityLayoutOf(t reflect.Type) *pgSeverityLayout {
	l := &pgSeverityLayout{typ: t, unlocalized: -1, severity: -1}
	s := t
	if s.Kind() == reflect.Pointer {
		s = s.Elem()
	}
	if s.Kind() != reflect.Struct {
		return l
	}
	field := func(name string) int {
		f, ok := s.FieldByName(name)
		if !ok || f.Type.Kind() != reflect.String || len(f.Index) != 1 || !f.IsExported() {
			return -1
		}
		return f.Index[0]
	}
	l.unlocalized, l.severity = field("SeverityUnlocalized"), field("Severity")
	return l
}
