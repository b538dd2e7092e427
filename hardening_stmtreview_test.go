package sqlretry

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// Found by a hostile review of the single-statement retries (2026-12-02);
// each test failed before its fix, and the comments say what happened
// then.

// A MySQL multi-statement text (multiStatements=true) whose first part
// committed in autocommit and whose second part got an "unavailable"
// answer (Galera 1047 as the node leaves the primary component; Vitess
// 1105 "primary is not serving" during a reparent; TiDB 9005) is handed to
// database/sql, which runs the whole text again: the first INSERT twice.
func TestUnavailableMultiStatementIsNotHandedOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"galera1047", &mysql.MySQLError{Number: 1047, Message: "WSREP has not yet prepared node for application use"}},
		{"vitess1105", &mysql.MySQLError{Number: 1105, Message: "target: ks.0.primary: primary is not serving, there may be a reparent operation in progress"}},
		{"tidb9005", &mysql.MySQLError{Number: 9005, Message: "Region is unavailable"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			const q = "INSERT INTO ledger VALUES (1); INSERT INTO audit VALUES (1)"
			srv.script("INSERT INTO ledger", step{err: tc.err, ran: true}) // first part ran, second refused
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			_, err := db.ExecContext(context.Background(), q)
			if n := srv.ranCount("INSERT INTO ledger"); n != 1 {
				t.Errorf("the text ran %d times (err = %v), want 1: its first statement had committed", n, err)
			}
			if err == nil {
				t.Errorf("err = nil, want the server's error")
			}
		})
	}
}

// After a MySQL CALL (or SET autocommit=1) the connection is "manual for
// good" (manual=2), but it is usually still in autocommit. A write that then
// loses its connection after it was sent may have committed: the deadline
// path (runStatement) calls that ErrAmbiguousCommit, the plain lost-
// connection path (decideAutocommit, manualSession) returns the bare driver
// error, which callers take for "did not happen".
func TestLostWriteAfterCallIsAmbiguous(t *testing.T) {
	for _, first := range []string{"CALL refresh_stats()", "SET autocommit = 1"} {
		t.Run(first, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("INSERT INTO t", step{err: io.ErrUnexpectedEOF, ran: true})
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			db.SetMaxOpenConns(1)
			ctx := context.Background()
			if _, err := db.ExecContext(ctx, first); err != nil {
				t.Fatal(err)
			}
			_, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			if srv.ranCount("INSERT INTO t") != 1 {
				t.Fatalf("ran %d", srv.ranCount("INSERT INTO t"))
			}
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Errorf("err = %v, want ErrAmbiguousCommit: the autocommit INSERT committed", err)
			}
		})
	}
}

// A transaction opened by hand (Exec("BEGIN") on a one-connection pool or
// a pinned *sql.Conn is the README's pattern) whose MySQL session the
// server closed meanwhile (wait_timeout: the transaction rolled back):
// go-sql-driver/mysql's liveness check answers the next statement with
// driver.ErrBadConn, and sqlretry hands it to database/sql, which runs it
// on a new connection in autocommit. The first half of the transaction is
// gone, the second half commits, and COMMIT succeeds: a silent partial
// write, although sqlretry knows a transaction was open by hand.
func TestHandTxBadConnIsNotRunOutsideTx(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	db.SetMaxOpenConns(1)
	ctx := context.Background()
	for _, q := range []string{"BEGIN", "INSERT INTO a VALUES (1)"} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// The session died; the driver finds out before sending anything.
	srv.script("INSERT INTO b", step{err: driver.ErrBadConn})
	_, err := db.ExecContext(ctx, "INSERT INTO b VALUES (1)")
	if err == nil {
		t.Errorf("INSERT b after the hand-opened transaction died: err = nil, ran %d times on a new connection outside the transaction",
			srv.ranCount("INSERT INTO b"))
	}
}

// PostgreSQL, simple protocol: the dblink_exec ran and committed on the
// remote; the local INSERT is refused by a standby (25006; the server says
// it is in recovery). sqlretry hands the text to database/sql, which runs
// it again elsewhere: the remote write twice. The Unavailable row of
// decideAutocommit never looks at IsAtomic.
func TestUnavailableStandbyDblinkPartIsNotRerun(t *testing.T) {
	srv := newFakeServer()
	ro := &roServer{}
	ro.standby.Store(true)
	const q = "SELECT dblink_exec('primary', 'INSERT INTO remote_log VALUES (1)'); INSERT INTO t VALUES (1)"
	srv.script("SELECT dblink_exec", step{err: &pgError{"25006", "cannot execute INSERT in a read-only transaction"}, ran: true})
	db := roDB(t, srv, ro)
	_, err := db.ExecContext(context.Background(), q)
	if n := srv.ranCount("SELECT dblink_exec"); n != 1 {
		t.Errorf("the text ran %d times (err = %v), want 1: its dblink_exec had committed on the remote", n, err)
	}
}

// SELECTs of well-known extensions' functions that write (pgmq.send queues
// a message, cron.schedule adds a job, TimescaleDB's add_job adds a job,
// Citus's run_command_on_workers runs an SQL text on other servers, like
// dblink, outside this transaction) read as plain reads: after a lost
// connection they are run again, and the effect doubles.
func TestExtensionWriteFunctionsAreNotRerun(t *testing.T) {
	for _, q := range []string{
		"SELECT pgmq.send('orders', '{\"id\": 1}')",
		"SELECT cron.schedule('*/5 * * * *', 'DELETE FROM events WHERE at < now() - interval ''1 day''')",
		"SELECT add_job('refresh_totals', '1h')",
		"SELECT run_command_on_workers('UPDATE counters SET n = n + 1')",
		"SELECT pglogical.replicate_ddl_command('ALTER TABLE t ADD COLUMN c int')",
	} {
		t.Run(q[:20], func(t *testing.T) {
			srv := newFakeServer()
			srv.script(q, step{err: io.ErrUnexpectedEOF, ran: true})
			db, _ := testDB(t, srv)
			rows, err := db.QueryContext(context.Background(), q)
			if err == nil {
				rows.Close()
			}
			if n := srv.ranCount(q); n != 1 {
				t.Errorf("%s ran %d times (err = %v), want 1 and ErrAmbiguousCommit", q, n, err)
			}
		})
	}
}

// MySQL functions of its own components/plugins that write or take locks
// outside the transaction read as plain, atomic reads.
func TestMySQLComponentFunctionsAreNotReads(t *testing.T) {
	for _, q := range []string{
		"SELECT service_get_write_locks('ns', 'l', 10)", // locking service: like GET_LOCK
		"SELECT version_tokens_lock_exclusive('a', 10)",
		"SELECT version_tokens_set('a=1')",
		"SELECT keyring_key_generate('k', 'AES', 32)",
		"SELECT audit_log_filter_set_filter('f', '{}')",
		"SELECT asynchronous_connection_failover_add_source('ch', 'h', 3306, '', 50)",
		"SELECT group_replication_set_as_primary('uuid')",
	} {
		if isReadQuery(DialectMySQL, q) {
			t.Errorf("isReadQuery(%q) = true", q)
		}
	}
}
