package sqlretry

import (
	"strings"
)

// classifyMySQL maps go-sql-driver/mysql errors (MySQL, MariaDB, and the
// MySQL-protocol engines) to a class; docs/errors.md is the table. The
// driver is recognised without importing it (mysqlerr.go).
func classifyMySQL(err error) (Class, bool) {
	if n, msg, ok := mysqlErrorOf(err); ok {
		return classifyMySQLNumber(n, msg), true
	}
	switch s, _ := mysqlSentinelOf(err); s {
	case mysqlErrInvalidConn:
		// The connection broke after the request was written (rule 2).
		return ConnectionLost, true
	case mysqlErrBusyBuffer, mysqlErrPktSync, mysqlErrPktSyncMul:
		return Permanent, true
	}
	return Permanent, false
}

func classifyMySQLNumber(n uint16, msg string) Class {
	switch n {
	case 1213, // deadlock (also a Galera certification failure)
		3101,                               // rollback during commit (group replication)
		1020,                               // record changed since last read (MariaDB snapshot isolation)
		8002, 8005, 8022, 8028, 9007, 8229: // TiDB write conflicts
		return RetryTransaction
	case 1205, // lock wait timeout: only the statement was rolled back
		3572, // NOWAIT
		1615: // prepared statement needs re-preparing
		return RetryStatement
	case 1040, 1203, 1226, 1637, 4031, // too many connections / idle disconnect
		1047,                                                 // node not ready (Galera)
		9001, 9002, 9003, 9004, 9005, 9008, 8027, 8120, 8252: // TiDB: storage unavailable
		return Unavailable
	case 1290, 1792, 1836:
		// Read-only (1290 also means secure-file-priv): the user's
		// read-only transaction or session, or a read-only server. The
		// number cannot tell: sqlretry asks the server (readonly.go) and
		// only a read-only server becomes Unavailable.
		return Permanent
	case 1053, 1080, 1152, 1158, 1159, 1160, 1161, 1927: // shutdown, connection killed or lost
		return ConnectionLost
	case 1317:
		// Vitess: vttablet ended the transaction (its transaction timeout)
		// and vtgate would answer its COMMIT with success, committing
		// nothing (seen on a live vtgate). Elsewhere a statement was
		// interrupted and the transaction goes on.
		if strings.Contains(msg, "code = Aborted desc = transaction ") {
			return RetryTransaction
		}
		return Permanent
	case 1105:
		// Vitess reports an unavailable primary or pool under this number.
		for _, s := range []string{"primary is not serving", "no healthy tablet", "code = Unavailable", "transaction pool connection limit"} {
			if strings.Contains(msg, s) {
				return Unavailable
			}
		}
		return Permanent
	}
	return Permanent
}

// mysqlAnsweredForStatement: numbers that, answered for a statement on a
// live session, are that statement's: a per-user limit (1226: at connect
// time max_connections_per_hour, at statement time max_questions or
// max_updates) or an InnoDB limit (1637: too many active concurrent
// transactions). 1040 and 1203 stay unavailability: the server sends them
// only while a session starts, so after that they come from a proxy.
func mysqlAnsweredForStatement(n uint16) bool {
	return n == 1226 || n == 1637
}

// mysqlReadOnlyAnswer: the server refused a write as read-only.
func mysqlReadOnlyAnswer(n uint16, msg string) bool {
	switch n {
	case 1792, 1836:
		return true
	case 1290:
		return strings.Contains(msg, "read-only") || strings.Contains(msg, "read_only")
	}
	return false
}
