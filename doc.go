// Package sqlretry makes database/sql applications on PostgreSQL (pgx v5)
// and MySQL/MariaDB (go-sql-driver/mysql) survive dropped connections,
// restarts, serialization failures, deadlocks and lock-wait timeouts without
// losing or duplicating a write, and without hammering a database that is
// already in trouble.
//
// Change one line:
//
//	db, err := sqlretry.Open("pgx", dsn) // was: sql.Open("pgx", dsn)
//	if err != nil {
//		return err
//	}
//
// and run transactions through a closure that sqlretry may replay:
//
//	err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable},
//		func(ctx context.Context, tx *sql.Tx) error {
//			_, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - $1 WHERE id = $2", 10, 1)
//			return err
//		})
//
// sqlretry retries only what is provably safe: a dial, a statement that
// never reached the server, an autocommit statement the server rolled back,
// a read (or a call marked Idempotent) that lost its connection, and a whole
// transaction replayed through RunInTx. It never retries a statement inside
// a transaction, never re-runs a write that may have run, and resolves a
// COMMIT that lost its connection instead of guessing (PostgreSQL:
// txid_status; MySQL: a marker row, WithMySQLCommitMarker), or returns
// ErrAmbiguousCommit.
// A circuit breaker (ErrCircuitOpen) and a retry budget (ErrBudgetExhausted)
// protect a struggling database. The README has the full table;
// docs/errors.md lists every error code and its class. Package
// sqlretrytest tests an application's own closures for replay safety.
package sqlretry
