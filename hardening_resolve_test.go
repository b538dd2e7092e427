package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// Issue 15.1: a transaction that has no local transaction id (NOTIFY only,
// writes through postgres_fdw) still has a COMMIT that decides what
// happens. Its lost COMMIT is resolved, not taken for "wrote nothing".
func TestLostCommitWithoutALocalTransactionIDIsResolved(t *testing.T) {
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "NOTIFY jobs") // takes no transaction id
		return err
	})
	if err != nil || calls != 1 || srv.ranCount("NOTIFY") != 1 {
		t.Fatalf("err=%v calls=%d notifications=%d; want success after one run (it committed)", err, calls, srv.ranCount("NOTIFY"))
	}
}

// On a standby (in recovery) no transaction can commit anything durable
// and none gets an id: a lost COMMIT there is replayed, not ambiguous.
func TestLostCommitOnAStandbyIsReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.inRecovery = true
	srv.script("COMMIT", step{err: errLost})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, &sql.TxOptions{ReadOnly: true}, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "SELECT report()")
		return err
	})
	if err != nil || calls != 2 {
		t.Fatalf("err=%v calls=%d; want one replay", err, calls)
	}
}

// Issue 9.9: a caller's own deadline, or a cancelled query, while sqlretry
// asks for the transaction id says nothing about the engine: resolution
// stays on, and a later lost COMMIT is resolved.
func TestCallersDeadlinesDoNotTurnResolutionOff(t *testing.T) {
	for _, cause := range []error{context.DeadlineExceeded, &pgError{"57014", "canceling statement due to user request"}, &pgError{"53200", "out of shared memory"}} {
		t.Run(cause.Error(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script(pgAskXID, step{err: cause}, step{err: cause}, step{err: cause})
			db, _ := testDB(t, srv)
			insert := func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
				return err
			}
			for range 3 {
				err := RunInTx(context.Background(), db, nil, insert)
				if err == nil || errors.Is(err, ErrAmbiguousCommit) {
					t.Fatalf("RunInTx = %v, want the lookup's failure", err)
				}
			}
			if retrierOf(db).resolution.broken.Load() {
				t.Fatal("resolution was turned off by an error that is not the engine's")
			}
			srv.script("COMMIT", step{err: errLost, ran: true})
			if err := RunInTx(context.Background(), db, nil, insert); err != nil {
				t.Fatalf("lost COMMIT that committed: %v, want success", err)
			}
		})
	}
}

// The rule across issue 15: a failure of sqlretry's own lookup before
// COMMIT is no reason to replay the caller's transaction.
func TestResolutionLookupFailureIsNotReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script(pgAskXID, step{err: &pgError{"54000", "database is not accepting commands to avoid wraparound data loss"}})
	db, _ := testDB(t, srv)
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	var pg *pgError
	if calls != 1 || !errors.As(err, &pg) || pg.code != "54000" {
		t.Fatalf("err=%v calls=%d; want the server's 54000 after one run", err, calls)
	}
}

// hookConnector hands out fake connections whose COMMIT first runs
// onCommit (the caller's deadline passing while COMMIT is in flight).
type hookConnector struct {
	fakeConnector
	onCommit func()
}

func (c *hookConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &hookConn{fakeConn: dc.(*fakeConn), onCommit: c.onCommit}, nil
}

type hookConn struct {
	*fakeConn
	onCommit func()
}

func (c *hookConn) BeginTx(ctx context.Context, o driver.TxOptions) (driver.Tx, error) {
	itx, err := c.fakeConn.BeginTx(ctx, o)
	if err != nil {
		return nil, err
	}
	return &hookTx{Tx: itx, onCommit: c.onCommit}, nil
}

type hookTx struct {
	driver.Tx
	onCommit func()
}

func (t *hookTx) Commit() error {
	if t.onCommit != nil {
		t.onCommit()
	}
	return t.Tx.Commit()
}

// Issue 9.4: a deadline that expires while COMMIT is in flight (pgx gives
// up waiting for the reply; the server committed) is ErrAmbiguousCommit and
// the deadline, never a plain failure.
func TestDeadlineDuringCommitIsAmbiguous(t *testing.T) {
	srv := newFakeServer()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	// What pgx returns when the deadline cuts the wait for COMMIT's reply.
	srv.script("COMMIT", step{err: &timeoutError{context.DeadlineExceeded}, ran: true})
	wc, err := WrapConnector(&hookConnector{fakeConnector: fakeConnector{srv: srv}, onCommit: func() { <-ctx.Done() }},
		WithClock(newFakeClock()), WithDialect(DialectPostgres))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	defer db.Close()
	calls := 0
	err = RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	if !errors.Is(err, ErrAmbiguousCommit) || !errors.Is(err, context.DeadlineExceeded) || calls != 1 {
		t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and context.DeadlineExceeded, one run", err, calls)
	}
}

// A deadline that passed before COMMIT was sent: COMMIT is not sent, the
// transaction is known not to have committed.
func TestDeadlineBeforeCommitSendsNoCommit(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	cancel()
	err = tx.Commit()
	if errors.Is(err, ErrAmbiguousCommit) || srv.committed != 0 {
		t.Fatalf("Commit = %v, committed = %d; want a plain failure and no COMMIT", err, srv.committed)
	}
}

// timeoutError is a net-style timeout that wraps the context's error, as
// pgconn's is.
type timeoutError struct{ err error }

func (e *timeoutError) Error() string   { return "timeout: " + e.err.Error() }
func (e *timeoutError) Timeout() bool   { return true }
func (e *timeoutError) Temporary() bool { return false }
func (e *timeoutError) Unwrap() error   { return e.err }

// markerConnector is a MySQL-like fake for the commit marker: DATABASE(),
// information_schema and CONNECTION_ID answer as configured, and the
// clean-up's DELETE can be made to block until its context ends.
type markerConnector struct {
	fakeConnector
	database     driver.Value // DATABASE(): nil is "no database selected"
	tableExists  bool
	blockCleanup bool
	cleanups     atomic.Int32
	cleanupEnded chan struct{}
}

func (c *markerConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &markerConn{fakeConn: dc.(*fakeConn), mc: c}, nil
}

type markerConn struct {
	*fakeConn
	mc *markerConnector
}

func (c *markerConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	q = fakeOwn(q)
	one := func(v driver.Value) (driver.Rows, error) {
		return &fakeRows{cols: []string{"v"}, data: [][]driver.Value{{v}}}, nil
	}
	switch {
	case q == "SELECT DATABASE()":
		return one(c.mc.database)
	case strings.HasPrefix(q, "SELECT COUNT(*) FROM information_schema.TABLES"):
		if c.mc.tableExists {
			return one(int64(1))
		}
		return one(int64(0))
	case q == "SELECT CONNECTION_ID()":
		if err := c.run(ctx, q); err != nil {
			return nil, err
		}
		return one(c.pid)
	}
	return c.fakeConn.QueryContext(ctx, q, args)
}

func (c *markerConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	q = fakeOwn(q)
	if strings.HasPrefix(q, "DELETE FROM") && strings.Contains(q, "created_at") {
		c.mc.cleanups.Add(1)
		if c.mc.blockCleanup {
			select { // a row lock held by another session
			case <-ctx.Done():
				close(c.mc.cleanupEnded)
				return nil, ctx.Err()
			case <-time.After(3 * time.Second):
				return nil, &mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded; try restarting transaction"}
			}
		}
	}
	return c.fakeConn.ExecContext(ctx, q, args)
}

func markerDB(t *testing.T, mc *markerConnector, opts ...Option) *sql.DB {
	t.Helper()
	all := append([]Option{WithClock(newFakeClock()), WithDialect(DialectMySQL)}, opts...)
	wc, err := WrapConnector(mc, all...)
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	return db
}

func insertOnce(db *sql.DB, txOpts *sql.TxOptions, stmt string) (calls int, err error) {
	err = RunInTx(context.Background(), db, txOpts, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, stmt)
		return err
	})
	return calls, err
}

var (
	errCreateDenied = &mysql.MySQLError{Number: 1142, Message: "CREATE command denied to user 'app'@'localhost' for table `test`.`m`"}
	errReadOnlyTx   = &mysql.MySQLError{Number: 1792, Message: "Cannot execute statement in a READ ONLY transaction"}
)

// Issue 15.2 and 15.5: the marker's name is qualified with the DSN's
// database once, so USE in a closure cannot move it; with no database
// there is nowhere to put it: a configuration error, at once, saying what
// to do, and never a replay.
func TestMarkerIsQualifiedOnceOrAConfigurationError(t *testing.T) {
	t.Run("qualified with the DSN's database", func(t *testing.T) {
		srv := newFakeServer()
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d", err, calls)
		}
		if srv.ranCount("INSERT INTO `test`.`m`") != 1 {
			t.Fatalf("ran %q; want the marker in `test`.`m`", srv.ran)
		}
	})
	t.Run("no database", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO m", step{err: &mysql.MySQLError{Number: 1046, Message: "No database selected"}})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: nil}, WithMySQLCommitMarker("m"))
		for i := range 3 {
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			var cfg *configError
			if calls != 1 || !errors.As(err, &cfg) || !strings.Contains(err.Error(), `WithMySQLCommitMarker("db.m")`) {
				t.Fatalf("call %d: err=%v calls=%d; want a configuration error that says what to do, one run", i, err, calls)
			}
		}
		if srv.dials > 2 {
			t.Errorf("%d dials: the configuration error was not remembered", srv.dials)
		}
	})
}

// Issue 15.4: a marker table that a DBA created, with SELECT, INSERT and
// DELETE granted and no CREATE, works; a missing one that cannot be created
// is a configuration error, never replays.
func TestMarkerNeedsNoCreatePrivilegeWhenTheTableExists(t *testing.T) {
	t.Run("exists", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("CREATE TABLE", step{err: errCreateDenied})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d; want success in one run", err, calls)
		}
	})
	t.Run("missing and cannot be created", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("CREATE TABLE", step{err: errCreateDenied})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test"}, WithMySQLCommitMarker("m"))
		calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
		var cfg *configError
		if calls != 1 || !errors.As(err, &cfg) || !errors.Is(err, errCreateDenied) {
			t.Fatalf("err=%v calls=%d; want a configuration error with the server's 1142, one run", err, calls)
		}
		if retrierOf(db).counters.retriesTransaction.Load() != 0 {
			t.Error("the configuration error was replayed")
		}
	})
	t.Run("no DELETE", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("DELETE FROM `test`.`m` WHERE 1=0", step{err: &mysql.MySQLError{Number: 1142, Message: "DELETE command denied"}})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
		var cfg *configError
		if calls != 1 || !errors.As(err, &cfg) {
			t.Fatalf("err=%v calls=%d; want a configuration error, one run", err, calls)
		}
	})
	t.Run("revoked after the check", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO `test`.`m`", step{err: &mysql.MySQLError{Number: 1142, Message: "INSERT command denied"}})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
		var cfg *configError
		if calls != 1 || !errors.As(err, &cfg) {
			t.Fatalf("err=%v calls=%d; want a configuration error, one run", err, calls)
		}
		if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
			t.Fatalf("after the grant: err=%v calls=%d", err, calls)
		}
	})
}

// Issue 15.6: a read-only transaction needs no marker (MySQL refuses table
// writes in it), whether the caller declared it or the session made it so.
func TestReadOnlyTransactionsGetNoMarker(t *testing.T) {
	t.Run("declared", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO", step{err: errReadOnlyTx}, step{err: errReadOnlyTx})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		if calls, err := insertOnce(db, &sql.TxOptions{ReadOnly: true}, "SET @x := 1"); err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d; want success in one run", err, calls)
		}
	})
	t.Run("by the session", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO", step{err: errReadOnlyTx}, step{err: errReadOnlyTx})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		if calls, err := insertOnce(db, nil, "SET @x := 1"); err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d; want success in one run", err, calls)
		}
	})
}

// Issue 15.7: the clean-up of old marker rows runs off the caller's path:
// a clean-up stuck behind a row lock delays no COMMIT, and closing the db
// stops it.
func TestMarkerCleanupIsOffTheCallersPath(t *testing.T) {
	srv := newFakeServer()
	mc := &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true, blockCleanup: true, cleanupEnded: make(chan struct{})}
	wc, err := WrapConnector(mc, WithDialect(DialectMySQL), WithMySQLCommitMarker("m"))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	var slowest time.Duration
	for i := range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		start := time.Now()
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
			return err
		})
		slowest = max(slowest, time.Since(start))
		cancel()
		if err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
	}
	// A clean-up on the caller's path blocks that commit until its 1 s
	// deadline (an error above); 800 ms leaves room for a loaded machine
	// (200 ms was exceeded there: 329 ms).
	if slowest > 800*time.Millisecond {
		t.Errorf("slowest commit took %v: the clean-up is on the caller's path", slowest)
	}
	for i := 0; i < 100 && mc.cleanups.Load() == 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if mc.cleanups.Load() == 0 {
		t.Fatal("no clean-up ran after 300 commits")
	}
	db.Close()
	select {
	case <-mc.cleanupEnded:
	case <-time.After(2 * time.Second):
		t.Fatal("closing the db did not stop the clean-up")
	}
}

// The resolution's event says how the outcome was found, so that a log
// of an ErrAmbiguousCommit tells why it could not be known.
func TestCommitResolutionEventSaysHow(t *testing.T) {
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	var reasons []string
	db, _ := testDB(t, srv, WithObserver(ObserverFunc(func(_ context.Context, e Event) {
		if e.Kind == EventCommitResolved {
			reasons = append(reasons, e.Reason)
		}
	})))
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(reasons) != 1 || !strings.Contains(reasons[0], "asked by the transaction id on a new connection (1 question(s))") {
		t.Errorf("reasons = %q, want how the outcome was found", reasons)
	}
}
