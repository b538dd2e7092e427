package sqlretry

import (
	"context"
	"crypto/x509"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/go-sql-driver/mysql"
)

type safeErr struct{}

func (safeErr) Error() string     { return "write failed before sending" }
func (safeErr) SafeToRetry() bool { return true }
func (safeErr) Unwrap() error     { return syscall.EPIPE }

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestClassifyDefault(t *testing.T) {
	my := func(n uint16, msg string) error { return &mysql.MySQLError{Number: n, Message: msg} }
	pg := func(code string) error { return &pgError{code: code, msg: "x"} }
	for _, tc := range []struct {
		err  error
		want Class
	}{
		{driver.ErrBadConn, Unavailable},
		{fmt.Errorf("wrapped: %w", driver.ErrBadConn), Unavailable},
		{context.Canceled, Permanent},
		{context.DeadlineExceeded, Permanent},
		{errRefused, Unavailable},
		{&net.DNSError{Err: "no such host", Name: "db"}, Unavailable},
		{syscall.ECONNRESET, ConnectionLost},
		{syscall.EPIPE, ConnectionLost},
		{io.EOF, ConnectionLost},
		{io.ErrUnexpectedEOF, ConnectionLost},
		{&net.OpError{Op: "read", Err: timeoutErr{}}, ConnectionLost},
		{safeErr{}, Unavailable},
		{x509.UnknownAuthorityError{}, Permanent},
		{errors.New(errTxCommitRollbackText), RetryTransaction},
		{errors.New("something else"), Permanent},
		// PostgreSQL
		{pg("40001"), RetryStatement}, {pg("40P01"), RetryTransaction}, {pg("55P03"), RetryStatement},
		{pg("40003"), Ambiguous}, {pg("08007"), Ambiguous},
		{pg("57P01"), ConnectionLost}, {pg("57P02"), ConnectionLost},
		{pg("57P03"), Unavailable}, {pg("53300"), Unavailable}, {pg("57P05"), Unavailable},
		{pg("25P03"), RetryTransaction}, {pg("25P04"), RetryTransaction}, {pg("25P02"), RetryTransaction},
		{pg("53100"), Unavailable}, {pg("58030"), Unavailable},
		{pg("08006"), ConnectionLost}, {pg("08001"), Unavailable},
		{pg("08P01"), Permanent}, {&pgError{"08P01", "no more connections allowed (max_client_conn)"}, Unavailable},
		{pg("25006"), Permanent}, {pg("57014"), Permanent},
		{pg("23505"), Permanent}, {pg("22001"), Permanent}, {pg("42P01"), Permanent}, {pg("28P01"), Permanent},
		{pg("3D000"), Permanent}, {pg("0A000"), Permanent}, {pg("XX000"), Permanent}, {pg("CR000"), RetryTransaction},
		{&net.OpError{Op: "dial", Err: pg("28P01")}, Permanent}, // a wrapped auth failure inside a connect error
		// MySQL / MariaDB
		{my(1213, ""), RetryTransaction}, {my(1205, ""), RetryStatement}, {my(3572, ""), RetryStatement},
		{my(3101, ""), RetryTransaction}, {my(1020, ""), RetryTransaction}, {my(1615, ""), RetryStatement},
		{my(1040, ""), Unavailable}, {my(4031, ""), Unavailable}, {my(1836, ""), Permanent}, {my(1047, ""), Unavailable},
		{my(1290, "The MariaDB server is running with the --read-only option"), Permanent},
		{my(1290, "The MySQL server is running with the --secure-file-priv option"), Permanent},
		{my(1053, ""), ConnectionLost}, {my(1927, ""), ConnectionLost}, {my(1317, ""), Permanent},
		{my(1062, ""), Permanent}, {my(1064, ""), Permanent}, {my(1146, ""), Permanent}, {my(1045, ""), Permanent},
		{my(1105, "vttablet: primary is not serving"), Unavailable}, {my(1105, "other"), Permanent},
		{my(8002, ""), RetryTransaction}, {my(9005, ""), Unavailable},
		{mysql.ErrInvalidConn, ConnectionLost}, {mysql.ErrBusyBuffer, Permanent},
		{&Error{Class: Ambiguous, Reason: ErrAmbiguousCommit}, Ambiguous},
		{&poisonedError{cause: my(1213, "")}, RetryTransaction},
	} {
		if got := classifyDefault(tc.err); got != tc.want {
			t.Errorf("classify(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestUserRulesRunFirst(t *testing.T) {
	errCustom := errors.New("custom busy")
	rules := []Classifier{func(err error) (Class, bool) {
		if errors.Is(err, errCustom) {
			return RetryStatement, true
		}
		return 0, false
	}}
	if got := classify(rules, errCustom); got != RetryStatement {
		t.Errorf("user rule: %v", got)
	}
	if got := classify(rules, &pgError{"40P01", ""}); got != RetryTransaction {
		t.Errorf("defaults after the rule: %v", got)
	}
}

func FuzzClassify(f *testing.F) {
	f.Add("40001", uint16(1213), "Deadlock found", 0)
	f.Add("08P01", uint16(1290), "read-only", 1)
	f.Fuzz(func(t *testing.T, code string, num uint16, msg string, kind int) {
		var err error
		switch kind % 3 {
		case 0:
			err = &pgError{code: code, msg: msg}
		case 1:
			err = &mysql.MySQLError{Number: num, Message: msg}
		default:
			err = fmt.Errorf("%s: %w", msg, &pgError{code: code, msg: msg})
		}
		if c := classifyDefault(err); c > Ambiguous {
			t.Fatalf("class %d out of range", c)
		}
	})
}

// The same code reads differently by phase: at connect time a refusal
// (unavailable, retried, counted by the breaker), answered for a statement
// on a live session the statement's own error (issue 9, item 6).
func TestClassifyByPhase(t *testing.T) {
	my := func(n uint16) error { return &mysql.MySQLError{Number: n, Message: "x"} }
	pg := func(code string) error { return &pgError{code: code, msg: "x"} }
	for _, tc := range []struct {
		err             error
		dial, statement Class
	}{
		{pg("53000"), Unavailable, Permanent}, {pg("53100"), Unavailable, Permanent}, {pg("53200"), Unavailable, Permanent},
		{pg("53400"), Unavailable, Permanent}, {pg("58000"), Unavailable, Permanent}, {pg("58030"), Unavailable, Permanent},
		{pg("08001"), Unavailable, Permanent}, {pg("08004"), Unavailable, Permanent},
		{pg("08000"), ConnectionLost, Permanent}, {pg("08003"), ConnectionLost, Permanent}, {pg("08006"), ConnectionLost, Permanent},
		{fmt.Errorf("wrapped: %w", pg("53200")), Unavailable, Permanent},
		// Sent only while a session starts: after that, a pooler's refusal.
		{pg("53300"), Unavailable, Unavailable}, {pg("57P03"), Unavailable, Unavailable},
		{&pgError{"08P01", "no more connections allowed (max_client_conn)"}, Unavailable, Unavailable},
		// The session itself is gone.
		{pg("57P01"), ConnectionLost, ConnectionLost}, {pg("57P05"), Unavailable, Unavailable}, {pg("08007"), Ambiguous, Ambiguous},
		{my(1226), Unavailable, Permanent}, {my(1637), Unavailable, Permanent},
		{my(1040), Unavailable, Unavailable}, {my(1203), Unavailable, Unavailable}, {my(4031), Unavailable, Unavailable},
		{my(1047), Unavailable, Unavailable}, {my(1927), ConnectionLost, ConnectionLost},
		{my(1037), Permanent, Permanent}, {my(1038), Permanent, Permanent}, {my(1041), Permanent, Permanent},
		{my(1114), Permanent, Permanent}, {my(3024), Permanent, Permanent},
		{driver.ErrBadConn, Unavailable, Unavailable}, {errRefused, Unavailable, Unavailable},
		// sqlretry's own verdict stands.
		{&Error{Class: Unavailable, Err: pg("53300")}, Unavailable, Unavailable},
	} {
		if got := classifyDial(nil, tc.err); got != tc.dial {
			t.Errorf("at connect: %v = %v, want %v", tc.err, got, tc.dial)
		}
		if got := classify(nil, tc.err); got != tc.statement {
			t.Errorf("for a statement: %v = %v, want %v", tc.err, got, tc.statement)
		}
	}
}

// The statement phase only ever turns a class into Permanent: whatever
// retries a server's answer earns for a statement, it earns at connect
// time too, and nothing a statement gets is more retryable than the code.
func FuzzClassifyPhase(f *testing.F) {
	f.Add("53200", uint16(1226), "out of shared memory", 0)
	f.Add("08001", uint16(1040), "could not connect", 1)
	f.Add("25006", uint16(1792), "read-only", 2)
	f.Fuzz(func(t *testing.T, code string, num uint16, msg string, kind int) {
		var err error
		switch kind % 3 {
		case 0:
			err = &pgError{code: code, msg: msg}
		case 1:
			err = &mysql.MySQLError{Number: num, Message: msg}
		default:
			err = fmt.Errorf("%s: %w", msg, &pgError{code: code, msg: msg})
		}
		dial, stmt := classifyDial(nil, err), classify(nil, err)
		if stmt != dial && stmt != Permanent {
			t.Fatalf("%v: %v at connect, %v for a statement", err, dial, stmt)
		}
		if stmt == Unavailable && answeredForStatement(err) {
			t.Fatalf("%v: a server's answer for a statement is Unavailable", err)
		}
	})
}
