package sqlretry

import "strings"

// classifyPostgres maps a SQLSTATE (PostgreSQL, CockroachDB, YugabyteDB) to
// a class; shared/ERRORS.md is the table.
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
// session. 53300 and 57P03 stay unavailability: PostgreSQL sends them only
// while a session starts, so after that they come from a pooler that could
// not get a server session for the statement, as PgBouncer's 08P01 does.
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
