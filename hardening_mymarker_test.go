package sqlretry

import (
	"context"
	"errors"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// errCertification is what a Galera node answers when a transaction loses
// certification or is aborted by a replicated one (also a plain deadlock).
var errCertification = &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock; try restarting transaction"}

// A deadlock (a Galera certification failure) at sqlretry's own marker
// INSERT before COMMIT is the same as one at COMMIT: the server rolled the
// transaction back, so RunInTx replays it, and a BeginTx caller gets the
// retryable class to replay it itself. Never a final error.
func TestMarkerInsertDeadlockReplays(t *testing.T) {
	for _, at := range []string{"INSERT INTO `test`.`m`"} {
		t.Run("RunInTx/"+at, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(at, step{err: errCertification})
			db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if err != nil || calls != 2 {
				t.Fatalf("err=%v calls=%d; want the transaction replayed once and committed", err, calls)
			}
			if n := srv.ranCount("INSERT INTO t "); n != 1 {
				t.Fatalf("committed %d times; want once", n)
			}
		})
	}
	t.Run("BeginTx", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO `test`.`m`", step{err: errCertification})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		tx, err := db.BeginTx(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec("INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
		err = tx.Commit()
		var se *Error
		if !errors.As(err, &se) || se.Class != RetryTransaction || !errors.Is(err, errCertification) {
			t.Fatalf("Commit: %v; want the retryable class RetryTransaction with the server's 1213", err)
		}
		if n := srv.ranCount("INSERT INTO t "); n != 0 {
			t.Fatalf("committed %d times; want none", n)
		}
	})
}
