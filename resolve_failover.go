package sqlretry

import (
	"context"
	"database/sql/driver"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Lost COMMITs across a crash restart or a failover (PostgreSQL ≥ 10).
//
// A transaction id is handed out again after a crash or a promotion when
// no WAL record carrying it (nor a later id, nor a checkpoint past it)
// reached the history the server now continues: recovery sets the next id
// past the highest one it replayed. So "id X committed" on a server that
// has restarted, or on a promoted standby, is about our transaction only
// if that history holds a record with X. sqlretry makes sure there is one
// at a known place: the question it asks before COMMIT (the same single
// round trip as before) also writes a transactional logical decoding
// message (pg_logical_emit_message, prefix "sqlretry"), which carries the
// transaction's id, and reads where that record ends (L) and what names
// the server's life: system identifier, timeline, start time and where its
// last recovery ended (asked with every transaction: a crash restart that
// keeps the postmaster keeps its start time, and behind a pooler one
// client connection outlives server restarts). After a lost COMMIT, when
// the server that answers is another life (any of those differ):
//   - another cluster (system identifier) cannot answer;
//   - on the same timeline, the end of its last recovery
//     (pg_last_wal_replay_lsn) before L means the crash lost the record
//     and our commit record after it: not committed, whatever it says of
//     the id; at or past L, or no recovery at all (a clean shutdown wrote
//     every id it had handed out into its checkpoint), the history holds
//     a record at L, and its answer is ours if that record is ours: where
//     the WAL at L can be read (pgRecordAt), no message of ours ending
//     there means the record is a later life's that no client of ours
//     reached (a crash recovery in single-user mode, or a life between
//     two crashes that reused the id and wrote past L), ours lost before
//     it: not committed; where it cannot be read, the replay position is
//     taken for the proof (the gap below);
//   - on a later timeline (a promotion), the history file of its timeline
//     (pg_read_file: superuser or EXECUTE granted; pg_read_server_files
//     alone grants no EXECUTE)
//     names where it left ours: before L, not committed; at or past L, its
//     answer is ours only if the WAL of our timeline it holds ends a
//     record at L that is our message (read with pg_read_binary_file,
//     pgRecordAt): the message is not flushed before the COMMIT, so a
//     crash can lose it, and the next life on our timeline writes over
//     its place before the promotion (Patroni's single-user crash
//     recovery, whose shutdown hands the next id, ours, to the promoted
//     timeline, and switches the WAL segment, forking past L). No
//     message of ours ends there: not committed; the segment unreadable:
//     ErrAmbiguousCommit. Without the file: a replay position before L on
//     the next timeline is not committed too (the position is where it
//     left ours or, had it crashed since, further on); any other
//     "committed" stays ErrAmbiguousCommit, since a promoted server that
//     crashed since (start time kept or not) shows the end of that crash's
//     recovery, which says nothing of where it left ours.
// Our commit record lies past L, so a COMMIT that took effect on the
// history the server continues is always recognised where the rules can
// see L. A server in recovery (a standby, a server still electing) is
// asked again later.
//
// What this cannot see, where the WAL at L may not be read: two lives of
// the same timeline between the COMMIT and the answer: a crash that loses
// L, a restart that hands ids out again and writes past L, and a second
// crash or a clean restart, all before sqlretry reaches the server, which
// then answers on that same timeline. The WAL at L is then another
// life's. sqlretry asks again every half second at most, and any answer
// of the middle life is final and right, so this takes two failures
// within that window. Where the WAL may be read, only a later life's
// message with our id, handed out again, ending exactly at L fools it.
// Timelines are taken to be unique in the cluster (no split brain).

// pgProofMinVersion is the first server_version_num with
// pg_current_wal_insert_lsn and pg_last_wal_replay_lsn; pgXid8Version the
// first with the xid8 functions.
const (
	pgProofMinVersion = 100000
	pgXid8Version     = 130000
)

// pgServerInfo asks for what identifies the server and the session, and
// for its version, in the question before the version is known (or below
// PostgreSQL 10, where it is asked once per connection).
const pgServerInfo = pgSessionInfo + ", pg_catalog.current_setting('server_version_num')::int"

// pgSessionInfo is the backend pid and the server's start time: with every
// transaction's question from PostgreSQL 10 on (with pgHistoryID). The
// question with the proof does not ask for the version: it is asked only
// once the version is known, and pgTakeAnswer never replaced a known
// version (the column cost the server a GUC lookup and a cast per
// transaction for nothing).
const pgSessionInfo = ", pg_catalog.pg_backend_pid(), " + pgStartTime

// pgProofCols: the end of the logical message, the proof that the id is in
// the WAL, NULL in recovery. The positions (here and in pgReplayCol) and
// the xid8 come as the server writes them and are read by the client
// (lsnValue, asInt64): turning them into bigint on the server (pg_lsn
// subtraction into numeric, then a cast; xid8 through text) cost it more
// than the string the driver allocates (BenchmarkPgQuestionColumnCost).
//
// The message's payload is the transaction's id in decimal, as the first
// column returns it: the WAL check (pgRecordAt) compares it, and the
// record's own id would be a subtransaction's inside a savepoint.
const (
	pgProofCols13 = ", CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
		"ELSE pg_catalog.pg_logical_emit_message(true, 'sqlretry', pg_catalog.pg_current_xact_id()::text) END"
	pgProofCols10 = ", CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
		"ELSE pg_catalog.pg_logical_emit_message(true, 'sqlretry', pg_catalog.txid_current()::text) END"
)

// pgHistoryID asks, with every question before COMMIT, for what names the
// life of the server the transaction runs on: the system identifier, the
// timeline (NULL in recovery) and where its last recovery ended (NULL when
// it started without one). With pgServerInfo's start time they change
// with every restart, and the replay position also with a crash restart
// that keeps the postmaster (a backend killed: the postmaster ends every
// session and runs crash recovery, and pg_postmaster_start_time stays).
// Asked per transaction, not per connection: behind a pooler the same
// client connection reaches a server that may have restarted since.
const pgHistoryID = ", " + pgSystemIDCol + ", " + pgTimelineCol + ", " + pgReplayCol

// The columns that name a server's life, in the question before COMMIT
// and in the one after a lost COMMIT (pgServerNowQuery) alike: the system
// identifier, the timeline (hex, NULL in recovery) and where the last
// recovery ended (NULL, read as 0, when there was none).
const (
	pgSystemIDCol = "(pg_catalog.pg_control_system()).system_identifier"
	pgTimelineCol = "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
		"ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 1, 8) END"
	pgReplayCol = "pg_catalog.pg_last_wal_replay_lsn()"
)

// The questions before COMMIT with the proof, per server generation: the
// xid8 functions from PostgreSQL 13 on, txid_current before. The message
// assigns the id if the transaction has none (as txid_current did).
const (
	pgAskXIDProof13 = "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
		"ELSE pg_catalog.pg_current_xact_id() END" + pgProofCols13
	pgAskXIDProof10 = "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
		"ELSE pg_catalog.txid_current() END" + pgProofCols10
	pgAskXIDProof13AndServer = pgAskXIDProof13 + pgSessionInfo + pgHistoryID
	pgAskXIDProof10AndServer = pgAskXIDProof10 + pgSessionInfo + pgHistoryID
)

// pgServerNowQuery asks, after a lost COMMIT, which life of which server
// answers.
const pgServerNowQuery = "SELECT " + pgStartTime + ", pg_catalog.pg_is_in_recovery(), " +
	pgSystemIDCol + ", " + pgTimelineCol + ", " + pgReplayCol

// pgMark is what a transaction recorded of the history its id belongs to;
// lsn 0 when it recorded nothing (an older server, the first transactions
// before the version was known, the proof turned off).
type pgMark struct {
	sys    int64  // system identifier
	tli    int64  // timeline
	start  int64  // the server's start time (µs)
	replay uint64 // where its last recovery ended; 0: it started without one
	lsn    uint64 // end of the WAL record carrying the id
}

// pgAskQuery picks the question before COMMIT for connection c.
func (r *retrier) pgAskQuery(c *conn) (q string, ask, proof bool) {
	v := r.resolution.pgVersion.Load()
	proof = v >= pgProofMinVersion
	switch {
	case !proof:
		q, ask = pgAskXID, c.serverID == 0
		if ask {
			q = pgAskXIDAndServer
			if r.resolution.pgNoReplay.Load() {
				q = pgAskXIDAndServerBare
			}
		}
	case v >= pgXid8Version:
		q, ask = pgAskXIDProof13AndServer, true // the server's life, every time (pgHistoryID)
	default:
		q, ask = pgAskXIDProof10AndServer, true
	}
	return q, ask, proof
}

// pgTakeAnswer records the answer of pgAskQuery's question: without the
// proof the id, and when ask the backend pid, the start time and the
// version; with it the id, the end of the message, the pid, the start
// time and the life (pgHistoryID).
func (t *tx) pgTakeAnswer(vals []driver.Value, ask, proof bool) {
	c, r := t.c, t.c.r
	if vals[0] == nil {
		t.nothingDurable = true // in recovery: read-only, no id, nothing to commit
	}
	t.xid = asInt64(vals[0])
	t.mark = pgMark{}
	if !proof {
		if ask && len(vals) >= 3 {
			c.serverID, c.serverStart, c.serverReplay = asInt64(vals[1]), asInt64(vals[2]), replayAt(vals, 4)
			if len(vals) > 3 {
				if v := asInt64(vals[3]); v > 0 {
					r.resolution.pgVersion.CompareAndSwap(0, v)
				}
			}
		}
		return
	}
	if len(vals) < 2 {
		return
	}
	lsn := lsnValue(vals[1])
	if !ask || len(vals) < 4 {
		return
	}
	// The replay position is kept for the question without the proof too,
	// should the role be refused it later.
	c.serverID, c.serverStart, c.serverReplay = asInt64(vals[2]), asInt64(vals[3]), replayAt(vals, 6)
	if lsn != 0 && len(vals) >= 7 {
		h := pgMark{sys: asInt64(vals[4]), start: asInt64(vals[3]), replay: c.serverReplay, lsn: lsn}
		h.tli, _ = parseHexInt(vals[5])
		if h.sys != 0 && h.tli != 0 && h.start != 0 {
			t.mark = h
		}
	}
}

// pgProofRefused: the server refuses the question with the proof (the
// role may not run pg_logical_emit_message, or the function is missing or
// unsupported, as on engines that speak PostgreSQL's protocol and report
// a recent server_version_num): the failed statement aborted the
// transaction before COMMIT, so it is replayed once and the question goes
// back to the one without the proof. Turning the proof off never makes an
// answer wrong: "committed" after a restart is then ambiguous.
func (r *retrier) pgProofRefused(err error) bool {
	var pg interface{ SQLState() string }
	if !errors.As(err, &pg) {
		return false
	}
	switch pg.SQLState() {
	case "42501", "42883", "0A000", // insufficient privilege, undefined function, feature not supported
		"55000", "XX000": // object not in prerequisite state, internal error

		r.resolution.pgVersion.Store(-1)
		return true
	}
	return false
}

// pgReplayRefused: the server refuses pg_last_wal_replay_lsn in the
// question without the proof (EXECUTE revoked from the role, an engine
// without it): the question goes without it from now on, and a connection
// records no replay position (replayUnknown: any recovery in the server's
// life then makes a "committed" ambiguous, pgNoProofRecovered). A 42501
// for another function of the question comes back from the question
// without it, and fails there as it did before the column.
func (r *retrier) pgReplayRefused(err error) bool {
	switch ErrorCode(err) {
	case "42883", "0A000":
		// Only where the function missing is this one: an engine without
		// the txid functions turns the question off at once (lacksFunction).
		if !strings.Contains(err.Error(), "replay_lsn") {
			return false
		}
	case "42501":
	default:
		return false
	}
	r.resolution.pgNoReplay.Store(true)
	return true
}

// pgNow is one answer of pgServerNowQuery.
type pgNow struct {
	start      int64
	inRecovery bool
	sys, tli   int64
	replay     uint64 // 0: the server started without recovery
}

func pgAskNow(ctx context.Context, dc driver.Conn) (pgNow, error) {
	vals, err := queryRow(ctx, dc, pgServerNowQuery)
	if err != nil {
		return pgNow{}, err
	}
	if len(vals) < 5 {
		return pgNow{}, errors.New("sqlretry: the server's identity query returned too few columns")
	}
	n := pgNow{start: asInt64(vals[0]), sys: asInt64(vals[2])}
	n.inRecovery, _ = vals[1].(bool)
	n.tli, _ = parseHexInt(vals[3])
	n.replay = lsnValue(vals[4])
	return n, nil
}

// errOtherCluster: the server that answers is not of the cluster the
// transaction ran on.
var errOtherCluster = errors.New("sqlretry: the server that answers is another cluster (system identifier differs): it cannot say whether the COMMIT took effect")

// pgJudgeLife compares the server that answers with the one the
// transaction ran on: restarted says it is another life (a restart, a
// promoted standby), proven that its history holds the record with the id,
// so that its answer about the id is about our transaction, beyond that
// its history does not reach that record, so that our commit record,
// which lies past it, is not in the history the server continues: not
// committed, whatever it says of the id (a "committed" is another
// transaction's that took the id again).
func pgJudgeLife(m pgMark, now pgNow) (restarted, proven, beyond bool, err error) {
	if now.sys != m.sys {
		return true, false, false, errOtherCluster
	}
	if now.start == m.start && now.tli == m.tli && now.replay == m.replay {
		return false, true, false, nil
	}
	switch {
	case now.replay == 0:
		// Started without recovery: its previous shutdown was clean and
		// wrote every id handed out. Only on the same timeline: a promoted
		// standby always has a replay position.
		proven = now.tli == m.tli
	case now.tli == m.tli:
		// Crash recovery ended at the replay position: past the record,
		// the id is in the history; before it, the WAL that held the
		// record (and our commit record after it) was lost with the crash.
		proven, beyond = now.replay >= m.lsn, now.replay < m.lsn
	case now.tli == m.tli+1 && now.replay < m.lsn:
		// The replay position of a promoted server is where it left the
		// old timeline, or, if it crashed since, the end of a recovery on
		// the new timeline, past that point: either way it left ours
		// before the record.
		beyond = true
	}
	// A promoted server whose replay position is past the record: that
	// position is where it left our timeline only if it has not crashed
	// since its promotion, which neither its start time (a crash restart
	// may keep the postmaster) nor anything else it says unprivileged
	// tells. Only its timeline's history file settles it (pgHistoryFork).
	return true, proven, beyond, nil
}

// pgHistoryFileQuery reads the history file of a timeline: one line per
// ancestor, "parent-timeline<TAB>switch-point<TAB>reason". It needs a
// superuser or EXECUTE on pg_read_file granted (pg_read_server_files alone
// is not enough):
// refused, the answer stays what pgJudgeLife said.
const pgHistoryFileQuery = "SELECT pg_catalog.pg_read_file('pg_wal/' || $1 || '.history')"

// pgHistoryFork reads where the history of timeline tli (a server promoted
// since the transaction asked: restarted as a standby after a crash and
// promoted, as Patroni does, or a standby that restarted after its
// promotion, or one several timelines on) left the transaction's timeline.
// At or past the end of the record with the id (past): that history holds
// our timeline's WAL up to L, and if the record ending at L is ours
// (pgRecordAt: a crash may have lost it and a later life of our timeline
// written over its place before the fork), every life of that history has
// replayed it, or a checkpoint past it, and has not handed the id out
// again, so "committed" is ours. Before it: our commit record is not in
// that history. This holds whatever happened to the
// server since the fork (crashes, restarts, further promotions: the file
// of the current timeline lists every ancestor), which start times and
// replay positions cannot tell apart. The WAL up to the switch point was
// flushed before the file was written. known is false when the file could
// not be read (no privilege), does not parse, or does not name our
// timeline among the ancestors (another lineage: only a split brain makes
// one); desc says what was found, for the event's reason.
//
// child is the timeline that forked from ours (tli itself when ours is its
// parent): the segment holding the switch point was copied into it.
func pgHistoryFork(ctx context.Context, dc driver.Conn, tli int64, m pgMark) (past, known bool, desc string, child int64) {
	vals, err := queryRow(ctx, dc, pgHistoryFileQuery, fmt.Sprintf("%08X", tli))
	if err != nil || len(vals) == 0 {
		return false, false, fmt.Sprintf("history file of timeline %d not read: %v", tli, err), 0
	}
	return historyFork(textOf(vals[0]), tli, m)
}

// historyFork reads the history file's text of timeline tli: where it
// left ours, and child, the timeline that forked from ours (the parent on
// the next line, or tli itself when ours is the last ancestor).
func historyFork(history string, tli int64, m pgMark) (past, known bool, desc string, child int64) {
	found := false
	for _, line := range strings.Split(history, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") {
			continue
		}
		parent, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		if found {
			return past, known, desc, parent
		}
		if parent != m.tli {
			continue
		}
		switchPoint, ok := parseLSN(f[1])
		if !ok {
			return false, false, "unreadable switch point " + f[1], tli
		}
		past, known, desc, found = m.lsn <= switchPoint, true, "left timeline "+f[0]+" at "+f[1], true
	}
	if found {
		return past, known, desc, tli
	}
	return false, false, fmt.Sprintf("timeline %d is not among its ancestors", m.tli), tli
}

// lsnString writes an LSN as PostgreSQL does.
func lsnString(n uint64) string {
	return strings.ToUpper(strconv.FormatUint(n>>32, 16) + "/" + strconv.FormatUint(n&0xffffffff, 16))
}

// lsnValue reads a WAL position as the driver gives it: pg_lsn's text (a
// string or bytes), or a number; 0 for NULL or what does not parse.
func lsnValue(v driver.Value) uint64 {
	switch x := v.(type) {
	case int64:
		return uint64(x)
	case uint64:
		return x
	}
	n, _ := parseLSN(v)
	return n
}

// parseLSN parses PostgreSQL's pg_lsn text, "16/B374D848".
func parseLSN(v driver.Value) (uint64, bool) {
	s := textOf(v)
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, false
	}
	h, err1 := strconv.ParseUint(hi, 16, 32)
	l, err2 := strconv.ParseUint(lo, 16, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return h<<32 | l, true
}

func parseHexInt(v driver.Value) (int64, bool) {
	n, err := strconv.ParseInt(textOf(v), 16, 64)
	return n, err == nil && n > 0
}

// pgWALSizesQuery and pgWALReadQuery read the WAL of the transaction's
// timeline just before the end of its record, on a promoted server
// (pgRecordAt).
const (
	pgWALSizesQuery = "SELECT bytes_per_wal_segment::bigint, wal_block_size::bigint FROM pg_catalog.pg_control_init()"
	pgWALReadQuery  = "SELECT pg_catalog.pg_read_binary_file('pg_wal/' || $1, $2::bigint, $3::bigint, true)"
)

// pgRecordAt reads, on a server whose history holds the transaction's
// timeline at or past L (a promoted server whose history leaves it there,
// or another life of that timeline whose recovery reached L), the WAL of
// that timeline just before L, and says whether the record ending there is
// the transaction's message. The switch point (or the replay position)
// alone does not prove it: the message is
// written without a flush (the COMMIT flushes it), so a crash of our
// server before any flush past it loses it, and the next life on the same
// timeline writes over its place before a promotion. Patroni does exactly
// that with a crashed primary: crash recovery in single-user mode ends
// before L, its shutdown writes a checkpoint (with the next id: ours, to
// be handed out again) and a WAL switch padding the segment with zeros,
// and the read-only start and the promotion then fork past L.
//
// walOurs: a sqlretry message whose payload is the transaction's id ends
// at L in one of the files that hold the segment (the timelines' in tlis,
// and .partial). walOther: in each of them either no sqlretry message
// ends at L, or one of another transaction (another id, or none) does:
// the WAL there is another life's, and our record, and our commit record
// after it, are not in this history. walUnknown: the role may read the
// WAL, but it cannot tell: the segment is gone (a checkpoint since
// removed or recycled it), or the bytes that end at L hold "sqlretry"
// but no record of ours could be parsed there. walUnread: the WAL may not
// be read (no privilege: 42501), or the sizes are not PostgreSQL's. Any
// other failure is returned (the resolution asks again). A record that
// begins in one segment and ends in the next (L within the first bytes
// of its segment) is read from both. What it cannot tell: a later life
// that took writes unseen (the two lives above) and whose own message
// with our id, handed out again, ends exactly at L, or bytes forged
// into another record's payload to look like it.
type walAnswer int8

const (
	walUnread walAnswer = iota
	walUnknown
	walOurs
	walOther
)

func pgRecordAt(ctx context.Context, dc driver.Conn, tlis []int64, m pgMark, xid int64) (walAnswer, string, error) {
	vals, err := queryRow(ctx, dc, pgWALSizesQuery)
	if err != nil || len(vals) < 2 {
		if err != nil && ErrorCode(err) != "42501" {
			return walUnread, "", err
		}
		return walUnread, fmt.Sprintf("WAL sizes not read: %v", err), nil
	}
	segSize, blk := uint64(asInt64(vals[0])), uint64(asInt64(vals[1]))
	if !walSizesPostgres(segSize, blk) || m.lsn == 0 {
		return walUnread, fmt.Sprintf("WAL sizes unusable (segment %d, block %d)", segSize, blk), nil
	}
	segno := (m.lsn - 1) / segSize
	end := (m.lsn-1)%segSize + 1 // L's offset in its segment
	from := uint64(0)
	if end > pgWALWindow {
		from = end - pgWALWindow
	}
	perID := 0x100000000 / segSize
	// read reads bytes [from, to) of segment segno from each file of the
	// timelines that holds them whole.
	read := func(segno, from, to uint64) (raws [][]byte, names []string, err error) {
		for _, tli := range tlis {
			for _, suffix := range []string{"", ".partial"} {
				name := fmt.Sprintf("%08X%08X%08X", tli, segno/perID, segno%perID) + suffix
				vals, err := queryRow(ctx, dc, pgWALReadQuery, name, int64(from), int64(to-from))
				if err != nil {
					return nil, []string{name}, err
				}
				if len(vals) == 0 {
					continue
				}
				if raw, ok := vals[0].([]byte); ok && uint64(len(raw)) == to-from {
					raws, names = append(raws, raw), append(names, name)
				}
				// else missing (NULL) or short
			}
		}
		return raws, names, nil
	}
	raws, names, err := read(segno, from, end)
	if err != nil {
		if ErrorCode(err) != "42501" {
			return walUnread, "", err
		}
		return walUnread, fmt.Sprintf("WAL segment %s not read: %v", names[0], err), nil
	}
	if len(raws) == 0 {
		return walUnknown, "no WAL segment of the timeline holding the record", nil
	}
	var prev [][]byte
	if from == 0 && segno > 0 && segSize > pgWALWindow {
		// L within the window of its segment's start: the record may
		// begin in the previous segment (it continues on this one's first
		// page, after the long header). Those bytes may only make the
		// record ours, or tell what a record the segment's own bytes could
		// not place is: a file not written there whole would hide our
		// message's start.
		if p, _, err := read(segno-1, segSize-pgWALWindow, segSize); err == nil {
			for _, raw := range p {
				prev = append(prev, walUsable(raw, segSize-pgWALWindow, blk))
			}
		}
	}
	// Every file that holds the segment is read: our message in one of
	// them is ours; "other" only when each says so. A file can hold a
	// segment this server did not write whole: a standby that received
	// the start of the parent timeline's last segment and replayed the
	// rest from the child timeline's copy (restored from an archive)
	// keeps the parent's file, zeros or a recycled segment's old bytes
	// past what it received, and the child's copy holds the WAL.
	ans := walOther
	var desc string
	for i, raw := range raws {
		a, what := walRecordEndingAt(nil, raw, from, blk, xid)
		for _, p := range prev {
			if a == walOurs || a == walOther {
				break
			}
			if pa, pwhat := walRecordEndingAt(p, raw, from, blk, xid); pa == walOurs || pa == walOther {
				a, what = pa, pwhat
			}
		}
		if a == walOurs {
			return walOurs, "WAL segment " + names[i] + ": " + what, nil
		}
		if desc != "" {
			desc += "; "
		}
		desc += "WAL segment " + names[i] + ": " + what
		if a != walOther {
			ans = walUnknown
		}
	}
	return ans, desc, nil
}

// walSizesPostgres says whether the sizes are PostgreSQL's own: a segment of a
// power of two from 1 MiB to 1 GiB, a block of a power of two from 1 KiB
// to 64 KiB. Other answers (an engine or a proxy that speaks PostgreSQL's
// protocol) are not read: the arithmetic below assumes them.
func walSizesPostgres(segSize, blk uint64) bool {
	pow2 := func(n uint64) bool { return n&(n-1) == 0 }
	return pow2(segSize) && segSize >= 1<<20 && segSize <= 1<<30 &&
		pow2(blk) && blk >= 1<<10 && blk <= 1<<16
}

// pgWALWindow is how many bytes before L pgRecordAt reads: the record
// (64 bytes) and the page headers that may lie within it.
const pgWALWindow = 512

// walRecordEndingAt looks at the bytes raw, read from offset from of a
// WAL segment up to L: it drops the page headers (long on a segment's first
// page, short on the others) and looks for a sqlretry message ending at L
// (its record's end within the alignment padding before L): a logical
// decoding message record (main data only) whose prefix is "sqlretry" and
// whose payload is the transaction's id in decimal is ours (the record's
// own id would be a subtransaction's inside a savepoint); one with another
// payload (another transaction's, a probe's, an older release's empty
// one) is another's. prev is the record bytes (page headers dropped) of
// the end of the previous segment when raw starts at its segment's start,
// or nil: a record may begin in one segment and end in the next.
func walRecordEndingAt(prev, raw []byte, from, blk uint64, xid int64) (walAnswer, string) {
	usable := walUsable(raw, from, blk)
	if from == 0 && len(prev) > 0 {
		usable = append(append([]byte(nil), prev...), usable...)
	}
	const prefix = "sqlretry\x00"
	want := strconv.FormatInt(xid, 10)
	n := len(usable)
	if n < len(prefix)+8 {
		return walUnknown, "too close to the segment's start"
	}
	// The data's end lies within the 8 bytes of padding before L, after a
	// payload of at most 20 digits.
	if !strings.Contains(string(usable[max(0, n-8-len(prefix)-20):]), prefix) {
		return walOther, "no sqlretry message ends at the record's end: the WAL there is another life's"
	}
	for start := n - 8; start >= 0; start -= 8 {
		h := usable[start:]
		if len(h) < 24 || h[17] != pgRmLogicalMsg {
			continue
		}
		for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
			payload, ok := walLogicalMessage(usable[start:], n-start, order)
			if !ok {
				continue
			}
			if payload == want {
				return walOurs, "the record is the transaction's message"
			}
			return walOther, fmt.Sprintf("the sqlretry message that ends there is another transaction's (payload %q): the WAL there is another life's", payload)
		}
	}
	return walUnknown, "a sqlretry message ends there, its record not found"
}

// walLogicalMessage parses rec (from a record's start, room bytes to L) as
// a logical decoding message with prefix "sqlretry" whose record ends
// within the alignment padding before L, and returns its payload.
func walLogicalMessage(rec []byte, room int, order binary.ByteOrder) (payload string, ok bool) {
	tot := int(order.Uint32(rec))
	if tot < 24+2+24+9 || tot > room || room-tot >= 8 {
		return "", false
	}
	for _, b := range rec[tot:room] { // the padding
		if b != 0 {
			return "", false
		}
	}
	data := rec[24:tot]
	// Before the main data: a replication origin (XLR_BLOCK_ID_ORIGIN, 2
	// bytes) and, under wal_level=logical for a subtransaction's first
	// record, its top-level id (XLR_BLOCK_ID_TOPLEVEL_XID, 4 bytes); a
	// logical message has no block references.
	if len(data) > 3 && data[0] == 253 {
		data = data[3:]
	}
	if len(data) > 5 && data[0] == 252 {
		data = data[5:]
	}
	var body []byte
	switch data[0] {
	case 255: // XLR_BLOCK_ID_DATA_SHORT
		body = data[2:]
		if int(data[1]) != len(body) {
			return "", false
		}
	case 254: // XLR_BLOCK_ID_DATA_LONG
		if len(data) < 5 {
			return "", false
		}
		body = data[5:]
		if int(order.Uint32(data[1:])) != len(body) {
			return "", false
		}
	default:
		return "", false
	}
	// xl_logical_message: dbId, transactional, padding, prefix_size,
	// message_size; then the prefix with its NUL and the message.
	if len(body) < 24+9 || order.Uint64(body[8:]) != 9 || string(body[24:33]) != "sqlretry\x00" ||
		order.Uint64(body[16:]) != uint64(len(body)-33) {
		return "", false
	}
	return string(body[33:]), true
}

// walUsable drops the page headers from raw, read from offset from of a
// WAL segment: the long header on the segment's first page, the short one
// on the others.
func walUsable(raw []byte, from, blk uint64) []byte {
	var usable []byte
	for i := 0; i < len(raw); {
		pos := from + uint64(i)
		hdr := uint64(24)
		if pos < blk {
			hdr = 40
		}
		if in := pos % blk; in < hdr {
			i += int(hdr - in)
			continue
		}
		usable = append(usable, raw[i])
		i++
	}
	return usable
}

// pgRmLogicalMsg is RM_LOGICALMSG_ID, the resource manager of logical
// decoding messages (PostgreSQL 9.6 on).
const pgRmLogicalMsg = 21
