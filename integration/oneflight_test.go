package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
	"github.com/sqlretry/sqlretry/pgxsqlretry"
)

// What PostgreSQL does with "question; COMMIT" in one simple-protocol
// Query message inside a transaction block, the ground pgxsqlretry stands
// on: the COMMIT commits; an error, or a FATAL (the session terminated),
// in place of the question's result means the COMMIT never ran.
func TestPostgresOneFlightSemantics(t *testing.T) {
	dsn := need(t, "pgx")
	ctx := context.Background()
	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	tbl := table(t, admin, "oneflight")
	mustExec(t, admin, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
	count := func(op string) (n int) {
		if err := admin.QueryRow("SELECT count(*) FROM "+tbl+" WHERE op = $1", op).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	run := func(op, question string) (results int, tags []string, status byte, err error) {
		pc, err := pgconn.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close(ctx)
		if _, err := pc.Exec(ctx, "BEGIN; INSERT INTO "+tbl+" VALUES ('"+op+"')").ReadAll(); err != nil {
			t.Fatal(err)
		}
		res, err := pc.Exec(ctx, question+"; COMMIT").ReadAll()
		for _, r := range res {
			tags = append(tags, r.CommandTag.String())
		}
		return len(res), tags, pc.TxStatus(), err
	}

	n, tags, st, err := run("ok", "SELECT 1")
	if err != nil || n != 2 || tags[1] != "COMMIT" || st != 'I' || count("ok") != 1 {
		t.Errorf("question answered: %d results %v, err %v, status %c, rows %d; want 2 results ending in COMMIT, idle, committed", n, tags, err, st, count("ok"))
	}
	n, tags, st, err = run("refused", "SELECT 1/0")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22012" || n != 0 || st != 'E' || count("refused") != 0 {
		t.Errorf("question failed: %d results %v, err %v, status %c, rows %d; want 22012, no result, the transaction still open and aborted, nothing committed", n, tags, err, st, count("refused"))
	}
	// The FATAL comes after the question's RowDescription: one result, the
	// question's, ended by the error.
	n, tags, _, err = run("fatal", "SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())")
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || n > 1 || (n == 1 && tags[0] != "") || count("fatal") != 0 {
		t.Errorf("session terminated during the question: %d results %v, err %v, rows %d; want 57P01, no COMMIT result, nothing committed", n, tags, err, count("fatal"))
	}
}

// flightCounter counts the messages the client writes (one per network
// flight: pgx writes each request in one call).
type flightCounter struct{ writes atomic.Int64 }

func (f *flightCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &countConn{Conn: c, f: f}, nil
}

type countConn struct {
	net.Conn
	f *flightCounter
}

func (c *countConn) Write(p []byte) (int, error) { c.f.writes.Add(1); return c.Conn.Write(p) }

// The one-flight COMMIT sends no flight more than the plain driver's
// transaction, in every query exec mode of pgx, and commits; the separate
// question sends one more.
func TestPostgresOneFlightAddsNoRoundTrip(t *testing.T) {
	dsn := need(t, "pgx")
	for _, mode := range []string{"cache_statement", "cache_describe", "describe_exec", "exec", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			flights := map[string]int64{}
			for _, variant := range []string{"resolution-off", "separate-question", "one-flight"} {
				cfg, err := pgx.ParseConfig(dsn + "&default_query_exec_mode=" + mode)
				if err != nil {
					t.Fatal(err)
				}
				fc := &flightCounter{}
				cfg.DialFunc = fc.dial
				var opts []sqlretry.Option
				switch variant {
				case "resolution-off":
					opts = append(opts, sqlretry.WithCommitResolution(false))
				case "one-flight":
					opts = append(opts, pgxsqlretry.CommitInOneFlight())
				}
				db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), opts...)
				db.SetMaxOpenConns(1)
				tbl := table(t, db, "oneflight")
				mustExec(t, db, "CREATE TABLE "+tbl+" (id int)")
				tx := func(i int) {
					t.Helper()
					if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
						_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", i)
						return err
					}); err != nil {
						t.Fatalf("%s: %v", variant, err)
					}
				}
				tx(0) // warm: the first transaction asks for the server's identity and prepares
				before := fc.writes.Load()
				for i := 1; i <= 10; i++ {
					tx(i)
				}
				flights[variant] = fc.writes.Load() - before
				var n int
				if err := db.QueryRow("SELECT count(*) FROM " + tbl).Scan(&n); err != nil || n != 11 {
					t.Fatalf("%s: %d rows (%v), want 11", variant, n, err)
				}
				s, _ := sqlretry.StatsOf(db)
				db.Close()
				if s.CommitsAmbiguous != 0 {
					t.Errorf("%s: %d ambiguous commits", variant, s.CommitsAmbiguous)
				}
			}
			t.Logf("flights for 10 transactions: %v", flights)
			// The separate question costs at least one flight per
			// transaction; more in the modes that prepare or describe a new
			// text (describe_exec: two).
			if flights["one-flight"] != flights["resolution-off"] || flights["separate-question"] < flights["resolution-off"]+10 {
				t.Errorf("flights for 10 transactions: %v; want one-flight = resolution-off <= separate-question - 10", flights)
			}
		})
	}
}

// replyCutter closes the connection after the server's answer to the
// question arrived and before the COMMIT's: once armed, the next write
// that carries COMMIT goes through whole, and the reply is delivered up to
// and including its first CommandComplete (the question's), then the
// socket closes. The server commits.
type replyCutter struct {
	armed atomic.Bool
	fired atomic.Int32
}

func (c *replyCutter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &replyCutConn{Conn: conn, c: c}, nil
}

type replyCutConn struct {
	net.Conn
	c       *replyCutter
	mu      sync.Mutex
	cutting bool
	pending []byte
	cut     bool
}

func (rc *replyCutConn) Write(p []byte) (int, error) {
	if pgCommit(p) && rc.c.armed.Swap(false) {
		rc.mu.Lock()
		rc.cutting = true
		rc.mu.Unlock()
	}
	return rc.Conn.Write(p)
}

func (rc *replyCutConn) Read(p []byte) (int, error) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.cutting && !rc.cut {
		// Read the whole reply (up to ReadyForQuery), keep what precedes
		// the end of the first CommandComplete.
		var buf []byte
		end := -1
		for end < 0 {
			chunk := make([]byte, 8192)
			n, err := rc.Conn.Read(chunk)
			buf = append(buf, chunk[:n]...)
			end = firstCommandCompleteEnd(buf)
			if err != nil {
				break
			}
		}
		if end < 0 {
			end = len(buf)
		}
		rc.pending, rc.cut = buf[:end], true
		rc.Conn.Close()
		rc.c.fired.Add(1)
	}
	if rc.cut {
		if len(rc.pending) == 0 {
			return 0, io.ErrUnexpectedEOF
		}
		n := copy(p, rc.pending)
		rc.pending = rc.pending[n:]
		return n, nil
	}
	return rc.Conn.Read(p)
}

// firstCommandCompleteEnd is the offset just past the first complete
// CommandComplete message in buf, -1 if there is none yet.
func firstCommandCompleteEnd(buf []byte) int {
	for i := 0; i+5 <= len(buf); {
		l := int(binary.BigEndian.Uint32(buf[i+1 : i+5]))
		if i+1+l > len(buf) {
			return -1
		}
		if buf[i] == 'C' {
			return i + 1 + l
		}
		i += 1 + l
	}
	return -1
}

func openFlightPostgres(t *testing.T, dsn string, dial pgconn.DialFunc, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), append([]sqlretry.Option{pgxsqlretry.CommitInOneFlight()}, opts...)...)
	t.Cleanup(func() { db.Close() })
	return db
}

// The lost replies of a one-flight COMMIT, on a private server. The
// question's answer arrived: resolved as with the separate question. It
// did not (the reply lost after the server got the message, or the
// message cut in half): the id is unknown and the COMMIT may have run,
// so ErrAmbiguousCommit, whether or not the server committed — the price
// of the saved round trip (TestPostgresLostCommitIsResolved resolves both
// with the separate question).
func TestPostgresOneFlightLostCommit(t *testing.T) {
	dsn := needPrivate(t, "pgx")
	t.Run("reply lost after the question's answer: resolved, committed", func(t *testing.T) {
		rc := &replyCutter{}
		db := openFlightPostgres(t, dsn, rc.dial)
		calls, rows, err := flightLostCommit(t, db, func() { rc.armed.Store(true) })
		if rc.fired.Load() != 1 {
			t.Fatal("the reply was never cut: the test proved nothing")
		}
		s, _ := sqlretry.StatsOf(db)
		if err != nil || calls != 1 || rows != 1 || s.CommitsResolved != 1 {
			t.Fatalf("err=%v calls=%d rows=%d resolved=%d; want success, 1 run, 1 row, resolved", err, calls, rows, s.CommitsResolved)
		}
	})
	t.Run("message delivered, reply lost: ambiguous (the server committed)", func(t *testing.T) {
		c := &settledCutter{} // resolve_test.go: the server has committed when the socket closes
		db := openFlightPostgres(t, dsn, c.dial)
		calls, rows, err := flightLostCommit(t, db, func() { c.armed.Store(true) })
		c.armed.Store(false)
		if c.fired.Load() != 1 {
			t.Fatal("the COMMIT was never cut: the test proved nothing")
		}
		if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 || rows != 1 {
			t.Fatalf("err=%v calls=%d rows=%d; want ErrAmbiguousCommit, 1 run, 1 row", err, calls, rows)
		}
	})
	t.Run("message cut in half: ambiguous (the server never got it)", func(t *testing.T) {
		c := &cutter{isCommit: pgCommit}
		db := openFlightPostgres(t, dsn, c.dial)
		calls, rows, err := flightLostCommit(t, db, func() { c.mode.Store(cutMidMessage) })
		c.mode.Store(0)
		if c.fired.Load() != 1 {
			t.Fatal("the COMMIT was never cut: the test proved nothing")
		}
		if !errors.Is(err, sqlretry.ErrAmbiguousCommit) || calls != 1 || rows != 0 {
			t.Fatalf("err=%v calls=%d rows=%d; want ErrAmbiguousCommit, 1 run, no row", err, calls, rows)
		}
	})
}

// flightLostCommit runs one RunInTx that inserts a row, arming the fault
// in its first run, and reports the error, the runs, and the rows.
func flightLostCommit(t *testing.T, db *sql.DB, arm func()) (calls, rows int, err error) {
	t.Helper()
	tbl := table(t, db, "ledger")
	mustExec(t, db, "CREATE TABLE "+tbl+" (op varchar(40) PRIMARY KEY)")
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			arm()
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
		return err
	})
	if qerr := db.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op).Scan(&rows); qerr != nil {
		t.Fatal(qerr)
	}
	return calls, rows, err
}

// The server refuses the question (a role that may not run
// pg_logical_emit_message: 42501): the COMMIT in the same message did not
// run, the transaction is rolled back and replayed once without the
// proof, and the row is there once.
func TestPostgresOneFlightQuestionErrorSkipsCommit(t *testing.T) {
	srv := ownServer(t, "pgx") // its privileges change
	admin, err := sql.Open("pgx", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	mustExec(t, admin,
		"CREATE ROLE flight LOGIN",
		"REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
		"CREATE TABLE flight_ledger (op text PRIMARY KEY)",
		"GRANT SELECT, INSERT ON flight_ledger TO flight")
	cfg, err := pgx.ParseConfig(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.User = "flight"
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), pgxsqlretry.CommitInOneFlight())
	defer db.Close()
	calls := 0
	for i := range 3 { // the first learns the server's version, the second is refused and replayed
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO flight_ledger VALUES ($1)", fmt.Sprint(i))
			return err
		}); err != nil {
			t.Fatalf("transaction %d: %v", i, err)
		}
	}
	var n int
	if err := admin.QueryRow("SELECT count(*) FROM flight_ledger").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if calls != 4 || n != 3 {
		t.Fatalf("%d runs, %d rows; want 4 runs (one replay after the refused question), 3 rows", calls, n)
	}
}

// Sessions killed every 100-500 ms (pg_terminate_backend) under the
// transfer workload, with the one-flight COMMIT: a kill during the flight
// arrives as a FATAL in place of the question's answer (the COMMIT did not
// run: replayed) or after it (resolved by the id). No error, no commit left
// unknown, money conserved (the scenario of TestFaultKilledConnections).
func TestFaultKilledConnectionsOneFlight(t *testing.T) {
	dsn := needPrivate(t, "pgx")
	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	cfg, err := pgx.ParseConfig(dsn + "&application_name=flightwork")
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), pgxsqlretry.CommitInOneFlight())
	defer db.Close()
	var kills atomic.Int64
	killer := func(ctx context.Context) {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(100+rand.IntN(400)) * time.Millisecond):
			}
			var ok bool
			if admin.QueryRow(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'flightwork' ORDER BY random() LIMIT 1`).Scan(&ok) == nil && ok {
				kills.Add(1)
			}
		}
	}
	res, _ := scenario(t, "killed-connections/pgx-one-flight", admin, db, "pgx", workload.RunInTx,
		workload.Config{Duration: 4 * time.Second}, killer)
	t.Logf("sessions killed: %d", kills.Load())
	if kills.Load() < 5 {
		t.Errorf("only %d kills: the scenario provoked too little", kills.Load())
	}
	if res.Failed != 0 {
		t.Errorf("%d operations failed: %v", res.Failed, res.Errors)
	}
}

// PgBouncer in transaction mode, server sessions killed every 300 ms
// behind it, with the one-flight COMMIT (the scenario of
// TestPgBouncerServerSessionsKilled): the two statements of the flight are
// one transaction's, on one server session.
func TestPgBouncerServerSessionsKilledOneFlight(t *testing.T) {
	_, bouncer, admin := pgBouncerBed(t)
	cfg, err := pgx.ParseConfig(bouncer.DSN + "&default_query_exec_mode=exec&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), pgxsqlretry.CommitInOneFlight())
	defer db.Close()
	var kills int
	chaos := func(ctx context.Context) {
		tk := time.NewTicker(300 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
			}
			var n int
			if err := admin.QueryRowContext(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> 'bed-admin'`).Scan(&n); err == nil {
				kills += n
			}
		}
	}
	res, _ := scenario(t, "pgbouncer/sessions-killed-one-flight", admin, db, "pgx", workload.RunInTx,
		workload.Config{Workers: 8, Duration: 6 * time.Second, OpTimeout: 10 * time.Second}, chaos)
	if res.Failed != 0 {
		t.Errorf("%d operations failed: %v", res.Failed, res.Errors)
	}
	if res.Committed == 0 || kills == 0 {
		t.Errorf("%d commits, %d sessions killed: the scenario did not run", res.Committed, kills)
	}
}

// A pgx connection already closed when the flight would go (the session
// died while the transaction was idle): nothing is sent, so the outcome is
// known, not committed, never ErrAmbiguousCommit (the separate question
// gets driver.ErrBadConn from stdlib there too).
func TestPostgresOneFlightOnAClosedConnectionSendsNothing(t *testing.T) {
	dsn := need(t, "pgx")
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), pgxsqlretry.CommitInOneFlight())
	defer db.Close()
	tbl := table(t, db, "oneflight")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int)")
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := conn.Raw(func(dc any) error {
		for {
			if sc, ok := dc.(*stdlib.Conn); ok {
				return sc.Conn().PgConn().Close(ctx)
			}
			u, ok := dc.(interface{ Unwrap() driver.Conn })
			if !ok {
				return fmt.Errorf("%T: no pgx connection under it", dc)
			}
			dc = u.Unwrap()
		}
	}); err != nil {
		t.Fatal(err)
	}
	err = tx.Commit()
	var n int
	if qerr := db.QueryRow("SELECT count(*) FROM " + tbl).Scan(&n); qerr != nil {
		t.Fatal(qerr)
	}
	var se *sqlretry.Error
	if err == nil || errors.Is(err, sqlretry.ErrAmbiguousCommit) || !errors.As(err, &se) || se.Class != sqlretry.RetryTransaction || n != 0 {
		t.Fatalf("err=%v rows=%d; want a replayable error (nothing sent), not ErrAmbiguousCommit, no row", err, n)
	}
}
