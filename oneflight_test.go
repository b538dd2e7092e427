package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"
	"testing"
)

// fakeFlight is a CommitFlight over the fake driver: the question through
// the fake connection, then its COMMIT, as pgxsqlretry sends them in one
// message. lost, when set, loses the reply before the question's answer;
// ran says whether the server had run the whole message by then.
type fakeFlight struct {
	refuse  bool // Handles says no
	lost    error
	ran     bool
	flights int
	asked   []string
}

func (f *fakeFlight) Handles(dc driver.Conn) bool {
	_, ok := dc.(*fakeConn)
	return ok && !f.refuse
}

func (f *fakeFlight) Commit(ctx context.Context, dc driver.Conn, question string) ([]driver.Value, error, error) {
	c := dc.(*fakeConn)
	f.flights++
	f.asked = append(f.asked, question)
	if f.lost != nil {
		if f.ran {
			_, _ = queryRow(ctx, c, question)
			_ = (&fakeTx{c}).Commit()
		} else {
			_ = (&fakeTx{c}).Rollback() // the server rolls back when the session ends
		}
		c.broken = true
		return nil, nil, f.lost
	}
	row, err := queryRow(ctx, c, question)
	if err != nil {
		if serverAnswered(err) {
			return nil, err, nil // the COMMIT after it in the message did not run
		}
		return nil, nil, err
	}
	return row, nil, (&fakeTx{c}).Commit()
}

func runInsert(t *testing.T, db *sql.DB) (calls int, err error) {
	t.Helper()
	err = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
		return err
	})
	return calls, err
}

// The question goes with the COMMIT: no statement of its own, and the
// transaction commits once.
func TestOneFlightCommitAsksInTheCommitsFlight(t *testing.T) {
	srv := newFakeServer()
	f := &fakeFlight{}
	db, _ := testDB(t, srv, WithCommitFlight(f))
	calls, err := runInsert(t, db)
	if err != nil || calls != 1 || srv.committed != 1 || f.flights != 1 {
		t.Fatalf("err=%v calls=%d committed=%d flights=%d; want one run, one commit, in one flight", err, calls, srv.committed, f.flights)
	}
	if f.asked[0] != pgAskXIDAndServer {
		t.Errorf("asked %q, want the question of prepareResolution", f.asked[0])
	}
	// A transaction that only read has nothing to resolve: no flight.
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		var n int
		return tx.QueryRowContext(ctx, "SELECT 1").Scan(&n)
	}); err != nil || f.flights != 1 {
		t.Fatalf("read-only transaction: err=%v flights=%d; want no flight", err, f.flights)
	}
}

// A connection the flight does not handle, resolution turned off, or an
// engine without the functions: the usual COMMIT, no flight.
func TestOneFlightFallsBack(t *testing.T) {
	for name, opts := range map[string][]Option{
		"not its driver":   {WithCommitFlight(&fakeFlight{refuse: true})},
		"resolution off":   {WithCommitFlight(&fakeFlight{}), WithCommitResolution(false)},
		"flight nil again": {WithCommitFlight(&fakeFlight{}), WithCommitFlight(nil)},
	} {
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("COMMIT", step{err: errLost, ran: true})
			db, _ := testDB(t, srv, opts...)
			calls, err := runInsert(t, db)
			resolves := !strings.Contains(name, "off")
			switch {
			case resolves && (err != nil || calls != 1):
				t.Fatalf("err=%v calls=%d; want the lost COMMIT resolved by the separate question", err, calls)
			case !resolves && !errors.Is(err, ErrAmbiguousCommit):
				t.Fatalf("err=%v; want ErrAmbiguousCommit", err)
			}
		})
	}
}

// The reply lost before the question's answer: the id is unknown and the
// COMMIT may have run. ErrAmbiguousCommit whether or not it did, never a
// replay; the error is the driver's.
func TestOneFlightAnswerLostIsAmbiguous(t *testing.T) {
	for _, ran := range []bool{true, false} {
		srv := newFakeServer()
		f := &fakeFlight{lost: errLost, ran: ran}
		db, _ := testDB(t, srv, WithCommitFlight(f))
		calls, err := runInsert(t, db)
		if !errors.Is(err, ErrAmbiguousCommit) || !errors.Is(err, errLost) || calls != 1 {
			t.Fatalf("server ran it: %v; err=%v calls=%d; want ErrAmbiguousCommit wrapping the driver's error, no replay", ran, err, calls)
		}
		if s := stats(t, db); s.CommitsAmbiguous != 1 {
			t.Errorf("CommitsAmbiguous = %d, want 1", s.CommitsAmbiguous)
		}
	}
}

// The question answered, the COMMIT's reply lost: resolved by the id as
// with the separate question (TestLostCommitIsResolvedOnPostgres).
func TestOneFlightCommitLostAfterTheAnswerIsResolved(t *testing.T) {
	for _, tc := range []struct {
		ran       bool
		wantCalls int
	}{{true, 1}, {false, 2}} {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost, ran: tc.ran})
		db, _ := testDB(t, srv, WithCommitFlight(&fakeFlight{}))
		calls, err := runInsert(t, db)
		if err != nil || calls != tc.wantCalls || srv.ranCount("INSERT") != 1 {
			t.Fatalf("committed: %v; err=%v calls=%d inserts=%d; want success after %d run(s), one insert", tc.ran, err, calls, srv.ranCount("INSERT"), tc.wantCalls)
		}
		if s := stats(t, db); s.CommitsResolved != 1 || s.CommitsAmbiguous != 0 {
			t.Errorf("resolved=%d ambiguous=%d, want 1 and 0", s.CommitsResolved, s.CommitsAmbiguous)
		}
	}
}

// The server refuses the question with the proof (42501): the COMMIT in
// the same message did not run, the transaction is rolled back and
// replayed once, and the question without the proof goes from then on,
// still in the COMMIT's flight (TestFailoverProofRefusedFallsBack for the
// separate question).
func TestOneFlightQuestionRefused(t *testing.T) {
	srv := newFakeServer()
	srv.pgLife = newFakePGLife(150000)
	srv.pgAborts = true
	f := &fakeFlight{}
	db, _ := testDB(t, srv, WithCommitFlight(f))
	db.SetMaxOpenConns(1)
	if _, err := runInsert(t, db); err != nil { // learns the version
		t.Fatal(err)
	}
	srv.script(pgAskXIDProof13, step{err: &pgError{"42501", "permission denied for function pg_logical_emit_message"}})
	calls, err := runInsert(t, db)
	if err != nil || calls != 2 || srv.ranCount("INSERT INTO ledger") != 2 {
		t.Fatalf("calls=%d err=%v inserts=%d; want one replay, then success, two inserts in all", calls, err, srv.ranCount("INSERT INTO ledger"))
	}
	if last := f.asked[len(f.asked)-1]; strings.Contains(last, "pg_logical_emit_message") || f.flights != 3 {
		t.Errorf("flights=%d, last question %q; want 3 flights, the last without the proof", f.flights, last)
	}
}

// The engine lacks the functions (42883): replayed once, and the
// resolution (with its flight) turns itself off.
func TestOneFlightWithoutTheFunctionTurnsItselfOff(t *testing.T) {
	srv := newFakeServer()
	srv.script(pgAskXID, step{err: &pgError{"42883", "function txid_current() does not exist"}})
	f := &fakeFlight{}
	db, _ := testDB(t, srv, WithCommitFlight(f))
	for range 2 {
		if _, err := runInsert(t, db); err != nil {
			t.Fatal(err)
		}
	}
	if f.flights != 1 || srv.committed != 2 || !retrierOf(db).resolution.broken.Load() {
		t.Errorf("flights=%d committed=%d broken=%v; want one refused flight, then plain COMMITs", f.flights, srv.committed, retrierOf(db).resolution.broken.Load())
	}
}

// A lost connection in place of the question's answer that the server
// sent (a FATAL: the session was terminated) is the server's answer: the
// COMMIT did not run, the transaction is replayed.
func TestOneFlightSessionTerminatedBeforeTheAnswerIsReplayed(t *testing.T) {
	srv := newFakeServer()
	srv.script(pgAskXID, step{err: &pgError{"57P01", "terminating connection due to administrator command"}, closes: true})
	db, _ := testDB(t, srv, WithCommitFlight(&fakeFlight{}))
	calls, err := runInsert(t, db)
	if err != nil || calls != 2 || srv.ranCount("INSERT") != 1 {
		t.Fatalf("err=%v calls=%d inserts=%d; want one replay, one insert", err, calls, srv.ranCount("INSERT"))
	}
}

// On a server in recovery the question answers NULL: nothing can commit,
// so a COMMIT lost after the answer is replayed without asking.
func TestOneFlightInRecovery(t *testing.T) {
	srv := newFakeServer()
	srv.inRecovery = true
	srv.script("COMMIT", step{err: errLost})
	db, _ := testDB(t, srv, WithCommitFlight(&fakeFlight{}))
	calls, err := runInsert(t, db)
	if err != nil || calls != 2 {
		t.Fatalf("err=%v calls=%d; want a replay", err, calls)
	}
	if s := stats(t, db); s.CommitsResolved != 0 || s.CommitsAmbiguous != 0 {
		t.Errorf("resolved=%d ambiguous=%d; want nothing asked", s.CommitsResolved, s.CommitsAmbiguous)
	}
}

// The caller's deadline came before COMMIT: nothing is sent.
func TestOneFlightNotSentPastTheDeadline(t *testing.T) {
	srv := newFakeServer()
	f := &fakeFlight{}
	db, _ := testDB(t, srv, WithCommitFlight(f))
	ctx, cancel := context.WithCancel(context.Background())
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')"); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := tx.Commit(); err == nil || f.flights != 0 || srv.committed != 0 {
		t.Fatalf("err=%v flights=%d committed=%d; want the deadline's error and nothing sent", err, f.flights, srv.committed)
	}
}
