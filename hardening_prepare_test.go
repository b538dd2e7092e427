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
