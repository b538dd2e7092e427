package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
)

// Lost COMMITs across a crash restart or a failover (resolve_failover.go),
// against the fake driver: each decision of pgJudgeLife.

// fakePGLife is a PostgreSQL ≥ 10 server as resolve_failover.go sees it.
// onResolve runs once, at the first identity question after a lost COMMIT:
// it is where a test crashes, restarts or replaces the server.
type fakePGLife struct {
	version    int64
	start      int64
	sys, tli   int64
	wal        uint64 // insert position
	replay     string // pg_last_wal_replay_lsn, "" for NULL
	inRecovery int    // identity answers still to come from a server in recovery
	onResolve  func(l *fakePGLife, xid int64)
	resolved   bool
	asked      []string // the questions before COMMIT, in order
	lastXID    int64
	history    string // the current timeline's history file; "" refuses it (no privilege)
	nowFails   int    // identity questions still to be lost with their connection
	historyAsk int    // how often it was read
	// The WAL segment of the transaction's timeline as the answering
	// server holds it (pgRecordAt): the record ending at the position the
	// last question returned is that question's message, unless walLost
	// (the crash lost it and a later life wrote over its place) or
	// walRefused (the file cannot be read).
	walLost, walRefused bool
	walMissing          bool // the segment is gone (a checkpoint removed it): NULL
	recordEnd           uint64
	walAsk              int
	firstTLI            int64 // the timeline the transactions ran on
}

func (l *fakePGLife) tli0() int64 { return l.firstTLI }

func newFakePGLife(version int64) *fakePGLife {
	return &fakePGLife{version: version, start: fakeStart, sys: 7313786064254129598, tli: 1, wal: 0x3001000}
}

func (l *fakePGLife) owns(q string) bool {
	if l == nil {
		return false
	}
	switch q {
	case pgAskXID, pgAskXIDAndServer, pgAskXIDAndServerBare, pgAskXIDProof13, pgAskXIDProof13AndServer, pgAskXIDProof10, pgAskXIDProof10AndServer,
		pgServerNowQuery, "SELECT " + pgStartTime, pgNoProofLifeQuery, pgNoProofStartQuery, pgHistoryFileQuery, pgWALSizesQuery, pgWALReadQuery:
		return true
	}
	return false
}

// lsnAnswer is a WAL position as a real server answers q: a number when q
// turns positions into bigint, else pg_lsn's text (as pgx's stdlib gives
// it).
func (l *fakePGLife) lsnAnswer(q, lsn string) driver.Value {
	if strings.Contains(q, "- '0/0'::pg_catalog.pg_lsn)::bigint") {
		n, _ := parseLSN(lsn)
		return int64(n)
	}
	return lsn
}

func lsnText(n uint64) string { return fmt.Sprintf("%X/%X", n>>32, n&0xffffffff) }

func (l *fakePGLife) answer(c *fakeConn, q string, args []driver.NamedValue) (driver.Rows, bool) {
	if !l.owns(q) {
		return nil, false
	}
	s := c.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	assign := func() int64 {
		if c.xid == 0 {
			s.nextXID++
			c.xid = s.nextXID
			s.xidStatus[c.xid] = "in progress"
		}
		l.lastXID = c.xid
		return c.xid
	}
	server := []driver.Value{c.pid, l.start, l.version}
	if (q == pgServerNowQuery || q == "SELECT "+pgStartTime || q == pgNoProofLifeQuery || q == pgNoProofStartQuery) && !l.resolved && l.onResolve != nil {
		l.resolved = true
		l.onResolve(l, l.lastXID)
	}
	switch q {
	case "SELECT " + pgStartTime:
		return &fakeRows{cols: []string{"start"}, data: [][]driver.Value{{l.start}}}, true
	case pgNoProofLifeQuery, pgNoProofStartQuery:
		rec := l.inRecovery > 0
		if rec {
			l.inRecovery--
		}
		row := []driver.Value{l.start, rec}
		if q == pgNoProofLifeQuery {
			var replay driver.Value
			if l.replay != "" {
				replay = l.lsnAnswer(q, l.replay)
			}
			row = append(row, replay)
		}
		return &fakeRows{cols: make([]string, len(row)), data: [][]driver.Value{row}}, true
	case pgHistoryFileQuery:
		l.historyAsk++
		if l.history == "" {
			return &fakeRows{cols: []string{"pg_read_file"}, nextErr: &pgError{"42501", "permission denied for function pg_read_file"}}, true
		}
		return &fakeRows{cols: []string{"pg_read_file"}, data: [][]driver.Value{{l.history}}}, true
	case pgWALSizesQuery:
		return &fakeRows{cols: []string{"bytes_per_wal_segment", "wal_block_size"}, data: [][]driver.Value{{int64(16 << 20), int64(8192)}}}, true
	case pgWALReadQuery:
		l.walAsk++
		if l.walRefused {
			return &fakeRows{cols: []string{"pg_read_binary_file"}, nextErr: &pgError{"42501", "permission denied for function pg_read_binary_file"}}, true
		}
		if l.walMissing {
			return &fakeRows{cols: []string{"pg_read_binary_file"}, data: [][]driver.Value{{nil}}}, true
		}
		// The window asked ends at the record's end: the message with
		// the id in its payload, as PostgreSQL writes it, or the zeros a
		// WAL switch left there.
		name, off, n := args[0].Value.(string), args[1].Value.(int64), args[2].Value.(int64)
		buf := make([]byte, n)
		seg := uint64(16 << 20)
		want := fmt.Sprintf("%08X%08X%08X", l.tli0(), (l.recordEnd-1)/seg/0x100, (l.recordEnd-1)/seg%0x100)
		if !l.walLost && name == want && uint64(off)+uint64(n) == (l.recordEnd-1)%seg+1 && n >= 96 {
			rec := walMessageRecord(uint32(l.lastXID), fmt.Sprint(l.lastXID))
			aligned := (len(rec) + 7) &^ 7
			copy(buf[n-int64(aligned):], rec)
		}
		return &fakeRows{cols: []string{"pg_read_binary_file"}, data: [][]driver.Value{{buf}}}, true
	case pgAskXID: // without the proof, the server asked before on this connection
		l.asked = append(l.asked, q)
		return &fakeRows{cols: []string{"xid"}, data: [][]driver.Value{{assign()}}}, true
	case pgAskXIDAndServer:
		l.asked = append(l.asked, q)
		var replay driver.Value // where the last recovery ended: NULL when none
		if l.replay != "" {
			replay = l.lsnAnswer(q, l.replay)
		}
		row := append(append([]driver.Value{assign()}, server...), replay)
		return &fakeRows{cols: make([]string, len(row)), data: [][]driver.Value{row}}, true
	case pgAskXIDAndServerBare:
		l.asked = append(l.asked, q)
		row := append([]driver.Value{assign()}, server...)
		return &fakeRows{cols: make([]string, len(row)), data: [][]driver.Value{row}}, true
	case pgServerNowQuery:
		if l.nowFails > 0 {
			l.nowFails--
			return &fakeRows{cols: make([]string, 5), nextErr: io.ErrUnexpectedEOF}, true
		}
		rec := l.inRecovery > 0
		var tli, replay driver.Value
		if rec {
			l.inRecovery--
		} else {
			tli = fmt.Sprintf("%08X", l.tli)
		}
		if l.replay != "" {
			replay = l.lsnAnswer(q, l.replay)
		}
		row := []driver.Value{l.start, rec, l.sys, tli, replay}
		return &fakeRows{cols: make([]string, len(row)), data: [][]driver.Value{row}}, true
	}
	// A question with the proof: the message assigns the id and is logged.
	l.asked = append(l.asked, q)
	l.wal += 0x48
	var xid driver.Value = assign()
	if strings.Contains(q, "pg_current_xact_id() END") {
		xid = fmt.Sprint(xid) // xid8: pgx's stdlib gives its text
	}
	l.recordEnd = l.wal
	if l.firstTLI == 0 {
		l.firstTLI = l.tli
	}
	row := []driver.Value{xid, l.lsnAnswer(q, lsnText(l.wal))}
	if strings.HasSuffix(q, pgHistoryID) {
		var replay driver.Value // where the last recovery ended: NULL when none
		if l.replay != "" {
			replay = l.lsnAnswer(q, l.replay)
		}
		// The columns the question asks for, as a real server answers:
		// the version only if it asks for it.
		if !strings.Contains(q, "server_version_num") {
			server = server[:2]
		}
		row = append(row, append(server, l.sys, fmt.Sprintf("%08X", l.tli), replay)...)
	}
	return &fakeRows{cols: make([]string, len(row)), data: [][]driver.Value{row}}, true
}

// failoverRun runs transactions inserting op-1.. on db; the last one's
// COMMIT is lost after the server committed it (ran) or before.
func failoverRun(t *testing.T, srv *fakeServer, warmups int, committed bool) (calls int, err error) {
	t.Helper()
	db, _ := testDB(t, srv)
	db.SetMaxOpenConns(1)
	for i := 0; i < warmups; i++ {
		if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO warmup VALUES (1)")
			return err
		}); err != nil {
			t.Fatalf("warm-up transaction: %v", err)
		}
	}
	srv.script("COMMIT", step{err: errLost, ran: committed})
	err = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
		return err
	})
	return calls, err
}

// crash makes the server restart: its start time changes and its recovery
// ended replayDelta bytes after the end of the lost transaction's WAL
// record (before it when negative); it writes on from there.
func crash(replayDelta int64) func(l *fakePGLife, xid int64) {
	return func(l *fakePGLife, xid int64) {
		l.start += 42_000_000
		l.replay = lsnText(uint64(int64(l.wal) + replayDelta))
		l.walLost = replayDelta < 0 // the next life writes over its place
		l.wal += 0x1000
	}
}

// crashCycle is a crash restart that keeps the postmaster (a backend
// killed: every session ends, crash recovery runs, the start time stays):
// its recovery ended replayDelta bytes after the end of the lost
// transaction's WAL record; it writes on from there.
func crashCycle(replayDelta int64) func(l *fakePGLife, xid int64) {
	return func(l *fakePGLife, _ int64) {
		l.replay = lsnText(uint64(int64(l.wal) + replayDelta))
		l.wal += 0x1000
	}
}

// forkAt promotes the server n timelines on, in a life that started after
// the connection asked (so that its start time proves nothing); its
// history leaves the transaction's timeline delta bytes after the end of
// the id's record (a later fork each 0x100 bytes on).
func forkAt(delta int64, n int64) func(l *fakePGLife, xid int64) {
	return func(l *fakePGLife, xid int64) {
		l.start += 700_000_000
		at := uint64(int64(l.wal) - 0x1000 + delta) // crash() moved wal on by 0x1000
		var b strings.Builder
		for i := int64(0); i < n; i++ {
			fmt.Fprintf(&b, "%d\t%s\tno recovery target specified\n", l.tli+i, lsnText(at+uint64(i)*0x100))
		}
		l.tli += n
		l.history = b.String()
	}
}

// replayToFork: the promoted life started in recovery from the previous
// one's clean shutdown and replayed up to the switch point (Patroni starts
// a crashed primary read-only, then promotes it).
func replayToFork(l *fakePGLife, _ int64) {
	f := strings.Fields(l.history)
	l.replay = f[1]
}

func setStatus(srv *fakeServer, status string) func(l *fakePGLife, xid int64) {
	return func(l *fakePGLife, xid int64) { srv.xidStatus[xid] = status }
}

func both(fs ...func(l *fakePGLife, xid int64)) func(l *fakePGLife, xid int64) {
	return func(l *fakePGLife, xid int64) {
		for _, f := range fs {
			f(l, xid)
		}
	}
}

func TestFailoverResolutionDecisions(t *testing.T) {
	type tc struct {
		name      string
		version   int64
		committed bool // the server committed the lost COMMIT
		after     func(srv *fakeServer) func(l *fakePGLife, xid int64)
		want      string // "committed", "replayed", "ambiguous"
	}
	// promote makes a standby running since before the answer; the
	// history file of its timeline (read as a superuser) says it left the
	// transaction's timeline where its replay ended.
	promote := func(tliDelta int64, replayDelta int64) func(l *fakePGLife, xid int64) {
		return func(l *fakePGLife, xid int64) {
			l.start -= 3_600_000_000 // a standby running since before
			l.replay = lsnText(uint64(int64(l.wal) + replayDelta))
			l.walLost = replayDelta < 0 // the standby never received it
			var b strings.Builder
			for i := int64(0); i < tliDelta; i++ {
				fmt.Fprintf(&b, "%d\t%s\tno recovery target specified\n", l.tli+i, l.replay)
			}
			l.history = b.String()
			l.tli += tliDelta
		}
	}
	refused := func(l *fakePGLife, _ int64) { l.history = "" } // a role that may not read it
	cases := []tc{
		{"crash restart, recovery reached the id's record, committed: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crash(+0x30) }, "committed"},
		{"crash restart, recovery reached the id's record, not committed: replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crash(0) }, "replayed"},
		{"crash restart, the id's record lost and the id reused by a commit: replayed (ours, past the record, was lost too)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(-0x20), setStatus(srv, "committed"))
			}, "replayed"},
		{"crash restart, the id's record lost, id not reused: replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crash(-0x20) }, "replayed"},
		{"the same, PostgreSQL 12 (txid functions): committed", 120000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crash(+0x30) }, "committed"},
		{"PostgreSQL 9.6 (no proof): a restart makes committed ambiguous", 90600, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crash(+0x30) }, "ambiguous"},
		{"PostgreSQL 9.6 (no proof): a crash restart that kept the postmaster (a backend killed: the same start time), the record lost and the id reused by a commit: ambiguous", 90600, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crashCycle(-0x20), setStatus(srv, "committed"))
			}, "ambiguous"},
		{"PostgreSQL 9.6 (no proof): the same, the commit durable: ambiguous (the same start time cannot tell the two apart)", 90600, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crashCycle(+0x30) }, "ambiguous"},
		{"PostgreSQL 9.6 (no proof): a crash restart that kept the postmaster, the record lost, the id not handed out again (in the future): replayed", 90600, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crashCycle(-0x20), setStatus(srv, "future"))
			}, "replayed"},
		{"PostgreSQL 9.6 (no proof): a restart, the record lost, the id in the future: replayed", 90600, false,
			func(srv *fakeServer) func(*fakePGLife, int64) { return both(crash(-0x20), setStatus(srv, "future")) }, "replayed"},
		{"PostgreSQL 9.6 (no proof): no recovery since the server started: committed", 90600, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return nil }, "committed"},
		{"PostgreSQL 9.6 (no proof): a crash restart that kept the postmaster, the id aborted: replayed", 90600, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crashCycle(-0x20), setStatus(srv, "aborted"))
			}, "replayed"},
		{"clean restart (no recovery), same timeline: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return func(l *fakePGLife, _ int64) { l.start += 42_000_000 }
			}, "committed"},
		{"promoted standby (next timeline) that replayed past the record: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return promote(1, +0x30) }, "committed"},
		{"promoted standby that stopped before the record, the id reused: replayed (ours is not in its history)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(promote(1, -0x10), setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, restarted since (its replay position, before the record, is past its fork): replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(promote(1, -0x10), func(l *fakePGLife, _ int64) { l.start += 3_600_000_000 + 700_000_000 }, setStatus(srv, "committed"))
			}, "replayed"},
		{"promoted standby that stopped before the record, id aborted: replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(promote(1, -0x10), setStatus(srv, "aborted"))
			}, "replayed"},
		{"the same, the history file refused (no privilege): ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return both(promote(1, +0x30), refused) }, "ambiguous"},
		{"promoted standby restarted since (its replay position is on the new timeline), history refused, the id reused: ambiguous", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(promote(1, +0x3000), refused, setStatus(srv, "committed"))
			}, "ambiguous"},
		{"a server two timelines on: committed, by its history file", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return promote(2, +0x30) }, "committed"},
		{"a server two timelines on, history refused: ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return both(promote(2, +0x30), refused) }, "ambiguous"},
		{"a crash restart that kept the postmaster (a backend killed: same start time), recovery ended before the record, the id reused: replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crashCycle(-0x20), setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, recovery past the record, committed: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return crashCycle(+0x30) }, "committed"},
		{"a server without recovery on another timeline: ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return func(l *fakePGLife, _ int64) { l.start += 1; l.tli++ }
			}, "ambiguous"},
		{"another cluster: even aborted is no answer", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(func(l *fakePGLife, _ int64) { l.sys++ }, setStatus(srv, "aborted"))
			}, "ambiguous"},
		{"a standby answers first, then the promoted one: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(promote(1, +0x30), func(l *fakePGLife, _ int64) { l.inRecovery = 3 })
			}, "committed"},
		{"restarted as a standby after a crash and promoted (Patroni), its history forks past the record: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), forkAt(+0x30, 1))
			}, "committed"},
		{"restarted after a crash that lost the record, the later life wrote past its end on the same timeline (single-user crash recovery, a WAL switch), then promoted (Patroni): the fork lies past the record, the id reused and committed on the new timeline: replayed (the WAL at the record is another life's)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(-0x20), forkAt(+0x30, 1), replayToFork, setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, the WAL segment unreadable: ambiguous", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(-0x20), forkAt(+0x30, 1), replayToFork, setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.walRefused = true })
			}, "ambiguous"},
		{"crash recovery past the record, promoted, the WAL segment unreadable: ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), forkAt(+0x30, 1), func(l *fakePGLife, _ int64) { l.walRefused = true })
			}, "ambiguous"},
		{"a crash that lost the record, a single-user crash recovery that wrote past it and shut down cleanly, then started as it was (no recovery, same timeline), the id reused and committed: replayed (the WAL at the record is another life's)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(-0x20), func(l *fakePGLife, _ int64) { l.replay = ""; l.start += 1_000_000 }, setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, the fork exactly at the end of the record: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(0), forkAt(0, 1))
			}, "committed"},
		{"the same, the history file refused (no privilege): ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), forkAt(+0x30, 1), func(l *fakePGLife, _ int64) { l.history = "" })
			}, "ambiguous"},
		{"promoted before the record, restarted since (replay past the record on the new timeline), the id reused: replayed (the history file says where it forked)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x3000), forkAt(-0x10, 1), setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, the history file refused: ambiguous", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x3000), forkAt(-0x10, 1), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.history = "" })
			}, "ambiguous"},
		{"two timelines on, the first fork past the record: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x3000), forkAt(+0x30, 2))
			}, "committed"},
		{"a history that does not hold our timeline: ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), forkAt(+0x30, 1), func(l *fakePGLife, _ int64) {
					l.history = strings.ReplaceAll(l.history, "1\t", "7\t")
				})
			}, "ambiguous"},
		{"crash restart, recovery past the record, committed, but an earlier question died with its server, the WAL at the record unreadable: ambiguous (that server may have been a life that lost the record and reused the id)", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), func(l *fakePGLife, _ int64) { l.nowFails = 1; l.walRefused = true })
			}, "ambiguous"},
		{"the same, the WAL at the record is the transaction's message: committed", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), func(l *fakePGLife, _ int64) { l.nowFails = 1 })
			}, "committed"},
		{"the same, the WAL at the record is another life's (a life that lost the record, reused the id and wrote past it): replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.nowFails = 1; l.walLost = true })
			}, "replayed"},
		{"two crashes, the middle life never reached: it lost the record, reused the id in a commit and wrote past the record; the last recovery ended past it: replayed (the WAL at the record is another life's)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.walLost = true })
			}, "replayed"},
		{"the same with the postmaster kept (backends killed twice: the same start time): replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(func(l *fakePGLife, _ int64) { l.replay = lsnText(l.wal + 0x30); l.wal += 0x1000; l.walLost = true }, setStatus(srv, "committed"))
			}, "replayed"},
		{"the same, the WAL segment gone (a checkpoint since removed it): ambiguous", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.walLost = true; l.walMissing = true })
			}, "ambiguous"},
		{"one crash, the commit durable, the WAL segment gone: ambiguous (cannot tell it from the case above)", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), func(l *fakePGLife, _ int64) { l.walMissing = true })
			}, "ambiguous"},
		{"a clean restart, the WAL segment gone: ambiguous", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return func(l *fakePGLife, _ int64) { l.start += 42_000_000; l.walMissing = true }
			}, "ambiguous"},
		{"the same, the WAL segment unreadable (no privilege): committed, as the replay position says (the gap named in the README)", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(+0x30), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.walLost = true; l.walRefused = true })
			}, "committed-wrongly"},
		{"the same, recovery before the record: replayed", 150000, false,
			func(srv *fakeServer) func(*fakePGLife, int64) {
				return both(crash(-0x20), setStatus(srv, "committed"), func(l *fakePGLife, _ int64) { l.nowFails = 1 })
			}, "replayed"},
		{"no restart: as before", 150000, true,
			func(srv *fakeServer) func(*fakePGLife, int64) { return nil }, "committed"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			srv := newFakeServer()
			l := newFakePGLife(c.version)
			l.onResolve = c.after(srv)
			srv.pgLife = l
			calls, err := failoverRun(t, srv, 1, c.committed)
			var got string
			switch {
			case errors.Is(err, ErrAmbiguousCommit):
				got = "ambiguous"
			case err != nil:
				t.Fatalf("err = %v", err)
			case calls == 1:
				got = "committed"
			default:
				got = "replayed"
			}
			if c.want == "committed-wrongly" {
				// The id's status is another transaction's and the history
				// cannot be read: what sqlretry cannot see.
				if got != "committed" || l.walAsk == 0 {
					t.Fatalf("outcome %s (calls=%d, err=%v, WAL read %d times), want committed after a refused WAL read", got, calls, err, l.walAsk)
				}
				return
			}
			if got != c.want {
				t.Fatalf("outcome %s (calls=%d, err=%v), want %s; asked %q", got, calls, err, c.want, l.asked)
			}
			if n := srv.ranCount("INSERT INTO ledger"); got != "ambiguous" && n != 1 {
				t.Errorf("the ledger row is there %d times, want 1", n)
			}
			if c.version >= pgProofMinVersion && !l.resolved && c.want != "committed" {
				t.Error("the server's identity was never asked")
			}
		})
	}
}

// The proof rides on the question sqlretry asked before: one statement
// before COMMIT, as without it; the xid8 functions from PostgreSQL 13 on.
func TestFailoverProofAddsNoRoundTrip(t *testing.T) {
	for _, v := range []struct {
		version int64
		want    []string
	}{
		// The server's life is asked with every question (pgHistoryID):
		// behind a pooler one connection may reach several lives.
		{150000, []string{pgAskXIDAndServer, pgAskXIDProof13AndServer, pgAskXIDProof13AndServer}},
		{120000, []string{pgAskXIDAndServer, pgAskXIDProof10AndServer, pgAskXIDProof10AndServer}},
		{90600, []string{pgAskXIDAndServer, pgAskXID, pgAskXID}}, // the server once per connection
	} {
		t.Run(fmt.Sprint(v.version), func(t *testing.T) {
			srv := newFakeServer()
			srv.pgLife = newFakePGLife(v.version)
			db, _ := testDB(t, srv)
			db.SetMaxOpenConns(1)
			for i := 0; i < 3; i++ {
				if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
					return err
				}); err != nil {
					t.Fatal(err)
				}
			}
			asked := srv.pgLife.asked
			for i, q := range v.want {
				if len(asked) != len(v.want) || asked[i] != q {
					t.Fatalf("questions before COMMIT = %q, want %q", asked, v.want)
				}
			}
			// The question with the proof is asked once the version is
			// known: asking it again would cost the server a GUC lookup
			// per transaction for an answer never used.
			for _, q := range asked[1:] {
				if strings.Contains(q, "server_version_num") {
					t.Errorf("a question with the proof asks for the version again: %q", q)
				}
			}
			if strings.Contains(pgAskXIDProof13, "txid_") {
				t.Error("the PostgreSQL 13 question uses the txid functions")
			}
		})
	}
}

// A role that may not write the message (REVOKE on pg_logical_emit_message):
// the refused question aborted the transaction before COMMIT, so it is
// replayed once and the question without the proof is asked from then on.
func TestFailoverProofRefusedFallsBack(t *testing.T) {
	srv, l, run := proofRefusedBed(t, "INSERT INTO t VALUES (1)")
	srv.script(pgAskXIDProof13, step{err: errProofRefused()})
	calls, err := run()
	if err != nil || calls != 2 {
		t.Fatalf("calls=%d err=%v; want one replay, then success", calls, err)
	}
	if n := srv.ranCount("INSERT INTO t"); n != 2 {
		t.Errorf("inserts committed = %d, want 2 (one per successful transaction)", n)
	}
	last := l.asked[len(l.asked)-1]
	if strings.Contains(last, "pg_logical_emit_message") {
		t.Errorf("still asks with the proof after the refusal: %q", last)
	}
}

// With the proof refused (the version forgotten: -1), a lost COMMIT is
// judged without it: a crash restart that kept the postmaster (a backend
// killed: the same start time) may have lost the record and handed the id
// out again, so "committed" is no answer; a server that has run no
// recovery since it started answers.
func TestFailoverProofRefusedCrashCycle(t *testing.T) {
	for _, c := range []struct {
		name      string
		recovery  bool
		committed bool
		want      string
	}{
		{"a recovery since the connection asked, the id committed (ours, or another's after the crash): ambiguous", true, false, "ambiguous"},
		{"the same, our commit durable: ambiguous", true, true, "ambiguous"},
		{"no recovery since the connection asked: committed", false, true, "committed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv, l, run := proofRefusedBed(t, "INSERT INTO ledger VALUES ('op-1')")
			srv.script(pgAskXIDProof13, step{err: errProofRefused()})
			if _, err := run(); err != nil { // refused, replayed without the proof
				t.Fatal(err)
			}
			l.onResolve = func(l *fakePGLife, xid int64) {
				if c.recovery {
					l.replay = lsnText(l.wal + 0x30)
					l.wal += 0x1000
				}
				srv.xidStatus[xid] = "committed"
			}
			srv.script("COMMIT", step{err: errLost, ran: c.committed})
			calls, err := run()
			got := "replayed"
			switch {
			case errors.Is(err, ErrAmbiguousCommit):
				got = "ambiguous"
			case err != nil:
				t.Fatalf("err = %v", err)
			case calls == 1:
				got = "committed"
			}
			if got != c.want || !l.resolved {
				t.Fatalf("outcome %s (calls=%d, err=%v, asked after the loss: %v), want %s", got, calls, err, l.resolved, c.want)
			}
		})
	}
}

// proofRefusedBed is a PostgreSQL 15 fake on one connection whose server
// aborts a transaction at a failed statement, and run, a RunInTx of stmt
// that says how often its closure ran; a first run has taught the version.
func proofRefusedBed(t *testing.T, stmt string) (*fakeServer, *fakePGLife, func() (int, error)) {
	t.Helper()
	srv := newFakeServer()
	l := newFakePGLife(150000)
	srv.pgLife = l
	srv.pgAborts = true
	db, _ := testDB(t, srv)
	db.SetMaxOpenConns(1)
	run := func() (int, error) {
		calls := 0
		err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, stmt)
			return err
		})
		return calls, err
	}
	if _, err := run(); err != nil {
		t.Fatal(err)
	}
	return srv, l, run
}

// errProofRefused is the server's refusal of the question with the proof
// to a role that may not run pg_logical_emit_message.
func errProofRefused() error {
	return &pgError{"42501", "permission denied for function pg_logical_emit_message"}
}
