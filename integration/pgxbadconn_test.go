package integration

import (
	"bytes"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// An autocommit INSERT without arguments (pgx sends it with the simple
// protocol) whose connection is cut right after it was sent. pgx reports it
// as SafeToRetry, its stdlib as driver.ErrBadConn, and a plain database/sql
// runs it again: two rows, and no error. Through sqlretry it runs once and
// the caller is told the outcome is unknown.
func TestPostgresLostAutocommitWriteRunsOnce(t *testing.T) {
	for _, wrapped := range []bool{false, true} {
		c := &cutter{}
		db0, _ := sql.Open("pgx", needPrivate(t, "pgx"))
		tbl := table(t, db0, "once")
		mustExec(t, db0, "CREATE TABLE "+tbl+" (n int)")
		c.isCommit = func(p []byte) bool { return bytes.Contains(p, []byte("INSERT INTO "+tbl)) }
		cfg, _ := pgx.ParseConfig(needPrivate(t, "pgx"))
		cfg.DialFunc = c.dial
		var db *sql.DB
		if wrapped {
			db = sqlretry.OpenDB(stdlib.GetConnector(*cfg))
		} else {
			db = sql.OpenDB(stdlib.GetConnector(*cfg))
		}
		c.mode.Store(cutAfterSend)
		_, err := db.Exec("INSERT INTO " + tbl + " VALUES (1)")
		// The server may still be running the first INSERT after the client
		// socket closed: wait for the row before counting.
		var rows int
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if db0.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&rows); rows > 0 {
				break
			}
		}
		time.Sleep(100 * time.Millisecond) // and for a second run, if one was made
		db0.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&rows)
		t.Logf("wrapped=%v err=%v rows=%d", wrapped, err, rows)
		if c.fired.Load() == 0 {
			t.Fatal("the INSERT was never cut")
		}
		if !wrapped && rows == 2 && err == nil {
			t.Log("plain pgx + database/sql: the write ran twice and reported success")
		}
		// At most one row: the INSERT is not run again. Usually exactly
		// one; none when the close reached the server as a reset before it
		// read the INSERT (a CI rehearsal at load 5-10 saw that once), which
		// is why the outcome is unknown to the client either way.
		if wrapped && (rows > 1 || !errors.Is(err, sqlretry.ErrAmbiguousCommit)) {
			t.Errorf("sqlretry: rows=%d err=%v; want at most one row and ErrAmbiguousCommit", rows, err)
		}
		db.Close()
		db0.Close()
	}
}
