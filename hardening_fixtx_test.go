package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// Item 1: a statement run with a NotIdempotent context inside a transaction
// counts as a write even when its text reads as a plain read (a SELECT of
// a function of the user's own that writes). A lost COMMIT of such a
// transaction is resolved, never replayed on the guess that it only read.
func TestNotIdempotentReadInsideATransactionCountsAsAWrite(t *testing.T) {
	marked := map[string]func(context.Context) context.Context{
		"NotIdempotent": NotIdempotent,
		"Idempotent(false)": func(ctx context.Context) context.Context {
			return context.WithValue(ctx, keyIdempotent, false)
		},
	}
	for name, mark := range marked {
		for _, tc := range []struct {
			name     string
			opts     []Option
			prepared bool
			want     error // nil: success after one run
		}{
			{"pg", nil, false, nil},
			{"pg prepared", nil, true, nil},
			{"mysql marker", []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("sqlretry_marker")}, false, nil},
			{"mysql no marker", []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("")}, false, ErrAmbiguousCommit},
		} {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				srv := newFakeServer()
				srv.script("COMMIT", step{err: errLost, ran: true}) // committed, reply lost
				db, _ := testDB(t, srv, tc.opts...)
				calls := 0
				err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					var rows *sql.Rows
					var err error
					if tc.prepared {
						st, perr := tx.PrepareContext(ctx, "SELECT f()")
						if perr != nil {
							return perr
						}
						defer st.Close()
						rows, err = st.QueryContext(mark(ctx))
					} else {
						rows, err = tx.QueryContext(mark(ctx), "SELECT f()")
					}
					if err != nil {
						return err
					}
					return rows.Close()
				})
				if n := srv.ranCount("SELECT f()"); n != 1 || calls != 1 {
					t.Fatalf("SELECT f() committed %d times in %d runs (err=%v): a lost COMMIT of a marked write was replayed", n, calls, err)
				}
				if tc.want == nil && err != nil {
					t.Fatalf("err = %v, want nil: the COMMIT was resolved as committed", err)
				}
				if tc.want != nil && !errors.Is(err, tc.want) {
					t.Fatalf("err = %v, want %v", err, tc.want)
				}
			})
		}
	}
	// The same read unmarked still counts as a read: replayed.
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		rows, err := tx.QueryContext(ctx, "SELECT n FROM t")
		if err != nil {
			return err
		}
		return rows.Close()
	})
	if err != nil || calls != 2 {
		t.Fatalf("an unmarked read: err=%v calls=%d, want a replay", err, calls)
	}
}

// escapeCase is a statement run inside a RunInTx closure: escapes says
// whether it ends or starts a transaction by itself (then part of the
// closure's work may already be committed).
type escapeCase struct {
	dialect Dialect
	stmt    string
	escapes bool
}

var escapeCases = []escapeCase{
	// Transaction control by hand, both dialects.
	{DialectPostgres, "COMMIT", true},
	{DialectPostgres, "commit work", true},
	{DialectPostgres, "END", true},
	{DialectPostgres, "COMMIT; BEGIN", true},
	{DialectPostgres, "COMMIT AND CHAIN", true},
	{DialectPostgres, "ROLLBACK", true},
	{DialectPostgres, "ABORT", true},
	{DialectPostgres, "PREPARE TRANSACTION 'x'", true},
	{DialectPostgres, "UPDATE a SET n = 1; COMMIT", true},
	{DialectPostgres, "/* c */ COMMIT", true},
	{DialectPostgres, "select 1;commit", true},
	{DialectMySQL, "DELETE FROM t;\nCOMMIT", true},
	{DialectMySQL, "COMMIT", true},
	{DialectMySQL, "COMMIT; BEGIN", true},
	{DialectMySQL, "START TRANSACTION", true},
	{DialectMySQL, "BEGIN", true},
	{DialectMySQL, "SET autocommit = 1", true},
	{DialectMySQL, "XA START 'x'", true},
	// MySQL's implicit commits.
	{DialectMySQL, "CREATE TABLE x (id int)", true},
	{DialectMySQL, "create index i on t (n)", true},
	{DialectMySQL, "ALTER TABLE t ADD COLUMN c int", true},
	{DialectMySQL, "DROP TABLE x", true},
	{DialectMySQL, "RENAME TABLE a TO b", true},
	{DialectMySQL, "TRUNCATE TABLE t", true},
	{DialectMySQL, "TRUNCATE t", true},
	{DialectMySQL, "LOCK TABLES t WRITE", true},
	{DialectMySQL, "UNLOCK TABLES", true},
	{DialectMySQL, "GRANT SELECT ON t TO u", true},
	{DialectMySQL, "REVOKE SELECT ON t FROM u", true},
	{DialectMySQL, "SET PASSWORD = PASSWORD('x')", true},
	{DialectMySQL, "FLUSH PRIVILEGES", true},
	{DialectMySQL, "ANALYZE TABLE t", true},
	{DialectMySQL, "OPTIMIZE TABLE t", true},
	{DialectMySQL, "REPAIR TABLE t", true},
	{DialectMySQL, "CHECK TABLE t", true},
	{DialectMySQL, "LOAD INDEX INTO CACHE t", true},
	{DialectMySQL, "CACHE INDEX t IN c", true},
	{DialectMySQL, "INSTALL PLUGIN p SONAME 'p.so'", true},
	{DialectMySQL, "/* c */ CREATE TABLE x (id int)", true},
	{DialectMySQL, "# c\nDROP TABLE x", true},
	{DialectMySQL, "/*!40000 ALTER TABLE t DISABLE KEYS */", true},
	{DialectMySQL, "UPDATE a SET n = 1; DROP TABLE x", true},
	{DialectUnknown, "CREATE TABLE x (id int)", true},
	// MariaDB spellings that hid an escape (attack9): COMMIT and ROLLBACK
	// in executed comments, the statement under SET STATEMENT ... FOR,
	// what runs inside REPEAT ... END REPEAT, SET DEFAULT ROLE.
	{DialectMySQL, "/*!COMMIT*/", true},
	{DialectMySQL, "/*!50000 COMMIT */", true},
	{DialectMySQL, "/*M! COMMIT */", true},
	{DialectMySQL, "/*M!100000 COMMIT */", true},
	{DialectMySQL, "/*M!100000 COMMIT WORK */", true},
	{DialectMySQL, "/*!ROLLBACK*/", true},
	{DialectMySQL, "/*!50000 ROLLBACK */", true},
	{DialectMySQL, "/*M! ROLLBACK */", true},
	{DialectMySQL, "/*M!100000 ROLLBACK */", true},
	{DialectMySQL, "/*M!100000 ROLLBACK WORK */", true},
	{DialectUnknown, "/*!COMMIT*/", true},
	{DialectUnknown, "/*M!100000 ROLLBACK */", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR COMMIT", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR ROLLBACK", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR BEGIN", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR START TRANSACTION", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR CREATE TABLE t1 (a int)", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR CALL pc()", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR GRANT SELECT ON *.* TO a9g", true},
	{DialectMySQL, "set statement max_statement_time=10, sql_mode='a FOR b' for drop table x", true},
	{DialectMySQL, "SET STATEMENT a = NEXT VALUE FOR s FOR TRUNCATE t", true},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR SET DEFAULT ROLE r FOR u", true},
	{DialectMySQL, "/*!SET STATEMENT sql_mode='' FOR COMMIT*/", true},
	{DialectMySQL, "/*!SET STATEMENT sql_mode='' FOR*/ CREATE TABLE x (a int)", true},
	{DialectMySQL, "/*M!100000 SET STATEMENT sql_mode='' FOR CREATE TABLE x (a int) */", true},
	{DialectMySQL, "SET STATEMENT a='x\\' FOR INSERT INTO t VALUES (1); -- ' FOR CREATE TABLE u (a int)", true},
	{DialectUnknown, "SET STATEMENT sql_mode='' FOR CREATE TABLE t1 (a int)", true},
	{DialectUnknown, "SET STATEMENT sql_mode='' FOR COMMIT", true},
	{DialectMySQL, "REPEAT COMMIT; UNTIL 1 END REPEAT", true},
	{DialectMySQL, "REPEAT CREATE TABLE t1 (a int); UNTIL 1 END REPEAT", true},
	{DialectMySQL, "REPEAT CALL pc(); UNTIL 1 END REPEAT", true},
	{DialectMySQL, "REPEAT ROLLBACK; UNTIL 1 END REPEAT", true},
	{DialectMySQL, "REPEAT SET autocommit = 0; UNTIL 1 END REPEAT", true},
	{DialectMySQL, "REPEAT START TRANSACTION; UNTIL 1 END REPEAT", true},
	{DialectMySQL, "repeat commit; until 1 end repeat", true},
	{DialectMySQL, "l1: REPEAT COMMIT; UNTIL 1 END REPEAT l1", true},
	{DialectUnknown, "REPEAT CREATE TABLE t1 (a int); UNTIL 1 END REPEAT", true},
	{DialectMySQL, "SET DEFAULT ROLE a9role FOR a9d", true},
	{DialectMySQL, "SET DEFAULT ROLE NONE FOR a9d", true},
	{DialectMySQL, "set default role r", true},
	{DialectMySQL, "/*!SET DEFAULT ROLE NONE */", true},
	{DialectUnknown, "SET DEFAULT ROLE NONE FOR a9d", true},
	// Not escapes: savepoints, reads and writes, PostgreSQL's
	// transactional DDL, MySQL's temporary tables.
	{DialectPostgres, "SAVEPOINT s1", false},
	{DialectPostgres, "ROLLBACK TO SAVEPOINT s1", false},
	{DialectPostgres, "RELEASE SAVEPOINT s1", false},
	{DialectPostgres, "CREATE TABLE x (id int)", false},
	{DialectPostgres, "LOCK TABLE t IN EXCLUSIVE MODE", false},
	{DialectPostgres, "SELECT 'COMMIT'", false},
	{DialectPostgres, "\n\tSELECT n FROM t", false},
	{DialectMySQL, "UPDATE t SET n = 1", false},
	{DialectMySQL, "SAVEPOINT s1", false},
	{DialectMySQL, "ROLLBACK TO SAVEPOINT s1", false},
	{DialectMySQL, "RELEASE SAVEPOINT s1", false},
	{DialectMySQL, "CREATE TEMPORARY TABLE x (id int)", false},
	{DialectMySQL, "DROP TEMPORARY TABLE x", false},
	{DialectMySQL, "SET @x = 1", false},
	{DialectMySQL, "INSERT INTO t VALUES ('CREATE TABLE')", false},
	{DialectMySQL, "SELECT * FROM t FOR UPDATE", false},
	{DialectMySQL, "ANALYZE SELECT * FROM t", false},
	{DialectMySQL, "SET STATEMENT sql_mode='' FOR INSERT INTO t VALUES (1)", false},
	{DialectMySQL, "SET STATEMENT max_statement_time=1 FOR UPDATE t SET n = 1", false},
	{DialectMySQL, "SET STATEMENT sql_mode='COMMIT' FOR SELECT * FROM t FOR UPDATE", false},
	{DialectMySQL, "SET STATEMENT sql_mode='CREATE' FOR ROLLBACK TO SAVEPOINT s1", false},
	{DialectMySQL, "/*!INSERT INTO t VALUES (1)*/", false},
	{DialectMySQL, "/*!ROLLBACK TO SAVEPOINT s1*/", false},
	{DialectMySQL, "SET ROLE r", false},
	{DialectMySQL, "SET default_storage_engine = InnoDB", false},
	{DialectMySQL, "SET @default = 1", false},
}

func (c escapeCase) name() string {
	return c.dialect.String() + ": " + c.stmt
}

// Item 2: a closure that commits part of its work itself (COMMIT by hand,
// or a statement that commits implicitly on MySQL), then meets a deadlock:
// replaying it from the start would write the committed part again.
func TestRunInTxDoesNotReplayAClosureThatCommittedPartOfItsWork(t *testing.T) {
	for _, tc := range escapeCases {
		t.Run(tc.name(), func(t *testing.T) {
			srv := newFakeServer()
			srv.handCommits = []string{tc.stmt}
			deadlock := error(errDeadlockMy)
			if tc.dialect == DialectPostgres {
				deadlock = errDeadlockPG
			}
			srv.script("UPDATE hot", step{err: deadlock})
			db, _ := testDB(t, srv, WithDialect(tc.dialect))
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO log VALUES ('once')"); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, tc.stmt); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "UPDATE hot SET n = n + 1")
				return err
			})
			if !tc.escapes {
				if err != nil || calls != 2 {
					t.Fatalf("err=%v calls=%d; want the deadlock replayed", err, calls)
				}
				return
			}
			if calls != 1 || srv.ranCount("INSERT INTO log") > 1 {
				t.Fatalf("calls=%d, log written %d times (err=%v): the closure was replayed after it committed part of its work", calls, srv.ranCount("INSERT INTO log"), err)
			}
			if !errors.Is(err, deadlock) {
				t.Fatalf("err = %v, want the deadlock", err)
			}
			if !strings.Contains(err.Error(), "committed part of its work itself") {
				t.Errorf("err = %v does not say why it was not replayed", err)
			}
		})
	}
}

// Item 2, the other ways an attempt can end: a lost connection before
// COMMIT, a statement that commits implicitly and fails all the same, and
// a lost final COMMIT (resolved "committed" is success, anything else is
// ErrAmbiguousCommit, never a replay).
func TestEscapedTransactionIsNeverReplayed(t *testing.T) {
	run := func(t *testing.T, srv *fakeServer, opts ...Option) (int, error) {
		db, _ := testDB(t, srv, opts...)
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			tx.ExecContext(ctx, "INSERT INTO log VALUES ('once')")
			tx.ExecContext(ctx, "commit") // lower case: the scripts for "COMMIT" are the final one's
			_, err := tx.ExecContext(ctx, "UPDATE hot SET n = n + 1")
			return err
		})
		return calls, err
	}
	t.Run("connection lost after the escape", func(t *testing.T) {
		srv := newFakeServer()
		srv.handCommits = []string{"commit"}
		srv.script("UPDATE hot", step{err: errLost})
		calls, err := run(t, srv)
		if calls != 1 || !errors.Is(err, errLost) {
			t.Fatalf("calls=%d err=%v; want no replay", calls, err)
		}
	})
	t.Run("implicit commit by a failing DDL", func(t *testing.T) {
		srv := newFakeServer()
		srv.handCommits = []string{"CREATE TABLE"}
		exists := &mysql.MySQLError{Number: 1050, Message: "Table 'x' already exists"}
		srv.script("CREATE TABLE", step{err: exists, ran: true})
		srv.script("UPDATE hot", step{err: errDeadlockMy})
		db, _ := testDB(t, srv, WithDialect(DialectMySQL))
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			tx.ExecContext(ctx, "INSERT INTO log VALUES ('once')")
			tx.ExecContext(ctx, "CREATE TABLE x (id int)") // exists: fine by the caller
			_, err := tx.ExecContext(ctx, "UPDATE hot SET n = n + 1")
			return err
		})
		if calls != 1 || srv.ranCount("INSERT INTO log") != 1 || !errors.Is(err, errDeadlockMy) {
			t.Fatalf("calls=%d log=%d err=%v; want no replay", calls, srv.ranCount("INSERT INTO log"), err)
		}
	})
	for _, tc := range []struct {
		name string
		ran  bool
		opts []Option
		want error
	}{
		{"lost COMMIT resolved committed", true, nil, nil},
		{"lost COMMIT resolved not committed", false, nil, ErrAmbiguousCommit},
		{"lost COMMIT unresolved", true, []Option{WithCommitResolution(false)}, ErrAmbiguousCommit},
		{"lost COMMIT, mysql marker, committed", true, []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("sqlretry_marker")}, nil},
		{"lost COMMIT, mysql marker, not committed", false, []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("sqlretry_marker")}, ErrAmbiguousCommit},
		{"lost COMMIT, mysql no marker", true, []Option{WithDialect(DialectMySQL), WithMySQLCommitMarker("")}, ErrAmbiguousCommit},
		{"read only", false, nil, ErrAmbiguousCommit},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.handCommits = []string{"commit"}
			srv.script("COMMIT", step{err: errLost, ran: tc.ran})
			if tc.name == "read only" {
				srv.inRecovery = true // no transaction id: nothing durable, were it not for the escape
			}
			calls, err := run(t, srv, tc.opts...)
			if calls != 1 || srv.ranCount("INSERT INTO log") != 1 {
				t.Fatalf("calls=%d log=%d err=%v; want one run", calls, srv.ranCount("INSERT INTO log"), err)
			}
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

// Item 3: a closure that ends the transaction itself. RunInTx's own
// COMMIT then gets sql.ErrTxDone; it returns the closure's outcome and
// never replays.
func TestRunInTxClosureThatCommitsItself(t *testing.T) {
	for _, tc := range []struct {
		name   string
		commit step // the closure's COMMIT
		opts   []Option
		end    func(tx *sql.Tx) error // what the closure does at its end
		want   error                  // nil: success
		wantIs error
	}{
		{"commit, return its error", step{}, nil, func(tx *sql.Tx) error { return tx.Commit() }, nil, nil},
		{"commit, return nil", step{}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, nil, nil},
		{"lost commit resolved committed", step{err: errLost, ran: true}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, nil, nil},
		{"lost commit unresolved", step{err: errLost, ran: true}, []Option{WithCommitResolution(false)}, func(tx *sql.Tx) error { tx.Commit(); return nil }, ErrAmbiguousCommit, ErrAmbiguousCommit},
		{"commit refused", step{err: errSerialization}, nil, func(tx *sql.Tx) error { tx.Commit(); return nil }, errSerialization, errSerialization},
		{"rollback, return nil", step{}, nil, func(tx *sql.Tx) error { tx.Rollback(); return nil }, sql.ErrTxDone, sql.ErrTxDone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("COMMIT", tc.commit)
			db, _ := testDB(t, srv, tc.opts...)
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO log VALUES ('once')"); err != nil {
					return err
				}
				return tc.end(tx)
			})
			if calls != 1 {
				t.Fatalf("calls = %d (err=%v); want no replay", calls, err)
			}
			if tc.want == nil {
				if err != nil {
					t.Fatalf("err = %v; the closure's COMMIT succeeded", err)
				}
				return
			}
			if !errors.Is(err, tc.wantIs) {
				t.Fatalf("err = %v, want %v", err, tc.wantIs)
			}
		})
	}
}

// A statement inside a transaction that leaves the session out of plain
// autocommit for good (SET autocommit = 0, SET completion_type on MySQL)
// outlives the transaction: the connection goes back to the pool in
// manual mode, and sqlretry must not retry its autocommit statements
// from then on (as when the same statement runs outside a transaction).
func TestSessionLeftManualInsideATransactionTurnsStatementRetriesOff(t *testing.T) {
	for _, stmt := range []string{"SET autocommit = 0", "SET SESSION completion_type = 'CHAIN'"} {
		t.Run(stmt, func(t *testing.T) {
			srv := newFakeServer()
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			db.SetMaxOpenConns(1)
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(stmt); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			srv.script("UPDATE", step{err: errDeadlockMy})
			if _, err := db.Exec("UPDATE t SET n = 1"); !errors.Is(err, errDeadlockMy) {
				t.Fatalf("err = %v; want the deadlock returned: the session is no longer in autocommit", err)
			}
		})
	}
}

// Outside a transaction, a statement that controls transactions itself (a
// CALL, an anonymous block or EXECUTE IMMEDIATE that may commit inside, a
// COMMIT typed by hand) and loses its connection after it was sent may
// have committed: the error matches ErrAmbiguousCommit, not the driver's
// bare one (attack9: "invalid connection" for CALL, EXECUTE IMMEDIATE and
// BEGIN NOT ATOMIC; a caller that resubmits on other errors wrote twice).
func TestLostTransactionControlStatementIsAmbiguous(t *testing.T) {
	for _, tc := range []struct {
		dialect Dialect
		stmts   []string
	}{
		{DialectMySQL, []string{"CALL p()"}},
		{DialectMySQL, []string{"BEGIN NOT ATOMIC INSERT INTO t VALUES (1); END"}},
		{DialectMySQL, []string{"BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"}},
		{DialectPostgres, []string{"CALL p()"}},
	} {
		last := tc.stmts[len(tc.stmts)-1]
		t.Run(last, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(last, step{err: errLost, ran: true})
			db, _ := testDB(t, srv, WithDialect(tc.dialect))
			conn, err := db.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			for _, q := range tc.stmts {
				_, err = conn.ExecContext(context.Background(), q)
			}
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("%s lost after it was sent: %v, want ErrAmbiguousCommit", last, err)
			}
			if n := srv.ranCount(last); n != 1 {
				t.Fatalf("%s ran %d times", last, n)
			}
		})
	}
}
