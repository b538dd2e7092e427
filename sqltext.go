package sqlretry

import "github.com/sqlretry/sqlretry/internal/sqltext"

// The reader makes three safety decisions (internal/sqltext, proven against
// the servers' own parsers in the sqlparsecheck module): is a statement a
// plain read (safe to re-run after a lost connection), is it one statement
// the server runs atomically (safe to re-run after the server rolled it
// back), and does it open or close a transaction by hand (no statement
// retries then). When in doubt they answer "not a read", "not atomic" and
// "in a transaction". DialectUnknown reads a text as both dialects.

// isReadQuery reports whether q is exactly one statement and a plain read:
// no locking read, no INTO, no data-modifying CTE, no known function with a
// side effect. A SELECT that calls a function of the user's own with side
// effects cannot be told apart; callers mark such calls NotIdempotent.
func isReadQuery(d Dialect, q string) bool { return sqltext.IsRead(sqltext.Dialect(d), q) }

// isAtomicStatement reports whether q is provably one statement that the
// server runs atomically: when the server rolls it back (a lock-wait
// timeout, a serialization failure) nothing of it remains, so running it
// again is safe. Several statements, procedure calls, anonymous blocks and
// transaction control are not (they may commit or keep part of their work).
func isAtomicStatement(d Dialect, q string) bool { return sqltext.IsAtomic(sqltext.Dialect(d), q) }

// Transaction-control effects of a statement run outside BeginTx.
const (
	txEnds    = sqltext.TxEnds    // COMMIT, ROLLBACK, END, ABORT, PREPARE TRANSACTION
	txOpens   = sqltext.TxOpens   // BEGIN, START TRANSACTION, COMMIT/ROLLBACK AND CHAIN
	txForGood = sqltext.TxForGood // SET autocommit, SET completion_type, XA; MySQL CALL/EXECUTE/compound
)

// txControl tells whether a text run outside database/sql's BeginTx opens
// a transaction by hand (txOpens), ends one (txEnds) or neither (txNone),
// following every statement in it. txForGood: the connection is manual for
// good ("SET autocommit", XA) or sqlretry cannot tell.
func txControl(d Dialect, q string) int { return sqltext.TxControl(sqltext.Dialect(d), q) }

// txTouched reports whether some reading of q has transaction control
// (txControl other than 0): inside a transaction, the reading that escapes
// it wins, as a COMMIT in an executed comment the server may run.
func txTouched(d Dialect, q string) bool { return sqltext.TxTouched(sqltext.Dialect(d), q) }

// isRollbackToSavepoint reports exactly one statement ROLLBACK [WORK|
// TRANSACTION] TO [SAVEPOINT] x, in either dialect's reading.
func isRollbackToSavepoint(q string) bool { return sqltext.IsRollbackToSavepoint(q) }
