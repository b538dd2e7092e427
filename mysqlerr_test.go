package sqlretry

import (
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// The driver's errors are recognised without importing it; these tests
// hold that recognition to what errors.As and errors.Is say with the
// driver's real types and values.

func TestMySQLErrorOfMatchesErrorsAs(t *testing.T) {
	me := &mysql.MySQLError{Number: 1213, SQLState: [5]byte{'4', '0', '0', '0', '1'}, Message: "Deadlock found"}
	other := &mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded"}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"bare", me},
		{"wrapped", fmt.Errorf("exec: %w", me)},
		{"wrapped twice", fmt.Errorf("a: %w", fmt.Errorf("b: %w", me))},
		{"joined after another error", errors.Join(io.EOF, me)},
		{"joined, the first one wins", errors.Join(fmt.Errorf("x: %w", other), me)},
		{"in a multi-%w", fmt.Errorf("%w / %w", syscall.ECONNRESET, me)},
		{"an *Error of sqlretry", &Error{Op: "exec", Class: RetryTransaction, Err: me}},
		{"typed nil", (*mysql.MySQLError)(nil)},
		{"a typed nil wrapped", fmt.Errorf("x: %w", (*mysql.MySQLError)(nil))},
		{"a value, not a pointer", mysqlErrorByValue{}},
		{"not a MySQL error", &net.OpError{Op: "read", Err: syscall.ECONNRESET}},
		{"driver.ErrBadConn", driver.ErrBadConn},
		{"a look-alike from another package", &MySQLError{Number: 1213, Message: "Deadlock found"}},
		{"nil", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var want *mysql.MySQLError
			wantOK := errors.As(tc.err, &want) && want != nil
			n, msg, ok := mysqlErrorOf(tc.err)
			if ok != wantOK {
				t.Fatalf("mysqlErrorOf(%v) ok = %v, errors.As finds one: %v", tc.err, ok, wantOK)
			}
			if ok && (n != want.Number || msg != want.Message) {
				t.Fatalf("mysqlErrorOf = %d %q, want %d %q", n, msg, want.Number, want.Message)
			}
		})
	}
}

// MySQLError is a type with the driver's type name and fields in another
// package: not the driver's.
type MySQLError struct {
	Number  uint16
	Message string
}

func (e *MySQLError) Error() string { return e.Message }

type mysqlErrorByValue struct{}

func (mysqlErrorByValue) Error() string { return "by value" }

func TestMySQLSentinelTexts(t *testing.T) {
	// Pinned to the driver this module is tested with: a driver upgrade
	// that renames one fails here, not silently in production.
	for _, tc := range []struct {
		sentinel error
		text     string
	}{
		{mysql.ErrInvalidConn, mysqlErrInvalidConn},
		{mysql.ErrBusyBuffer, mysqlErrBusyBuffer},
		{mysql.ErrPktSync, mysqlErrPktSync},
		{mysql.ErrPktSyncMul, mysqlErrPktSyncMul},
	} {
		if tc.sentinel.Error() != tc.text {
			t.Errorf("driver's sentinel says %q, sqlretry looks for %q", tc.sentinel, tc.text)
		}
		for _, err := range []error{tc.sentinel, fmt.Errorf("x: %w", tc.sentinel), errors.Join(io.EOF, tc.sentinel)} {
			if s, ok := mysqlSentinelOf(err); !ok || s != tc.text {
				t.Errorf("mysqlSentinelOf(%v) = %q, %v", err, s, ok)
			}
		}
	}
	for _, err := range []error{
		mysql.ErrMalformPkt, io.EOF, nil,
		&MySQLError{Message: mysqlErrInvalidConn},    // another type with that text
		fmt.Errorf("pool: %v", mysql.ErrInvalidConn), // not wrapped: only the text is kept
	} {
		if s, ok := mysqlSentinelOf(err); ok {
			t.Errorf("mysqlSentinelOf(%v) = %q, want none", err, s)
		}
	}
}

// TestClassifyMySQLWithoutTheDriver checks that the package itself, not
// only its tests, is free of the driver: pgx users do not build it, and
// the driver's own test suite can import sqlretry.
func TestClassifyMySQLWithoutTheDriver(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Skipf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "go-sql-driver/mysql") || strings.Contains(dep, "jackc/pgx") {
			t.Errorf("the sqlretry package depends on %s", dep)
		}
	}
}

var classifySink Class

// BenchmarkClassifyMySQL compares the driver-free recognition with the
// errors.As it replaces, on the error paths only (classify never runs for
// a call that succeeded).
func BenchmarkClassifyMySQL(b *testing.B) {
	deadlock := fmt.Errorf("exec: %w", &mysql.MySQLError{Number: 1213, Message: "Deadlock found"})
	reset := &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
	for _, tc := range []struct {
		name string
		err  error
	}{{"MySQLError", deadlock}, {"ErrInvalidConn", mysql.ErrInvalidConn}, {"network", reset}} {
		b.Run("errorsAs/"+tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				classifySink = classifyMySQLWithErrorsAs(tc.err)
			}
		})
		b.Run("structural/"+tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				classifySink, _ = classifyMySQL(tc.err)
			}
		})
		b.Run("classifyDefault/"+tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				classifySink = classifyDefault(tc.err)
			}
		})
	}
}

// classifyMySQLWithErrorsAs is classifyMySQL as it was with the driver
// imported, for the benchmark.
func classifyMySQLWithErrorsAs(err error) Class {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return classifyMySQLNumber(me.Number, me.Message)
	}
	switch {
	case errors.Is(err, mysql.ErrInvalidConn):
		return ConnectionLost
	case errors.Is(err, mysql.ErrBusyBuffer), errors.Is(err, mysql.ErrPktSync), errors.Is(err, mysql.ErrPktSyncMul):
		return Permanent
	}
	return Permanent
}
