package sqlretry

import (
	"fmt"
	"io"
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

// A marker block interrupted (KILL QUERY 1317, max_statement_time 1969)
// may have stopped after its COMMIT took effect (attack14 found a
// committed transaction reported failed); its own session cannot say
// which (completion_type = CHAIN opens the next transaction at COMMIT,
// attack15). It is resolved as a lost COMMIT: by the token, on a side
// connection.
func TestMariaDBInterruptedBlockIsResolvedByTheToken(t *testing.T) {
	for _, n := range []uint16{1317, 1969} {
		for _, tc := range []struct {
			name      string
			ran       bool
			wantCalls int
		}{
			{"committed", true, 1},
			{"not committed", false, 2},
		} {
			t.Run(fmt.Sprint(n, " ", tc.name), func(t *testing.T) {
				srv := newFakeServer()
				srv.script("BEGIN NOT ATOMIC", step{err: &mysql.MySQLError{Number: n, Message: "Query execution was interrupted"}, ran: tc.ran})
				db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
				calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
				if err != nil || calls != tc.wantCalls {
					t.Fatalf("err=%v calls=%d; want success after %d call(s) (ran %q)", err, calls, tc.wantCalls, srv.ran)
				}
				if s := stats(t, db); s.CommitsResolved != 1 {
					t.Fatalf("commits resolved: %d, want 1", s.CommitsResolved)
				}
			})
		}
	}
}
