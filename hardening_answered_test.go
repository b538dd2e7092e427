package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// A server that answered a statement is up: an error it returned for the
// statement is that statement's, whatever its code says, unless the
// session really ended (PostgreSQL sends the error at FATAL and closes the
// connection; a killed MySQL session is closed).

// pgSevError is a PostgreSQL error with its severity, as *pgconn.PgError
// and *pq.Error carry it.
type pgSevError struct{ Severity, Code, Message string }

func (e *pgSevError) Error() string {
	return e.Severity + ": " + e.Message + " (SQLSTATE " + e.Code + ")"
}
func (e *pgSevError) SQLState() string { return e.Code }

// pgSessionCodes are the SQLSTATEs of an ended session or a refused one:
// a user function can raise any of them at ERROR on a live session.
var pgSessionCodes = []string{"57P01", "57P02", "57P03", "53300", "57P05", "08000", "08003", "08006", "25P03", "25P04"}

// mySessionNumbers are the numbers of an ended or refused MySQL session: a
// SIGNAL can raise any of them on a live one.
var mySessionNumbers = []uint16{1927, 1053, 1080, 1152, 1158, 1159, 1160, 1161, 1040, 1203, 4031}

// left is how many of a script's steps were not used: each attempt uses one.
func left(srv *fakeServer, prefix string) int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return len(srv.scripts[prefix])
}

// checkAnswered runs the statement that fails with err (scripted under
// prefix) in autocommit as a read and as a write, and in RunInTx, and
// checks that each ran once and returned err itself, that the connection
// was kept, and that the breaker did not count it.
func checkAnswered(t *testing.T, err error, opts ...Option) {
	t.Helper()
	srv := newFakeServer()
	const n = 60
	for range n {
		srv.script("SELECT f()", step{err: err})
		srv.script("INSERT INTO t SELECT f()", step{err: err})
	}
	db, _ := testDB(t, srv, opts...)
	ctx := context.Background()
	used := 0
	for i := range 10 {
		_, got := db.QueryContext(ctx, "SELECT f()")
		used++
		if !errors.Is(got, err) || errors.Is(got, ErrAmbiguousCommit) || left(srv, "SELECT f()") != n-used {
			t.Fatalf("read %d: err = %v, ran %d times; want the statement's error at once", i, got, n-left(srv, "SELECT f()")-used+1)
		}
		var own *Error
		if errors.As(got, &own) {
			t.Fatalf("read %d: err = %v is sqlretry's verdict; want the server's answer unchanged", i, got)
		}
	}
	for i := range 10 {
		_, got := db.ExecContext(ctx, "INSERT INTO t SELECT f()")
		if !errors.Is(got, err) || errors.Is(got, ErrAmbiguousCommit) || left(srv, "INSERT INTO t SELECT f()") != n-i-1 {
			t.Fatalf("write %d: err = %v; want the statement's error at once, never ambiguous", i, got)
		}
	}
	calls := 0
	got := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO t SELECT f()")
		return err
	})
	if calls != 1 || !errors.Is(got, err) {
		t.Fatalf("RunInTx: %d runs, err = %v; want one run and the statement's error", calls, got)
	}
	if _, err := db.ExecContext(ctx, "SELECT 1"); err != nil {
		t.Fatalf("SELECT 1 after the statement errors: %v (the breaker counted a server that answered)", err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed || s.HandOffs != 0 {
		t.Errorf("breaker %v, hand-offs %d; want closed, 0", s.Breaker, s.HandOffs)
	}
	if srv.dials != 1 {
		t.Errorf("dials = %d; the live connection was discarded", srv.dials)
	}
}

func TestConnectionCodesAnsweredOnALiveSessionAreTheStatements(t *testing.T) {
	for _, code := range pgSessionCodes {
		t.Run("pg "+code, func(t *testing.T) {
			checkAnswered(t, &pgSevError{"ERROR", code, "raised by a user function"})
		})
	}
	for _, num := range mySessionNumbers {
		t.Run(fmt.Sprint("mysql ", num), func(t *testing.T) {
			checkAnswered(t, &mysql.MySQLError{Number: num, Message: "raised by SIGNAL"}, WithDialect(DialectMySQL))
		})
	}
}

// The real ones end the session: they keep their meaning.
func TestConnectionCodesOfAnEndedSessionKeepTheirMeaning(t *testing.T) {
	my := []Option{WithDialect(DialectMySQL)}
	cases := []struct {
		name string
		err  error
		opts []Option
		kill bool // the driver notices at its next use (go-sql-driver/mysql), not at once (pgx)
	}{
		{"pg FATAL 57P01", &pgSevError{"FATAL", "57P01", "terminating connection due to administrator command"}, nil, false},
		{"pg PANIC 57P02", &pgSevError{"PANIC", "57P02", "terminating connection because of crash of another server process"}, nil, false},
		{"mysql 1927 killed", &mysql.MySQLError{Number: 1927, Message: "Connection was killed"}, my, true},
		{"mysql 1053 shutdown", &mysql.MySQLError{Number: 1053, Message: "Server shutdown in progress"}, my, true},
		{"mysql 1158 network", &mysql.MySQLError{Number: 1158, Message: "Got an error reading communication packets"}, my, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := newFakeServer()
			srv.script("SELECT f()", step{err: tc.err, closes: !tc.kill, kills: tc.kill})
			srv.script("INSERT INTO t", step{err: tc.err, closes: !tc.kill, kills: tc.kill, ran: true})
			srv.script("UPDATE t", step{err: tc.err, closes: !tc.kill, kills: tc.kill})
			db, _ := testDB(t, srv, tc.opts...)
			rows, err := db.QueryContext(ctx, "SELECT f()")
			if err != nil {
				t.Fatalf("read: %v; want it re-run on another connection", err)
			}
			rows.Close()
			if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("write: err = %v; want ErrAmbiguousCommit", err)
			}
			calls := 0
			err = RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
				return err
			})
			if err != nil || calls != 2 {
				t.Fatalf("RunInTx: %d runs, err = %v; want a replay that succeeds", calls, err)
			}
		})
	}
}

// In autocommit there is no transaction to replay: a 25P02 there is raised
// by the statement itself.
func TestInFailedTransactionCodeInAutocommitIsTheStatements(t *testing.T) {
	for _, err := range []error{&pgError{"25P02", "raised by a user function"}, &pgSevError{"ERROR", "25P02", "raised by a user function"}} {
		srv := newFakeServer()
		for range 10 {
			srv.script("SELECT f()", step{err: err})
		}
		db, _ := testDB(t, srv)
		_, got := db.Query("SELECT f()")
		if !errors.Is(got, err) || left(srv, "SELECT f()") != 9 {
			t.Fatalf("err = %v, ran %d times; want the statement's error at once", got, 10-left(srv, "SELECT f()"))
		}
	}
}

// A real refusal (FATAL from PostgreSQL or a pooler, MySQL's too many
// connections with the session closed) still sends the work to another
// connection.
func TestRefusalsOfAnEndedSessionKeepTheirMeaning(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		opts []Option
		kill bool
	}{
		{"pg FATAL 53300", &pgSevError{"FATAL", "53300", "sorry, too many clients already"}, nil, false},
		{"pg FATAL 57P03", &pgSevError{"FATAL", "57P03", "the database system is starting up"}, nil, false},
		{"mysql 1040", &mysql.MySQLError{Number: 1040, Message: "Too many connections"}, []Option{WithDialect(DialectMySQL)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := newFakeServer()
			srv.script("INSERT INTO t", step{err: tc.err, closes: !tc.kill, kills: tc.kill})
			srv.script("UPDATE t", step{err: tc.err, closes: !tc.kill, kills: tc.kill})
			db, _ := testDB(t, srv, tc.opts...)
			if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil || srv.ranCount("INSERT") != 1 {
				t.Fatalf("write: err = %v, ran %d; want it run on another connection", err, srv.ranCount("INSERT"))
			}
			calls := 0
			err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
				return err
			})
			if err != nil || calls != 2 {
				t.Fatalf("RunInTx: %d runs, err = %v; want a replay that succeeds", calls, err)
			}
		})
	}
}

// An autocommit write whose reply the caller's deadline cut may have run
// (a COMMIT waiting for a synchronous standby, a lock): the caller must
// learn that, never get a plain failure. A read so cut is a plain
// deadline; so is a write the server answered, and one never sent.
func TestAutocommitWriteCutByTheCallersDeadlineIsAmbiguous(t *testing.T) {
	for _, dialect := range []Dialect{DialectPostgres, DialectMySQL} {
		srv := newFakeServer()
		srv.script("INSERT", step{block: true})
		srv.script("CALL", step{block: true})
		srv.script("SELECT", step{block: true})
		srv.script("UPDATE", step{block: true})
		db, _ := testDB(t, srv, WithDialect(dialect))
		for _, q := range []string{"INSERT INTO t VALUES (1)", "CALL p()"} {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			_, err := db.ExecContext(ctx, q)
			cancel()
			if !errors.Is(err, ErrAmbiguousCommit) || !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%v %q: err = %v; want ErrAmbiguousCommit and context.DeadlineExceeded", dialect, q, err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err := db.QueryContext(ctx, "SELECT n FROM t")
		if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrAmbiguousCommit) {
			t.Errorf("%v read: err = %v; want the deadline, not ambiguous", dialect, err)
		}
		_, err = db.ExecContext(Idempotent(ctx), "UPDATE t SET n = 1")
		if errors.Is(err, ErrAmbiguousCommit) {
			t.Errorf("%v idempotent write: err = %v; the caller vouched for it", dialect, err)
		}
		cancel()
		// In a transaction opened by hand the write did not commit.
		conn, err := db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.ExecContext(context.Background(), "BEGIN"); err != nil {
			t.Fatal(err)
		}
		srv.script("INSERT", step{block: true})
		ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
		if _, err := conn.ExecContext(ctx, "INSERT INTO t VALUES (3)"); errors.Is(err, ErrAmbiguousCommit) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%v write in a transaction opened by hand: err = %v; want the deadline alone", dialect, err)
		}
		cancel()
		conn.Close()
		srv.script("INSERT", step{err: errUnique})
		ctx, cancel = context.WithCancel(context.Background())
		cancel()
		if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (2)"); errors.Is(err, ErrAmbiguousCommit) {
			t.Errorf("%v write never sent: err = %v", dialect, err)
		}
	}
}

// Contention is answered at ERROR too: a deadlock or a serialization
// failure with its severity keeps its class.
func TestContentionAtErrorSeverityIsStillRetried(t *testing.T) {
	for _, code := range []string{"40001", "40P01", "55P03"} {
		err := &pgSevError{"ERROR", code, "contention"}
		srv := newFakeServer()
		srv.script("UPDATE t", step{err: err})
		db, _ := testDB(t, srv)
		if _, got := db.Exec("UPDATE t SET n = 1"); got != nil {
			t.Errorf("%s autocommit: %v; want it retried", code, got)
		}
		srv.script("UPDATE t", step{err: err})
		calls := 0
		got := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "UPDATE t SET n = 1")
			return err
		})
		if got != nil || calls != 2 {
			t.Errorf("%s RunInTx: %d runs, err = %v; want a replay", code, calls, got)
		}
	}
}
