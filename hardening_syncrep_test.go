package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"
)

// Lost COMMITs under synchronous replication (PostgreSQL): "committed" only
// once the synchronous standbys have the commit; never end a backend that
// waits for them; otherwise wait within the deadline, then
// ErrAmbiguousCommit.
func TestSyncRepLostCommitResolution(t *testing.T) {
	const xid = 701 // the fake server's first transaction id
	run := func(t *testing.T, srv *fakeServer, deadline time.Duration) (int, time.Duration, error) {
		t.Helper()
		srv.script("COMMIT", step{err: errLost, ran: true}) // the server committed, the reply was lost
		db, _ := testDB(t, srv)
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		calls := 0
		start := time.Now()
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		return calls, time.Since(start), err
	}
	wantAmbiguous := func(t *testing.T, srv *fakeServer, calls int, err error) {
		t.Helper()
		if err == nil {
			t.Fatal("reported committed while no synchronous standby has the commit: a failover loses it")
		}
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
		}
	}

	t.Run("committed locally, old backend waits in SyncRep: not ended, ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "FIRST 1 (s1)"
		srv.oldBackend[xid] = fakeBackend{waitEvent: "SyncRep", state: "active"}
		srv.standbyLag = -1
		calls, _, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if len(srv.killed) != 0 {
			t.Errorf("the backend waiting in SyncRep was ended (%v): that publishes a commit no standby has", srv.killed)
		}
	})
	t.Run("committed, wait was canceled, standby lacks it: ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "s1"
		srv.standbyLag = -1
		calls, took, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if srv.replChecks == 0 {
			t.Error("the standbys' positions were never asked")
		}
		if took > 2*time.Second {
			t.Errorf("took %v past a 300ms deadline", took)
		}
	})
	t.Run("committed, standby catches up: committed, no replay", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "ANY 2 (s1, s2, s3)"
		srv.standbyLag = 3
		calls, _, err := run(t, srv, 5*time.Second)
		if err != nil || calls != 1 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d inserts=%d; want success once the standbys have it", err, calls, srv.ranCount("INSERT"))
		}
		if srv.replChecks != 4 {
			t.Errorf("position checks = %d, want 4 (3 behind, then caught up)", srv.replChecks)
		}
	})
	t.Run("role cannot see the standbys, standby frozen: its own commit waits, ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "*"
		srv.standbyHidden = true
		srv.standbyLag = -1
		calls, took, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if srv.replChecks == 0 {
			t.Error("no probe transaction was committed")
		}
		if took > 2*time.Second {
			t.Errorf("took %v past a 300ms deadline", took)
		}
	})
	t.Run("role cannot see the standbys, standby up: its own commit returns, committed", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "*"
		srv.standbyHidden = true
		calls, _, err := run(t, srv, 5*time.Second)
		if err != nil || calls != 1 || srv.replChecks != 1 {
			t.Fatalf("err=%v calls=%d probes=%d; want success after one probe", err, calls, srv.replChecks)
		}
	})
	for _, commit := range []string{"local", "off"} {
		t.Run("synchronous_commit="+commit+": committed at once", func(t *testing.T) {
			srv := newFakeServer()
			srv.syncNames = "s1"
			srv.syncCommit = commit
			srv.standbyLag = -1
			calls, _, err := run(t, srv, 5*time.Second)
			if err != nil || calls != 1 || srv.replChecks != 0 {
				t.Fatalf("err=%v calls=%d position checks=%d; want success without asking the standbys", err, calls, srv.replChecks)
			}
		})
	}
	t.Run("no synchronous standbys: committed at once", func(t *testing.T) {
		srv := newFakeServer()
		srv.standbyLag = -1
		calls, _, err := run(t, srv, 5*time.Second)
		if err != nil || calls != 1 || srv.replChecks != 0 {
			t.Fatalf("err=%v calls=%d position checks=%d; want success without asking the standbys", err, calls, srv.replChecks)
		}
	})
	t.Run("an engine without pg_stat_activity's columns: txid_status alone", func(t *testing.T) {
		srv := newFakeServer()
		for range 1000 { // every time it is asked
			srv.script(pgStatusQuery, step{err: &pgError{"42703", `column a.wait_event does not exist`}})
		}
		calls, _, err := run(t, srv, 5*time.Second)
		if err != nil || calls != 1 || srv.ranCount("INSERT") != 1 {
			t.Fatalf("err=%v calls=%d; want success from txid_status alone", err, calls)
		}
	})
	t.Run("committed, old backend still holds the id: wait for it", func(t *testing.T) {
		srv := newFakeServer()
		srv.oldBackend[xid] = fakeBackend{state: "active"} // between the commit record and letting go
		calls, _, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if len(srv.killed) != 0 {
			t.Errorf("a committing backend was ended: %v", srv.killed)
		}
	})
	t.Run("in progress, committing under synchronous replication: not ended", func(t *testing.T) {
		srv := newFakeServer()
		srv.syncNames = "s1"
		srv.inflight[xid] = 1
		srv.oldBackend[xid] = fakeBackend{state: "active"}
		calls, _, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if len(srv.killed) != 0 {
			t.Errorf("a backend that had begun to commit was ended under synchronous replication (%v): its commit would skip the standbys", srv.killed)
		}
	})
	t.Run("in progress, committing without synchronous replication: not ended", func(t *testing.T) {
		// The old backend has begun its COMMIT: a pre-commit step with an
		// effect outside this server (postgres_fdw's remote COMMIT, a
		// deferred trigger's dblink call) may already have gone through,
		// and ending the backend now would abort only the local part, so
		// that the replay repeats the rest. Wait for it.
		srv := newFakeServer()
		srv.inflight[xid] = 1
		srv.oldBackend[xid] = fakeBackend{state: "active", waitEvent: "PostgresFdwGetResult"}
		calls, _, err := run(t, srv, 300*time.Millisecond)
		wantAmbiguous(t, srv, calls, err)
		if len(srv.killed) != 0 {
			t.Errorf("a backend that had begun to commit was ended (%v): a remote part of its COMMIT may have gone through", srv.killed)
		}
	})
	t.Run("in progress, idle in transaction under synchronous replication: ended, replayed", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("COMMIT", step{err: errLost}) // the COMMIT never arrived
		srv.syncNames = "s1"
		srv.inflight[xid] = 1
		calls, _, err := run(t, srv, 5*time.Second)
		if err != nil || calls != 2 || srv.ranCount("INSERT") != 1 || len(srv.killed) == 0 {
			t.Fatalf("err=%v calls=%d inserts=%d killed=%v; want the idle backend ended and one replay", err, calls, srv.ranCount("INSERT"), srv.killed)
		}
	})
}

func TestSyncStandbysNeeded(t *testing.T) {
	for s, want := range map[string]int{
		"":                    0,
		"  ":                  0,
		"*":                   1,
		"s1":                  1,
		"s1, s2":              1,
		"FIRST 1 (s1)":        1,
		"first 2 (s1, s2)":    2,
		"ANY 2 (s1, s2, s3)":  2,
		"any\t3(s1,s2,s3)":    3,
		"2 (s1, s2)":          2,
		"firstbox":            1,
		"anyhost, s2":         1,
		`"3" , s2`:            1,
		"FIRST 99999999 (s1)": 1, // nonsense the server refuses anyway
	} {
		if got := syncStandbysNeeded(s); got != want {
			t.Errorf("syncStandbysNeeded(%q) = %d, want %d", s, got, want)
		}
	}
}

// Lost COMMITs under semi-synchronous replication (MySQL/MariaDB, with the
// commit marker): never KILL a session that waits for (or may be about to
// wait for) a replica's ACK; a marker found counts only once a replica has
// acknowledged a later commit; otherwise wait, then ErrAmbiguousCommit.
func TestSemiSyncLostCommitResolution(t *testing.T) {
	const marker = "`test`.`sqlretry_marker`" // as sqlretry qualifies the option's name
	run := func(t *testing.T, srv *fakeServer, commit step, deadline time.Duration) (int, time.Duration, error) {
		t.Helper()
		srv.script("COMMIT", commit)
		db, _ := testDB(t, srv, WithDialect(DialectMySQL), WithMySQLCommitMarker("sqlretry_marker"))
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		calls := 0
		start := time.Now()
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		return calls, time.Since(start), err
	}
	committed := step{err: errLost, ran: true}
	waitingForAck := &fakeBackend{state: "Query", waitEvent: "Waiting for semi-sync ACK from slave"}
	wantAmbiguous := func(t *testing.T, calls int, err error) {
		t.Helper()
		if err == nil {
			t.Fatal("reported committed while no replica has acknowledged the commit: a failover loses it")
		}
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ErrAmbiguousCommit and no replay", err, calls)
		}
	}

	t.Run("old session waits for the ACK: not KILLed, ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync, srv.replicaFrozen = true, true
		srv.oldSession = waitingForAck
		calls, _, err := run(t, srv, committed, 300*time.Millisecond)
		wantAmbiguous(t, calls, err)
		if len(srv.mysqlKills) != 0 {
			t.Errorf("the session waiting for the ACK was KILLed (%v): that publishes a commit no replica has", srv.mysqlKills)
		}
	})
	t.Run("old session runs COMMIT under semi-sync: not KILLed", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync, srv.replicaFrozen = true, true
		srv.oldSession = &fakeBackend{state: "Query", waitEvent: "Commit"}
		calls, _, err := run(t, srv, committed, 300*time.Millisecond)
		wantAmbiguous(t, calls, err)
		if len(srv.mysqlKills) != 0 {
			t.Errorf("a committing session was KILLed under semi-sync (%v)", srv.mysqlKills)
		}
	})
	t.Run("waiter KILLed by someone else, replica frozen: ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync, srv.replicaFrozen = true, true
		calls, took, err := run(t, srv, committed, 300*time.Millisecond)
		wantAmbiguous(t, calls, err)
		if took > 2*time.Second {
			t.Errorf("took %v past a 300ms deadline", took)
		}
		if n := srv.ranCount("DELETE FROM " + marker + " WHERE token"); n != 0 {
			t.Errorf("the marker was deleted (%d) without an answer: a later lookup would say 'not committed'", n)
		}
	})
	t.Run("replica acknowledges the probe: committed, marker and probe deleted", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync = true
		calls, _, err := run(t, srv, committed, 5*time.Second)
		if err != nil || calls != 1 || srv.ranCount("INSERT INTO ledger") != 1 {
			t.Fatalf("err=%v calls=%d; want success without a replay", err, calls)
		}
		if srv.ranCount("INSERT INTO "+marker) != 2 || srv.ranCount("DELETE FROM "+marker+" WHERE token IN (?, ?)") != 1 {
			t.Errorf("marker inserts=%d deletes=%d; want the transaction's and the probe's, deleted together", srv.ranCount("INSERT INTO "+marker), srv.ranCount("DELETE FROM "+marker))
		}
	})
	t.Run("semi-sync switched off (a wait timed out): ambiguous, no probe", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync, srv.semiSyncOff = true, true
		calls, _, err := run(t, srv, committed, 300*time.Millisecond)
		wantAmbiguous(t, calls, err)
		if n := srv.ranCount("INSERT INTO " + marker); n != 1 {
			t.Errorf("marker inserts = %d, want only the transaction's: no probe while no replica acknowledges", n)
		}
	})
	t.Run("the probe's own wait times out: ambiguous, probe deleted, no more probes", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync, srv.semiSyncTimesOut = true, true
		calls, _, err := run(t, srv, committed, 300*time.Millisecond)
		wantAmbiguous(t, calls, err)
		if n, d := srv.ranCount("INSERT INTO "+marker), srv.ranCount("DELETE FROM "+marker+" WHERE token = ?"); n != 2 || d != 1 {
			t.Errorf("marker inserts = %d, probe deletes = %d; want 2 (the transaction's, one probe) and 1", n, d)
		}
	})
	t.Run("idle session under semi-sync (COMMIT never arrived): KILLed, replayed", func(t *testing.T) {
		srv := newFakeServer()
		srv.semiSync = true
		srv.oldSession = &fakeBackend{state: "Sleep"}
		calls, _, err := run(t, srv, step{err: errLost}, 5*time.Second)
		if err != nil || calls != 2 || srv.ranCount("INSERT INTO ledger") != 1 || len(srv.mysqlKills) != 1 {
			t.Fatalf("err=%v calls=%d inserts=%d kills=%v; want the idle session KILLed and one replay", err, calls, srv.ranCount("INSERT INTO ledger"), srv.mysqlKills)
		}
	})
	t.Run("no semi-sync: session KILLed, marker counts at once", func(t *testing.T) {
		srv := newFakeServer()
		srv.oldSession = &fakeBackend{state: "Query", waitEvent: "Commit"}
		calls, _, err := run(t, srv, committed, 5*time.Second)
		if err != nil || calls != 1 || len(srv.mysqlKills) != 1 {
			t.Fatalf("err=%v calls=%d kills=%v; want the session KILLed and success", err, calls, srv.mysqlKills)
		}
	})
}

func TestMySQLMayKill(t *testing.T) {
	for _, c := range []struct {
		semi           bool
		command, state string
		want           bool
	}{
		{false, "Sleep", "", true},
		{false, "Query", "Commit", true},
		{true, "Sleep", "", true},
		{true, "Query", "Commit", false},
		{true, "Query", "Waiting for semi-sync ACK from slave", false},
		{true, "Killed", "", false},
		{false, "Query", "Waiting for semi-sync ACK from replica", false}, // switched off since, still waiting
	} {
		if got := mysqlMayKill(c.semi, c.command, c.state); got != c.want {
			t.Errorf("mysqlMayKill(%v, %q, %q) = %v, want %v", c.semi, c.command, c.state, got, c.want)
		}
	}
}
