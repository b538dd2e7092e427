package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// mariaDBConnector is markerConnector on a server that says it is
// MariaDB: the marker's INSERT travels with the COMMIT in an anonymous
// block (commitWithMarker), which commits the fake's transaction.
type mariaDBConnector struct{ markerConnector }

func (c *mariaDBConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.markerConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &mariaDBConn{markerConn: dc.(*markerConn)}, nil
}

type mariaDBConn struct{ *markerConn }

func (c *mariaDBConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	if c.srv.refuseOwnPrefix && strings.HasPrefix(q, mysqlOwnPrefix) {
		return nil, &mysql.MySQLError{Number: 1064, Message: "You have an error in your SQL syntax"}
	}
	q = fakeOwn(q)
	if q == mysqlServerQuery {
		return &fakeRows{cols: []string{"Variable_name", "Value"}, data: [][]driver.Value{
			{[]byte("hostname"), []byte("h")}, {[]byte("port"), []byte("3306")}, {[]byte("server_id"), []byte("1")},
			{[]byte("version"), []byte("10.11.19-MariaDB-0+deb12u1")}}}, nil
	}
	return c.markerConn.QueryContext(ctx, q, args)
}

func newMariaDB(t *testing.T, srv *fakeServer) *mariaDBConnector {
	t.Helper()
	srv.handCommits = append(srv.handCommits, "BEGIN NOT ATOMIC ")
	return &mariaDBConnector{markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}}
}

func mariaDB(t *testing.T, mc *mariaDBConnector, opts ...Option) *sql.DB {
	t.Helper()
	wc, err := WrapConnector(mc, append([]Option{WithClock(newFakeClock()), WithDialect(DialectMySQL)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	return db
}

const blockPrefix = "BEGIN NOT ATOMIC INSERT INTO `test`.`m` (token, created_at) VALUES (X'"

// On MariaDB the marker costs no round trip: one statement carries the
// INSERT and the COMMIT, and the driver's own COMMIT is not sent.
func TestMariaDBMarkerTravelsWithTheCommit(t *testing.T) {
	srv := newFakeServer()
	db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
	if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
		t.Fatalf("err=%v calls=%d", err, calls)
	}
	if srv.ranCount(blockPrefix) != 1 || srv.ranCount("INSERT INTO `test`.`m`") != 0 || srv.ranCount("INSERT INTO t") != 1 {
		t.Fatalf("ran %q; want the write, then the marker in one block with the COMMIT", srv.ran)
	}
	q := srv.ran[len(srv.ran)-1]
	if !strings.HasSuffix(q, "', SYSDATE(6)); COMMIT; END") {
		t.Fatalf("the block: %q", q)
	}
}

// What the block's outcome tells: an error the server answered means it
// did not commit (a block stops at the failing statement, so the COMMIT
// did not run), and the transaction, possibly still open, is rolled back
// and replayed; a lost reply is resolved by the token; a refused block
// (1064) is replayed once with the marker's own INSERT, and the db keeps
// to that from then on.
func TestMariaDBMarkerBlockOutcomes(t *testing.T) {
	lockWait := &mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded; try restarting transaction"}
	syntax := &mysql.MySQLError{Number: 1064, Message: "You have an error in your SQL syntax"}
	for _, tc := range []struct {
		name      string
		step      step
		wantCalls int
		wantErr   error
		separate  int // marker INSERTs run on their own
	}{
		{"lock wait at the INSERT", step{err: lockWait}, 2, nil, 0},
		{"reply lost, committed", step{err: io.ErrUnexpectedEOF, ran: true}, 1, nil, 0},
		{"reply lost, not committed", step{err: io.ErrUnexpectedEOF}, 2, nil, 0},
		{"block refused", step{err: syntax}, 2, nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("BEGIN NOT ATOMIC", tc.step)
			db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if calls != tc.wantCalls || !errors.Is(err, tc.wantErr) && err != tc.wantErr {
				t.Fatalf("err=%v calls=%d; want %v, %d calls (ran %q)", err, calls, tc.wantErr, tc.wantCalls, srv.ran)
			}
			if n := srv.ranCount("INSERT INTO t"); n != 1 {
				t.Errorf("the write took effect %d times, want 1 (ran %q)", n, srv.ran)
			}
			if tc.separate != 0 {
				// Once more, to see the db keep to the separate INSERT.
				if _, err := insertOnce(db, nil, "INSERT INTO t VALUES (2)"); err != nil {
					t.Fatal(err)
				}
			}
			if n := srv.ranCount("INSERT INTO `test`.`m`"); n != tc.separate {
				t.Errorf("%d separate marker INSERTs, want %d (ran %q)", n, tc.separate, srv.ran)
			}
			if s := stats(t, db); s.CommitsAmbiguous != 0 {
				t.Errorf("ambiguous commits: %d", s.CommitsAmbiguous)
			}
		})
	}
}

// A user whose default marker table is refused at the block's INSERT
// (revoked since it was checked): the transaction commits without a
// marker and the marker turns itself off, once; a named table fails the
// transaction with what to do, and it is not committed.
func TestMariaDBMarkerRefusedAtTheBlock(t *testing.T) {
	denied := &mysql.MySQLError{Number: 1142, Message: "INSERT command denied to user 'app'@'localhost' for table `test`.`m`"}
	t.Run("default", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("BEGIN NOT ATOMIC", step{err: denied})
		var offs []Event
		mc := newMariaDB(t, srv)
		db := mariaDB(t, mc, WithObserver(ObserverFunc(func(_ context.Context, e Event) {
			if e.Kind == EventResolutionOff {
				offs = append(offs, e)
			}
		})))
		for range 3 {
			if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
				t.Fatalf("err=%v calls=%d", err, calls)
			}
		}
		if n := srv.ranCount("INSERT INTO t"); n != 3 {
			t.Errorf("writes committed: %d, want 3", n)
		}
		if len(offs) != 1 || !strings.Contains(offs[0].Err.Error(), "INSERT command denied") {
			t.Errorf("EventResolutionOff: %v, want one with the server's error", offs)
		}
		if n := srv.ranCount("BEGIN NOT ATOMIC"); n != 0 {
			t.Errorf("%d blocks took effect after it was turned off", n)
		}
	})
	t.Run("named", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("BEGIN NOT ATOMIC", step{err: denied})
		db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
		calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
		if err == nil || calls != 1 || !strings.Contains(err.Error(), "SELECT, INSERT and DELETE") {
			t.Fatalf("err=%v calls=%d; want the configuration error, no replay", err, calls)
		}
		if n := srv.ranCount("INSERT INTO t"); n != 0 {
			t.Errorf("the write committed although the transaction failed")
		}
	})
}

// An engine that speaks MySQL's protocol but refuses what the marker's
// check asks (here information_schema, with a syntax error): the default
// marker turns itself off at the first writing transaction instead of
// opening a side connection for every one after it.
func TestDefaultMarkerOffOnAnEngineThatRefusesTheCheck(t *testing.T) {
	srv := newFakeServer()
	rc := &refusingCheckConnector{markerConnector: markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test"}}
	offs := 0
	wc, err := WrapConnector(rc, WithClock(newFakeClock()), WithDialect(DialectMySQL), WithObserver(ObserverFunc(func(_ context.Context, e Event) {
		if e.Kind == EventResolutionOff {
			offs++
		}
	})))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	defer db.Close()
	for range 5 {
		if calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d", err, calls)
		}
	}
	if n := rc.checks.Load(); n != 1 || offs != 1 {
		t.Fatalf("the check ran %d times, %d EventResolutionOff; want 1 and 1", n, offs)
	}
}

type refusingCheckConnector struct {
	markerConnector
	checks atomic.Int32
}

func (c *refusingCheckConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.markerConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &refusingCheckConn{markerConn: dc.(*markerConn), rc: c}, nil
}

type refusingCheckConn struct {
	*markerConn
	rc *refusingCheckConnector
}

func (c *refusingCheckConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	q = fakeOwn(q)
	if strings.HasPrefix(q, "SELECT COUNT(*) FROM information_schema.TABLES") {
		c.rc.checks.Add(1)
		return nil, &mysql.MySQLError{Number: 1064, Message: "You have an error in your SQL syntax"}
	}
	return c.markerConn.QueryContext(ctx, q, args)
}

// Old marker rows are still deleted when the marker travels with the
// COMMIT: the clean-up is asked for every 256 marked commits.
func TestMariaDBMarkerBlockStillCleansOldRows(t *testing.T) {
	srv := newFakeServer()
	mc := newMariaDB(t, srv)
	db := mariaDB(t, mc)
	for range 256 {
		if _, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
	}
	if n := srv.ranCount("BEGIN NOT ATOMIC INSERT INTO `test`.`sqlretry_commit_marker`"); n != 256 {
		t.Fatalf("blocks into the default table: %d, want 256", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for mc.cleanups.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no clean-up of old marker rows after 256 commits")
		}
		time.Sleep(time.Millisecond)
	}
}

// A lost COMMIT whose token the lookup does not find is "not committed"
// only while the table is the one that was checked: emptied since (dropped
// and created again, TRUNCATEd, its rows deleted: the sentinel is gone
// too) or given a trigger since (one may rewrite the token), "no token"
// says nothing, and a COMMIT that took effect would run twice (attack7:
// err=<nil> calls=2 rows=2). Ambiguous, never replayed; the next
// transaction checks the table again.
func TestMarkerChangedSinceTheCheckIsNeverTakenAsNotCommitted(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(*fakeServer)
	}{
		{"emptied", func(s *fakeServer) { s.emptyBeforeLookup = true }},
		// attack9: another db (or this one) met the missing table and
		// created it again, with a sentinel, before the lookup.
		{"recreated by another db", func(s *fakeServer) {
			s.emptyBeforeLookup, s.recreatedBy = true, []byte("sqlretry:0123456")
		}},
		{"trigger added", func(s *fakeServer) { s.markerTriggers = 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			db := mariaDB(t, newMariaDB(t, srv), WithMySQLCommitMarker("m"))
			if _, err := insertOnce(db, nil, "INSERT INTO t VALUES (0)"); err != nil {
				t.Fatal(err)
			}
			srv.script("BEGIN NOT ATOMIC", step{err: io.ErrUnexpectedEOF, ran: tc.name == "emptied"})
			srv.mu.Lock()
			tc.set(srv)
			srv.mu.Unlock()
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if calls != 1 || !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit, one call (ran %q)", err, calls, srv.ran)
			}
			sentinels := strings.TrimSuffix(markerSentinelInsert("`test`.`m`", []byte(markerSentinelPrefix)), "')")
			if n := srv.ranCount(sentinels); n != 1 && !(tc.name == "recreated by another db" && n == 2) {
				t.Fatalf("the check ran %d times before the next transaction, want 1", n)
			}
			_, _ = insertOnce(db, nil, "INSERT INTO t VALUES (2)")
			if n := srv.ranCount(sentinels); n < 2 && tc.name != "trigger added" {
				t.Errorf("the table was checked %d times, want 2: the next transaction checks it again", n)
			}
			// The check, the lookup (when the sentinel is there), the check
			// again (which turns the default marker off on a trigger).
			want := 3
			if tc.name != "trigger added" {
				want = 2
			}
			if n := srv.ranCount("SELECT COUNT(*) FROM information_schema.TRIGGERS"); n != want {
				t.Errorf("triggers looked at %d times, want %d", n, want)
			}
		})
	}
}
