package sqlretry_test

import (
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/sqlretrytest"
)

// TestSqlretrytestErrorsClassifyAsDrivers: the errors sqlretrytest
// injects are classified exactly as the drivers' own errors for the same
// failure (issue 12).
func TestSqlretrytestErrorsClassifyAsDrivers(t *testing.T) {
	pgLost := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	for _, c := range []struct {
		dialect sqlretry.Dialect
		fault   sqlretrytest.Fault
		real    error
		want    sqlretry.Class
	}{
		{sqlretry.DialectPostgres, sqlretrytest.SerializationFailure, &pgconn.PgError{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: "40001"}, sqlretry.RetryStatement},
		{sqlretry.DialectPostgres, sqlretrytest.Deadlock, &pgconn.PgError{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: "40P01"}, sqlretry.RetryTransaction},
		{sqlretry.DialectPostgres, sqlretrytest.ConnectionLost, pgLost, sqlretry.ConnectionLost},
		{sqlretry.DialectPostgres, sqlretrytest.CommitReplyLost, pgLost, sqlretry.ConnectionLost},
		{sqlretry.DialectMySQL, sqlretrytest.SerializationFailure, &mysql.MySQLError{Number: 1020}, sqlretry.RetryTransaction},
		{sqlretry.DialectMySQL, sqlretrytest.Deadlock, &mysql.MySQLError{Number: 1213}, sqlretry.RetryTransaction},
		{sqlretry.DialectMySQL, sqlretrytest.ConnectionLost, mysql.ErrInvalidConn, sqlretry.ConnectionLost},
		{sqlretry.DialectMySQL, sqlretrytest.CommitReplyLost, mysql.ErrInvalidConn, sqlretry.ConnectionLost},
	} {
		injected := sqlretrytest.Err(c.dialect, c.fault)
		got, real := sqlretry.ClassifyAnswer(injected), sqlretry.ClassifyAnswer(c.real)
		if got != real || got != c.want {
			t.Errorf("%v %v: injected %v is %v, the driver's %v is %v, want %v", c.dialect, c.fault, injected, got, c.real, real, c.want)
		}
	}
	if sqlretrytest.Err(sqlretry.DialectMySQL, sqlretrytest.NoFault) != nil || sqlretrytest.Err(sqlretry.DialectPostgres, sqlretrytest.NoFault) != nil {
		t.Error("NoFault must give no error")
	}
	// The text of the injected errors is the drivers'.
	if got, want := sqlretrytest.Err(sqlretry.DialectMySQL, sqlretrytest.Deadlock).Error(),
		(&mysql.MySQLError{Number: 1213, SQLState: [5]byte{'4', '0', '0', '0', '1'}, Message: "Deadlock found when trying to get lock; try restarting transaction"}).Error(); got != want {
		t.Errorf("MySQL deadlock text %q, the driver's %q", got, want)
	}
	if got, want := sqlretrytest.Err(sqlretry.DialectPostgres, sqlretrytest.Deadlock).Error(),
		(&pgconn.PgError{Severity: "ERROR", Code: "40P01", Message: "deadlock detected"}).Error(); got != want {
		t.Errorf("PostgreSQL deadlock text %q, pgx's %q", got, want)
	}
}
