package sqlretry

import (
	"database/sql"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// A marker INSERT that fails as a table of another shape would (a
// TEMPORARY table of the session's under the marker's name: attack17) does
// not fail the COMMIT as a configuration error: the check found the real
// table right. The transaction commits without a marker (a lost COMMIT is
// ambiguous, never replayed), as the plain driver commits, and the next
// transaction checks the table again.
func TestMarkerShadowedCommitsWithoutMarker(t *testing.T) {
	shape := &mysql.MySQLError{Number: 1054, Message: "Unknown column 'token' in 'INSERT INTO'"}
	for _, tc := range []struct {
		name   string
		maria  bool
		script func(srv *fakeServer)
	}{
		{"mysql/other shape", false, func(srv *fakeServer) { srv.script("INSERT INTO `test`.`m`", step{err: shape}) }},
		{"mariadb/other shape", true, func(srv *fakeServer) { srv.script("BEGIN NOT ATOMIC", step{err: shape}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			tc.script(srv)
			db := func() *sql.DB {
				if tc.maria {
					return mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
				}
				return markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
			}()
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if err != nil || calls != 1 {
				t.Fatalf("err=%v calls=%d; want the transaction committed without a marker, as the plain driver commits", err, calls)
			}
			if n := srv.ranCount("INSERT INTO t "); n != 1 {
				t.Fatalf("committed %d times; want once (ran %q)", n, srv.ran)
			}
			if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (2)"); err != nil || calls != 1 {
				t.Fatalf("second transaction: err=%v calls=%d", err, calls)
			}
			if n := srv.ranCount("SELECT COUNT(*) FROM `test`.`m` WHERE 1=0"); n != 2 {
				t.Errorf("the table was checked %d times, want 2: again after the first transaction's marker missed it", n)
			}
		})
	}
}
