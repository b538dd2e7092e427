package sqlretry

import "errors"

// timeoutOf recognises the timeouts that end a transaction which ran too
// long or sat idle too long: when one repeats, the transaction itself is
// the cause (a deterministic error is not contention). Lock timeouts are
// not among them: they wait on another transaction. The value is the
// SQLSTATE's or the error number's, for comparing attempts.
func timeoutOf(err error) uint {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) {
		switch c := pg.SQLState(); c {
		case "25P03", "25P04", "57014": // idle in transaction, transaction timeout, statement timeout
			return uint(c[0])<<24 | uint(c[1])<<16 | uint(c[3])<<8 | uint(c[4])
		}
		return 0
	}
	if n, _, ok := mysqlErrorOf(err); ok {
		switch n {
		case 4031, 1969, 3024: // idle disconnect, MariaDB max_statement_time, MySQL max_execution_time
			return uint(n)
		}
	}
	return 0
}
