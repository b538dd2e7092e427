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

// Issue 9, items 5 and 6, and two "clear errors" bullets: what a healthy
// server answered is the statement's; read-only is the user's unless the
// server says it is a standby; a hand-off says what happened.

// roServer answers sqlretry's read-only question like a real server: a
// PostgreSQL transaction aborted by 25006 answers nothing until rolled back.
type roServer struct {
	standby  atomic.Bool // pg_is_in_recovery() / @@global.read_only
	userRO   atomic.Bool // the session was made read-only by the user
	asked    atomic.Int64
	askedInA atomic.Int64 // questions sent inside an aborted transaction
}

type roConnector struct {
	fakeConnector
	ro *roServer
}

func (c *roConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &roConn{fakeConn: dc.(*fakeConn), ro: c.ro}, nil
}

type roConn struct {
	*fakeConn
	ro      *roServer
	aborted bool
}

func (c *roConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	res, err := c.fakeConn.ExecContext(ctx, q, args)
	if err != nil && c.inTx {
		c.aborted = true
	}
	return res, err
}

func (c *roConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	c.aborted = false
	return c.fakeConn.BeginTx(ctx, opts)
}

func (c *roConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	on := func(b bool) driver.Value {
		if b {
			return []byte("ON")
		}
		return []byte("OFF")
	}
	switch q {
	case pgReadOnlyQuery:
		c.ro.asked.Add(1)
		if c.inTx && c.aborted {
			c.ro.askedInA.Add(1)
			return nil, &pgError{"25P02", "current transaction is aborted, commands ignored until end of transaction block"}
		}
		return &fakeRows{cols: []string{"server", "user"}, data: [][]driver.Value{{c.ro.standby.Load(), c.ro.userRO.Load()}}}, nil
	case mysqlReadOnlyQuery:
		c.ro.asked.Add(1)
		return &fakeRows{cols: []string{"Variable_name", "Value"}, data: [][]driver.Value{
			{[]byte("innodb_read_only"), on(false)}, {[]byte("read_only"), on(c.ro.standby.Load())}, {[]byte("tx_read_only"), on(c.ro.userRO.Load())},
		}}, nil
	}
	return c.fakeConn.QueryContext(ctx, q, args)
}

func roDB(t *testing.T, srv *fakeServer, ro *roServer, opts ...Option) *sql.DB {
	t.Helper()
	all := append([]Option{WithClock(newFakeClock()), WithDialect(DialectPostgres)}, opts...)
	wc, err := WrapConnector(&roConnector{fakeConnector: fakeConnector{srv: srv}, ro: ro}, all...)
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	return db
}

// othersStillServed: the breaker is closed and another caller's SELECT 1
// goes through.
func othersStillServed(t *testing.T, db *sql.DB) {
	t.Helper()
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker %v, want closed", s.Breaker)
	}
	if _, err := db.Query("SELECT 1"); err != nil {
		t.Errorf("another caller's SELECT 1: %v", err)
	}
}

// A resource limit or a relayed connection error that a healthy server
// answered for a statement: one attempt, the server's own error, the
// connection kept, the breaker closed, for autocommit and RunInTx alike.
func TestClassifyServerAnswerIsTheStatements(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		dialect Dialect
	}{
		{"pg 53200 out of shared memory", &pgError{"53200", "out of shared memory"}, DialectPostgres},
		{"pg 53400 temp_file_limit", &pgError{"53400", "temporary file size exceeds temp_file_limit (1024kB)"}, DialectPostgres},
		{"pg 53100 disk full", &pgError{"53100", "could not extend file: No space left on device"}, DialectPostgres},
		{"pg 53000 insufficient resources", &pgError{"53000", "insufficient resources"}, DialectPostgres},
		{"pg 58030 io error", &pgError{"58030", "could not read block"}, DialectPostgres},
		{"pg 58000 system error", &pgError{"58000", "system error"}, DialectPostgres},
		{"pg 08001 dblink remote down", &pgError{"08001", "could not establish connection"}, DialectPostgres},
		{"pg 08004 remote rejected", &pgError{"08004", "rejected"}, DialectPostgres},
		{"pg 08006 remote lost (dblink)", &pgError{"08006", "connection to the remote failed"}, DialectPostgres},
		{"mysql 1226 max_questions", &mysql.MySQLError{Number: 1226, Message: "User 'u' has exceeded the 'max_questions' resource"}, DialectMySQL},
		{"mysql 1637 too many active transactions", &mysql.MySQLError{Number: 1637, Message: "Too many active concurrent transactions"}, DialectMySQL},
		{"mysql 1041 out of memory", &mysql.MySQLError{Number: 1041, Message: "Out of memory"}, DialectMySQL},
		{"mysql 1114 table full", &mysql.MySQLError{Number: 1114, Message: "The table 't' is full"}, DialectMySQL},
		{"mysql 3024 max_execution_time", &mysql.MySQLError{Number: 3024, Message: "maximum statement execution time exceeded"}, DialectMySQL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			const n = 60
			for range n {
				srv.script("SELECT heavy", step{err: tc.err})
				srv.script("UPDATE heavy", step{err: tc.err})
			}
			db, _ := testDB(t, srv, WithDialect(tc.dialect))
			db.SetMaxIdleConns(4)
			for range n {
				_, err := db.Query("SELECT heavy()")
				if err != tc.err { // unchanged: errors.As reaches the server's error
					t.Fatalf("autocommit: %v, want the server's error as is", err)
				}
				calls := 0
				err = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					_, err := tx.ExecContext(ctx, "UPDATE heavy SET n = 1")
					return err
				})
				if calls != 1 || !errors.Is(err, tc.err) {
					t.Fatalf("RunInTx: %d runs, %v; want 1 run and the server's error", calls, err)
				}
			}
			s := stats(t, db)
			if s.HandOffs != 0 || s.RetriesConnection != 0 || s.RetriesTransaction != 0 || s.Dials != 1 {
				t.Errorf("hand-offs %d, connection retries %d, replays %d, dials %d; want 0, 0, 0, 1 (the connection kept)",
					s.HandOffs, s.RetriesConnection, s.RetriesTransaction, s.Dials)
			}
			othersStillServed(t, db)
		})
	}
}

// The same codes at connect time are a refusal: the dial is retried.
func TestClassifyRefusalAtConnectIsRetried(t *testing.T) {
	for _, err := range []error{&pgError{"53300", "sorry, too many clients already"}, &pgError{"57P03", "the database system is starting up"},
		&pgError{"53200", "out of memory"}, &mysql.MySQLError{Number: 1040, Message: "Too many connections"}} {
		srv := newFakeServer()
		srv.dialErrs = []error{err, err}
		db, _ := testDB(t, srv)
		if err := db.Ping(); err != nil {
			t.Errorf("%v at connect: %v, want the dial retried", err, err)
		}
		if srv.dials != 3 {
			t.Errorf("%v: %d dials, want 3", err, srv.dials)
		}
	}
}

var (
	errReadOnlyPG = &pgError{"25006", "cannot execute INSERT in a read-only transaction"}
	errReadOnlyMy = &mysql.MySQLError{Number: 1792, Message: "Cannot execute statement in a READ ONLY transaction."}
	errServerRO   = &mysql.MySQLError{Number: 1290, Message: "The MariaDB server is running with the --read-only option so it cannot execute this statement"}
)

// Read-only because the user asked: permanent, at once, never bypassed
// through another connection, the breaker untouched.
func TestClassifyUsersReadOnlyIsPermanent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		dialect  Dialect
		err      error
		declared bool // the transaction was begun read-only: nothing to ask
	}{
		{"pg session", DialectPostgres, errReadOnlyPG, false},
		{"pg read-only transaction", DialectPostgres, errReadOnlyPG, true},
		{"mysql session", DialectMySQL, errReadOnlyMy, false},
		{"mysql read-only transaction", DialectMySQL, errReadOnlyMy, true},
		{"mysql session on a read-only server", DialectMySQL, errServerRO, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			ro := &roServer{}
			ro.userRO.Store(!tc.declared)
			ro.standby.Store(tc.err == errServerRO) // the user's setting wins over the server's
			for range 40 {
				srv.script("INSERT", step{err: tc.err})
			}
			db := roDB(t, srv, ro, WithDialect(tc.dialect))
			for range 20 {
				if !tc.declared {
					if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != tc.err {
						t.Fatalf("autocommit: %v, want the server's error as is", err)
					}
				}
				calls := 0
				err := RunInTx(context.Background(), db, &sql.TxOptions{ReadOnly: tc.declared}, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
					return err
				})
				if calls != 1 || !errors.Is(err, tc.err) {
					t.Fatalf("RunInTx: %d runs, %v; want 1 run and the server's error", calls, err)
				}
			}
			if tc.declared && ro.asked.Load() != 0 {
				t.Errorf("asked the server %d times about a transaction the caller declared read-only", ro.asked.Load())
			}
			if ro.askedInA.Load() != 0 {
				t.Errorf("asked %d times inside an aborted transaction", ro.askedInA.Load())
			}
			if n := srv.ranCount("INSERT"); n != 0 {
				t.Errorf("the write ran %d times: the user's read-only setting was bypassed", n)
			}
			s := stats(t, db)
			if s.HandOffs != 0 || s.RetriesTransaction != 0 || s.Dials != 1 {
				t.Errorf("hand-offs %d, replays %d, dials %d; want 0, 0, 1", s.HandOffs, s.RetriesTransaction, s.Dials)
			}
			othersStillServed(t, db)
		})
	}
}

// Read-only because the server is a standby (or was demoted): the
// connection is discarded and the write goes elsewhere.
func TestClassifyStandbyGoesElsewhere(t *testing.T) {
	for _, tc := range []struct {
		name    string
		dialect Dialect
		err     error
	}{
		{"pg standby", DialectPostgres, errReadOnlyPG},
		{"mysql read_only server (1290)", DialectMySQL, errServerRO},
		{"mysql read_only server (1792)", DialectMySQL, errReadOnlyMy},
		{"mysql rejectReadOnly=true", DialectMySQL, driver.ErrBadConn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			ro := &roServer{}
			ro.standby.Store(true)
			srv.script("INSERT", step{err: tc.err})
			// No MySQL marker: its INSERT would count among the writes.
			db := roDB(t, srv, ro, WithDialect(tc.dialect), WithMySQLCommitMarker(""))
			if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != nil {
				t.Fatalf("autocommit on a standby: %v, want the write run on a new connection", err)
			}
			srv.script("INSERT", step{err: tc.err})
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (2)")
				return err
			})
			if err != nil || calls != 2 {
				t.Fatalf("RunInTx on a standby: %d runs, %v; want a replay on another connection", calls, err)
			}
			if n := srv.ranCount("INSERT"); n != 2 {
				t.Errorf("INSERTs that took effect: %d, want 2", n)
			}
			if ro.askedInA.Load() != 0 {
				t.Errorf("asked %d times inside an aborted transaction", ro.askedInA.Load())
			}
			if s := stats(t, db); s.Dials != 3 {
				t.Errorf("dials %d, want 3 (each standby connection discarded)", s.Dials)
			}
			othersStillServed(t, db)
		})
	}
}

// A read-only transaction by hand (BeginTx without RunInTx) on a standby:
// the error is the caller's to see, and the connection is discarded once
// the transaction is rolled back.
func TestClassifyStandbyConnectionDiscardedAfterRollback(t *testing.T) {
	srv := newFakeServer()
	ro := &roServer{}
	ro.standby.Store(true)
	srv.script("INSERT", step{err: errReadOnlyPG})
	db := roDB(t, srv, ro)
	db.SetMaxIdleConns(2)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("INSERT INTO t VALUES (1)"); err != errReadOnlyPG {
		t.Fatalf("in a transaction: %v, want the server's error", err)
	}
	if err := tx.Commit(); !errors.Is(err, errReadOnlyPG) {
		t.Errorf("COMMIT after the refusal: %v", err)
	}
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if s := stats(t, db); s.Dials != 2 {
		t.Errorf("dials %d, want 2: the standby's connection must be discarded", s.Dials)
	}
}

// A pinned *sql.Conn whose session was lost: the caller is told what
// happened, and database/sql discards the connection.
func TestClassifyPinnedConnLostSaysWhat(t *testing.T) {
	srv := newFakeServer()
	srv.script("SELECT", step{err: &pgError{"57P01", "terminating connection due to administrator command"}})
	db, _ := testDB(t, srv)
	ctx := context.Background()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.QueryContext(ctx, "SELECT n FROM t")
	if err == nil || !strings.Contains(err.Error(), "connection was lost") || !strings.Contains(err.Error(), "pinned *sql.Conn") ||
		!strings.Contains(err.Error(), "57P01") {
		t.Errorf("pinned conn after its session was killed: %v; want what happened, the pinning and the server's error", err)
	}
	if strings.HasPrefix(err.Error(), "driver: bad connection") {
		t.Errorf("%q reads like the driver's bare ErrBadConn", err)
	}
	c.Close()
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if srv.dials != 2 {
		t.Errorf("dials %d, want 2: the lost connection must be discarded", srv.dials)
	}
}

// A prepared INSERT on a pinned connection already known lost: the driver
// refused it before sending anything (pgx's stdlib checks IsClosed first),
// so it is not ambiguous. The first call after the loss, whose error may
// have come after the write was sent, still is.
func TestClassifyKnownLostConnectionSentNothing(t *testing.T) {
	srv := newFakeServer()
	srv.script("SELECT", step{err: errLost})
	db, _ := testDB(t, srv)
	ctx := context.Background()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.PrepareContext(ctx, "INSERT INTO t VALUES ($1)")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := c.ExecContext(ctx, "SELECT pg_sleep(0)"); !errors.Is(err, ErrAmbiguousCommit) {
		t.Fatalf("a write whose connection broke: %v, want ErrAmbiguousCommit", err)
	}
	_, err = st.ExecContext(ctx, 1)
	if errors.Is(err, ErrAmbiguousCommit) {
		t.Fatalf("prepared INSERT on a connection known lost: %v; nothing was sent, it is not ambiguous", err)
	}
	if err == nil || !strings.Contains(err.Error(), "nothing was sent") {
		t.Errorf("prepared INSERT on a connection known lost: %v; want it said that nothing was sent", err)
	}
	if n := srv.ranCount("INSERT"); n != 0 {
		t.Errorf("INSERT ran %d times", n)
	}
}

// pgx's trap: ErrBadConn on a connection not known lost may come after the
// write was sent ("conn closed" is SafeToRetry): still ambiguous.
func TestClassifyBadConnOnLiveConnectionStaysAmbiguous(t *testing.T) {
	srv := newFakeServer()
	srv.script("INSERT", step{err: driver.ErrBadConn, ran: true})
	db, _ := testDB(t, srv)
	if _, err := db.Exec("INSERT INTO t VALUES (1)"); !errors.Is(err, ErrAmbiguousCommit) {
		t.Errorf("%v, want ErrAmbiguousCommit", err)
	}
	if n := srv.ranCount("INSERT"); n != 1 {
		t.Errorf("INSERT ran %d times, want 1", n)
	}
}

// A MySQL transaction opened by hand (BEGIN through Exec, or autocommit=0
// in the DSN) on a read-only server: the error is the caller's, and the
// standby's connection is discarded.
func TestClassifyMySQLManualTransactionOnStandby(t *testing.T) {
	srv := newFakeServer()
	ro := &roServer{}
	ro.standby.Store(true)
	srv.script("INSERT", step{err: errServerRO})
	db := roDB(t, srv, ro, WithDialect(DialectMySQL))
	ctx := context.Background()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ExecContext(ctx, "BEGIN"); err != nil {
		t.Fatal(err)
	}
	_, err = c.ExecContext(ctx, "INSERT INTO t VALUES (1)")
	if !errors.Is(err, errServerRO) || !strings.Contains(err.Error(), "standby") {
		t.Errorf("%v; want the server's error, recognised as a standby's", err)
	}
	c.Close()
	if _, err := db.Exec("SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if srv.dials != 2 {
		t.Errorf("dials %d, want 2: the standby's connection must be discarded", srv.dials)
	}
}

// A connection left in the pool from before an outage is found broken by
// the driver, which sends nothing (driver.ErrBadConn). That says nothing
// about the server now: counted as a failure it took the half-open
// breaker's probe and opened it again, so after a restart the breaker kept
// reopening for as long as stale connections were left in the pool (the
// MariaDB restart in the fault suite recovered 2.5 s late, or never).
func TestStaleConnectionDoesNotReopenTheBreaker(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv, WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second, ConsecutiveDialFailures: 3}), WithoutBudget())
	db.SetMaxIdleConns(2)
	ctx := context.Background()
	stale, err := db.Conn(ctx) // dialled while the server is up: it goes back to the pool
	if err != nil {
		t.Fatal(err)
	}
	srv.mu.Lock()
	for range 10 {
		srv.dialErrs = append(srv.dialErrs, errRefused)
	}
	srv.mu.Unlock()
	// The outage: new dials fail until the breaker opens.
	for range 5 {
		if c, err := db.Conn(ctx); err == nil {
			c.Close()
		}
	}
	stale.Close() // back to the pool, broken by the outage as far as the driver will find
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("breaker = %v, want open after the failed dials", s.Breaker)
	}
	// The server is back; the pooled connection's BEGIN finds it broken.
	srv.mu.Lock()
	srv.dialErrs = nil
	srv.mu.Unlock()
	srv.script("BEGIN", step{err: driver.ErrBadConn})
	clock.Advance(2 * time.Second)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatalf("BEGIN after the server came back: %v (the stale connection took the probe)", err)
	}
	_ = tx.Rollback()
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker = %v, want closed: the new dial was the probe and succeeded", s.Breaker)
	}
}
