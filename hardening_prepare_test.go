package sqlretry

import (
	"context"
	"database/sql"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// go-sql-driver/mysql runs a statement with arguments as a prepare and an
// execute (without interpolateParams). A connection that dies while the
// prepare's reply is awaited returns its "invalid connection": nothing
// ran (a prepare has no effect), so the call goes to a new connection,
// never back to the caller as the bare driver error (a hostile tester saw
// 2–5 of those per server kill).
func TestLostPrepareGoesToANewConnection(t *testing.T) {
	srv := newFakeServer()
	srv.script("PREPARE ERRSKIP", step{err: mysql.ErrInvalidConn, closes: true})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	if _, err := db.ExecContext(context.Background(), "ERRSKIP", 1); err != nil {
		t.Fatalf("err = %v, want the statement run on a new connection", err)
	}
	if n := srv.ranCount("ERRSKIP"); n != 1 {
		t.Errorf("ran %d times, want 1", n)
	}
}

// Inside a transaction the same loss is the transaction's: RunInTx
// replays it; it is not handed to database/sql (the transaction's
// connection cannot change).
func TestLostPrepareInATransactionIsReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script("PREPARE ERRSKIP", step{err: mysql.ErrInvalidConn, closes: true})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "ERRSKIP", 1)
		return err
	})
	if err != nil || calls != 2 {
		t.Errorf("err = %v, calls = %d; want one replay", err, calls)
	}
}

// On a session whose transactions the driver does not see (autocommit=0
// in the DSN, or BEGIN run as a statement), a lost prepare is not handed
// to database/sql: the earlier statements of the open transaction died
// with the connection, and on a new one the statement would run alone in
// a transaction the caller then commits. The caller gets the error.
func TestLostPrepareInAHandOpenedTransactionIsReturned(t *testing.T) {
	srv := newFakeServer()
	srv.script("PREPARE ERRSKIP", step{err: mysql.ErrInvalidConn, closes: true})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	retrierOf(db).implicitTx = true // as Open does for autocommit=0 in the DSN
	if _, err := db.ExecContext(context.Background(), "ERRSKIP", 1); err == nil {
		t.Fatal("the statement ran on a new connection, outside the transaction the session had open")
	}
	if n := srv.ranCount("ERRSKIP"); n != 0 {
		t.Errorf("ran %d times, want 0", n)
	}
}
