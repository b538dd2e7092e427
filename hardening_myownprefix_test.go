package sqlretry

import (
	"database/sql/driver"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// A server without SET STATEMENT (MySQL, a MariaDB before 10.1.2) refuses
// sqlretry's prefixed question with a syntax error: it is asked again
// without the prefix, the db keeps to that, and the marker works (attack14).
func TestMySQLOwnStatementsWithoutSetStatement(t *testing.T) {
	srv := newFakeServer()
	srv.refuseOwnPrefix = true
	srv.script("BEGIN NOT ATOMIC", step{err: io.ErrUnexpectedEOF, ran: true})
	db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
	calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
	if err != nil || calls != 1 {
		t.Fatalf("err=%v calls=%d; want the lost COMMIT resolved as committed, one call (ran %q)", err, calls, srv.ran)
	}
	if r := retrierOf(db); r == nil || !r.resolution.noOwnPrefix.Load() {
		t.Fatal("the refused prefix was not remembered")
	}
}

// A limit of the session's that the prefix cannot lift (a server without
// it) fails sqlretry's own question before COMMIT: the transaction commits
// without a marker, as with the plain driver, rather than failing
// (attack14: max_statement_time, max_join_size, max_session_mem_used).
func TestMySQLOwnQuestionRefusedBySessionLimitCommitsWithoutMarker(t *testing.T) {
	for _, n := range []uint16{1969, 1104, 1290, 1317} {
		srv := newFakeServer()
		srv.refuseOwnPrefix = true
		srv.script("SELECT CONNECTION_ID()", step{err: &mysql.MySQLError{Number: n, Message: "a session limit"}})
		db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
		calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
		if err != nil || calls != 1 {
			t.Fatalf("%d: err=%v calls=%d; want a commit without the marker (ran %q)", n, err, calls, srv.ran)
		}
		if srv.ranCount("BEGIN NOT ATOMIC") != 0 {
			t.Fatalf("%d: ran %q; want the plain COMMIT, no marker block", n, srv.ran)
		}
	}
}

// A marker block interrupted (KILL QUERY, 1317) may have stopped after its
// COMMIT took effect: the session says which (attack14 found a committed
// transaction reported failed under max_statement_time).
func TestMariaDBInterruptedBlockAsksTheSession(t *testing.T) {
	interrupted := &mysql.MySQLError{Number: 1317, Message: "Query execution was interrupted"}
	for _, tc := range []struct {
		name      string
		ran       bool
		answer    []driver.Value // @@in_transaction, markers; nil: the question fails
		ambiguous bool
		committed bool
	}{
		{"committed", true, []driver.Value{int64(0), int64(1)}, false, true},
		{"still open", false, []driver.Value{int64(1), int64(1)}, false, false},
		{"ended without its marker", false, []driver.Value{int64(0), int64(0)}, false, false},
		{"the session cannot tell", true, nil, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("BEGIN NOT ATOMIC", step{err: interrupted, ran: tc.ran})
			asked := 0
			srv.onQuery = func(c *fakeConn, q string, _ []driver.NamedValue) (driver.Rows, bool) {
				if !strings.HasPrefix(q, "SELECT @@in_transaction, (SELECT COUNT(*) FROM `test`.`m` WHERE token = X'") {
					return nil, false
				}
				asked++
				if tc.answer == nil {
					return &errAfterRows{cols: []string{"a", "b"}, err: interrupted}, true
				}
				return &fakeRows{cols: []string{"a", "b"}, data: [][]driver.Value{tc.answer}}, true
			}
			db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"), WithMaxAttempts(1))
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if asked != 1 {
				t.Fatalf("the session was asked %d times, want once (ran %q)", asked, srv.ran)
			}
			switch {
			case tc.committed:
				if err != nil || calls != 1 {
					t.Fatalf("err=%v calls=%d; want success", err, calls)
				}
			case tc.ambiguous:
				if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
					t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit", err, calls)
				}
			default:
				if err == nil || errors.Is(err, ErrAmbiguousCommit) {
					t.Fatalf("err=%v calls=%d; want the interruption", err, calls)
				}
			}
		})
	}
}
