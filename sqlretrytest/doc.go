// Package sqlretrytest helps an application test its own transactions
// under sqlretry, against its own test database.
//
// sqlretry.RunInTx may run a closure more than once, so the closure must
// be safe to replay: everything it does has to be undone by a rollback.
// ReplayCheck finds a closure that is not (it sends mail, keeps a counter,
// appends to a slice): it aborts the first attempt at each statement in
// turn and compares what every run leaves behind with a clean run's.
//
// Injector wraps a driver.Connector and makes chosen statements fail as
// the engine's driver would: serialization failures, deadlocks, lost
// connections and lost COMMIT replies, with errors that sqlretry
// classifies exactly as the drivers' own.
//
// Clock is a fake sqlretry.Clock for tests of an application's own
// timeouts around sqlretry.
//
// The package imports neither pgx nor go-sql-driver/mysql.
package sqlretrytest
