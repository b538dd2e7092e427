package sqlretry

import (
	"strings"
)

// classifyMySQL maps go-sql-driver/mysql errors (MySQL, MariaDB, and the
// MySQL-protocol engines) to a class; shared/ERRORS.md is the table. The
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
		1836, 1792, 1047, // read-only / node not ready (failover, Galera)
		9001, 9002, 9003, 9004, 9005, 9008, 8027, 8120, 8252: // TiDB: storage unavailable
		return Unavailable
	case 1290:
		// Also returned for secure-file-priv, which is permanent.
		if strings.Contains(msg, "read-only") || strings.Contains(msg, "read_only") {
			return Unavailable
		}
		return Permanent
	case 1053, 1080, 1152, 1158, 1159, 1160, 1161, 1927: // shutdown, connection killed or lost
		return ConnectionLost
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
