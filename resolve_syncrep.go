package sqlretry

import (
	"context"
	"crypto/rand"
	"database/sql/driver"
	"errors"
	"io"
	"strings"
	"time"
)

// Lost COMMITs under synchronous replication (PostgreSQL).
//
// A backend committing with synchronous_commit on, remote_write or
// remote_apply and a non-empty synchronous_standby_names writes and flushes
// its commit record, marks the transaction committed (txid_status says
// "committed" from here on), and then waits for the synchronous standbys
// (wait_event SyncRep) while still holding its transaction id, so that no
// other session sees the commit. Whatever ends that wait early
// (pg_terminate_backend, pg_cancel_backend, and pgx itself, which sends a
// cancel request when a connection breaks) publishes a commit that no
// standby may have: a failover then loses it. So after a lost COMMIT
// sqlretry:
//   - does not end a backend that waits in SyncRep, nor one seen to have
//     begun to commit (only one idle in its transaction, which has not
//     read the COMMIT): see pgTerminateQuery;
//   - counts "committed" only once the old backend has let go of the id,
//     and, under synchronous replication, once enough synchronous standbys
//     report a position at or past the primary's flush position read after
//     that (the commit record was flushed before the transaction was marked
//     committed, so that position covers it);
//   - otherwise waits within the caller's deadline and then answers
//     ErrAmbiguousCommit.
// The side connection cannot see the old session's own synchronous_commit:
// it reads its own, which has the same role and database defaults. None of
// this costs the happy path anything: it is all asked after a lost COMMIT.

// pgStatusQuery asks the id's status and what the old backend is doing, in
// one round trip. The LEFT JOIN keeps one row when the backend is gone.
const pgStatusQuery = `SELECT txid_status($1), a.pid IS NOT NULL, a.state,
	current_setting('synchronous_standby_names'), current_setting('synchronous_commit')
	FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_stat_activity AS a
	ON a.pid = $2 AND a.backend_xid = ($1::bigint % 4294967296)::text::xid`

// pgTerminateQuery ends the old backend ($1) if it still holds the id ($2)
// and has been idle in its transaction for pgIdleGrace: read again as it
// is ended. A backend seen to have begun its COMMIT is not ended, with or
// without synchronous replication: its COMMIT may already have done
// something outside this server that ending it would not undo (postgres_fdw
// sends the remote COMMIT before the local commit record, a deferred
// trigger may call dblink), so that the local abort and the replay would
// do it twice; it ends by itself, and the caller's deadline bounds the
// wait (ErrAmbiguousCommit). A backend idle in its transaction for less
// than pgIdleGrace may not have read the COMMIT waiting in its socket yet:
// ending it then would abort a commit that was about to happen (and replay
// it); it is ended at a later attempt if it stays idle, as behind a silent
// network. What this cannot close: the state is read and the signal sent
// in two steps, and a backend shows "idle in transaction" until it starts
// running the message it read; a COMMIT that reaches the server more than
// pgIdleGrace after it was sent (TCP retransmissions, a starved backend)
// can begin in that gap. With track_activities off the state reads
// "disabled" and no backend is ended: a COMMIT lost behind a silent
// network is then ErrAmbiguousCommit at the caller's deadline.
const pgTerminateQuery = `SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
	WHERE pid = $1 AND backend_xid = ($2::bigint % 4294967296)::text::xid
	AND state = 'idle in transaction' AND state_change < clock_timestamp() - interval '` + pgIdleGrace + `'`

// pgIdleGrace: see pgTerminateQuery.
const pgIdleGrace = "200 milliseconds"

// pgStatus is one answer of pgStatusQuery.
type pgStatus struct {
	status  string // txid_status
	holding bool   // the old backend still holds the id
	state   string
	names   string // synchronous_standby_names
	commit  string // synchronous_commit of the side connection
}

// pgAskStatus asks pgStatusQuery; an engine that speaks PostgreSQL's
// protocol but lacks a column or setting it reads (undefined column,
// function or table) is asked txid_status alone, as before: it has no
// synchronous standbys sqlretry could see.
func pgAskStatus(ctx context.Context, dc driver.Conn, xid, pid int64) (pgStatus, error) {
	vals, err := queryRow(ctx, dc, pgStatusQuery, xid, pid)
	var pg interface{ SQLState() string }
	if err != nil && errors.As(err, &pg) {
		switch pg.SQLState() {
		case "42703", "42883", "42P01", "42704": // undefined column, function, table, object (a setting)
			vals, err = queryRow(ctx, dc, "SELECT txid_status($1)", xid)
		}
	}
	if err != nil {
		return pgStatus{}, err
	}
	return pgStatusOf(vals), nil
}

func pgStatusOf(vals []driver.Value) pgStatus {
	str := func(i int) string {
		if i >= len(vals) {
			return ""
		}
		switch v := vals[i].(type) {
		case string:
			return v
		case []byte:
			return string(v)
		}
		return ""
	}
	st := pgStatus{status: str(0), state: str(2), names: str(3), commit: str(4)}
	if len(vals) > 1 {
		st.holding, _ = vals[1].(bool)
	}
	return st
}

// syncRequired says whether a commit counts only once synchronous standbys
// have it.
func (st pgStatus) syncRequired() bool {
	if strings.TrimSpace(st.names) == "" {
		return false
	}
	switch st.commit {
	case "local", "off":
		return false
	}
	return true
}

// mayEnd says whether the old backend, still holding the id, may be
// ended: only while idle in its transaction, before its COMMIT began
// (pgTerminateQuery).
func (st pgStatus) mayEnd() bool {
	return st.holding && st.state == "idle in transaction"
}

// pgProbeQuery is a transaction that writes WAL without touching a table
// (any role may run it): a transactional logical decoding message, which
// logical decoding consumers see with the prefix "sqlretry". A transaction
// that only takes an id (txid_current()) writes no WAL before its commit
// record and does not wait for the standbys.
const pgProbeQuery = "SELECT pg_logical_emit_message(true, 'sqlretry', 'commit resolution probe')::text"

// pgReplicaWait bounds one pgReplicated call: under a steady write load the
// standbys trail the primary's current position, so the position is read
// once and waited for, rather than read again at every attempt.
const pgReplicaWait = time.Second

// pgReplicated says whether enough synchronous standbys have the primary's
// WAL up to its flush position now, waiting up to pgReplicaWait within ctx.
// A role that cannot read the standbys' positions (they need superuser or
// pg_read_all_stats) commits a transaction of its own instead
// (pgProbeQuery, in autocommit): its commit record lies past the lost
// COMMIT's, and its COMMIT returns once the synchronous standbys have it
// (or when the side connection's context ends: no answer then). Only a
// cancel of that very wait by someone else would make it return early,
// with a WARNING the driver does not report; a client whose COMMIT was not
// cut would then have been told "committed" as well.
func pgReplicated(ctx context.Context, dc driver.Conn, st pgStatus) (bool, error) {
	need := syncStandbysNeeded(st.names)
	col := "flush_lsn"
	switch st.commit {
	case "remote_write":
		col = "write_lsn"
	case "remote_apply":
		col = "replay_lsn"
	}
	vals, err := queryRow(ctx, dc, "SELECT pg_current_wal_flush_lsn()::text, pg_has_role('pg_read_all_stats', 'USAGE')")
	if err != nil {
		return false, err
	}
	lsn, _ := vals[0].(string)
	if b, ok := vals[0].([]byte); ok {
		lsn = string(b)
	}
	if see, _ := vals[1].(bool); !see {
		if _, err := queryRow(ctx, dc, pgProbeQuery); err != nil {
			return false, err
		}
		return true, nil
	}
	q := "SELECT count(*) FROM pg_catalog.pg_stat_replication WHERE sync_state IN ('sync', 'quorum') AND " + col + " >= $1::text::pg_lsn"
	deadline := time.Now().Add(pgReplicaWait)
	pause := 5 * time.Millisecond
	for {
		vals, err := queryRow(ctx, dc, q, lsn)
		if err != nil {
			return false, err
		}
		if asInt64(vals[0]) >= int64(need) {
			return true, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		t := time.NewTimer(min(pause, left))
		select {
		case <-ctx.Done():
			t.Stop()
			return false, nil
		case <-t.C:
		}
		pause = min(2*pause, 100*time.Millisecond)
	}
}

// syncStandbysNeeded is how many synchronous standbys must have a commit
// under synchronous_standby_names s: "FIRST n (...)", "ANY n (...)",
// "n (...)", or a plain list (one).
func syncStandbysNeeded(s string) int {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0
	}
	for _, kw := range []string{"first", "any"} {
		if len(s) > len(kw) && strings.EqualFold(s[:len(kw)], kw) && (s[len(kw)] == ' ' || s[len(kw)] == '\t' || s[len(kw)] == '\n') {
			s = strings.TrimLeft(s[len(kw):], " \t\n")
			break
		}
	}
	n, i := 0, 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' && n < 1000 {
		n = n*10 + int(s[i]-'0')
		i++
	}
	if i > 0 && strings.HasPrefix(strings.TrimLeft(s[i:], " \t\n"), "(") && n > 0 {
		return n
	}
	return 1
}

// Lost COMMITs under semi-synchronous replication (MariaDB, MySQL).
//
// With rpl_semi_sync_master_enabled (MySQL: rpl_semi_sync_source_enabled) a
// COMMIT waits for a replica's ACK (process list State "Waiting for
// semi-sync ACK from slave"). With the wait point AFTER_COMMIT (MariaDB's
// default) the commit is visible on the primary while it waits; with
// AFTER_SYNC it becomes visible when the wait ends, by the ACK or by a
// KILL. Either way a KILLed waiter leaves a commit on the primary that no
// replica may have, and the marker row is then there. So under semi-sync
// sqlretry KILLs the old session only while it is idle in its transaction
// (Command Sleep: the COMMIT never arrived), and counts a marker it finds
// only once a replica has acknowledged a later commit: it commits a probe
// row of its own on the side connection, which waits for the ACK of a
// binlog position past the lost COMMIT's, and then checks that semi-sync is
// still on (a wait that timed out turns it off). The marker row itself is
// never deleted before the answer is "committed": a lookup that found it
// gone would say "not committed" and replay a transaction that is there.

// mysqlSemiSync says whether the primary waits for replicas' ACKs.
func mysqlSemiSync(ctx context.Context, dc driver.Conn) (bool, error) {
	rows, err := queryRows(ctx, dc, "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('rpl_semi_sync_master_enabled', 'rpl_semi_sync_source_enabled')")
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		if len(r) > 1 && strings.EqualFold(textOf(r[1]), "ON") {
			return true, nil
		}
	}
	return false, nil
}

// mysqlMayKill says whether the old session may be KILLed without risking a
// commit published before a replica has it.
func mysqlMayKill(semiSync bool, command, state string) bool {
	if strings.Contains(strings.ToLower(state), "semi-sync") {
		return false
	}
	return !semiSync || command == "Sleep"
}

// mysqlReplicaHas commits a probe row in the marker table (autocommit): its
// COMMIT waits for a replica's ACK of a binlog position past every earlier
// commit's. It reports whether semi-sync was on before and is still on
// afterwards (a wait that timed out turns it off), and the probe's token for
// the caller to delete. While semi-sync is off (no replica acknowledges) it
// writes nothing.
func mysqlReplicaHas(ctx context.Context, dc driver.Conn, table string) (bool, []byte, error) {
	if on, err := mysqlSemiSyncOn(ctx, dc); !on || err != nil {
		return false, nil, err
	}
	probe := make([]byte, 16)
	_, _ = rand.Read(probe)
	if err := execConn(ctx, dc, "INSERT INTO "+table+" (token) VALUES (?)", probe); err != nil {
		return false, nil, err // a probe that did commit is left to the marker's clean-up
	}
	on, err := mysqlSemiSyncOn(ctx, dc)
	if !on && err == nil {
		// The probe's wait timed out and the primary went on without
		// replicas: no ACK to wait for when deleting it.
		_ = execConn(ctx, dc, "DELETE FROM "+table+" WHERE token = ?", probe)
	}
	return on, probe, err
}

// mysqlSemiSyncOn says whether the primary is waiting for ACKs now.
func mysqlSemiSyncOn(ctx context.Context, dc driver.Conn) (bool, error) {
	rows, err := queryRows(ctx, dc, "SHOW GLOBAL STATUS WHERE Variable_name IN ('Rpl_semi_sync_master_status', 'Rpl_semi_sync_source_status')")
	if err != nil {
		return false, err
	}
	for _, r := range rows {
		if len(r) > 1 && strings.EqualFold(textOf(r[1]), "ON") {
			return true, nil
		}
	}
	return false, nil
}

func textOf(v driver.Value) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	}
	return ""
}

// queryRows runs a query on a driver connection and returns all its rows.
func queryRows(ctx context.Context, dc driver.Conn, query string, args ...any) ([][]driver.Value, error) {
	var (
		rows driver.Rows
		err  error
	)
	if q, ok := dc.(driver.QueryerContext); ok {
		rows, err = q.QueryContext(ctx, query, namedArgs(args))
	}
	if rows == nil && (err == nil || err == driver.ErrSkip) {
		var s driver.Stmt
		if s, err = prepare(ctx, dc, query); err != nil {
			return nil, err
		}
		defer s.Close()
		sq, ok := s.(driver.StmtQueryContext)
		if !ok {
			return nil, errors.New("sqlretry: driver statement lacks QueryContext")
		}
		rows, err = sq.QueryContext(ctx, namedArgs(args))
	}
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var all [][]driver.Value
	for {
		vals := make([]driver.Value, len(rows.Columns()))
		if err := rows.Next(vals); err != nil {
			if err == io.EOF {
				return all, nil
			}
			return nil, err
		}
		// A driver's []byte may point into its read buffer, valid only
		// until the next Next (go-sql-driver/mysql's do).
		for i, v := range vals {
			if b, ok := v.([]byte); ok {
				vals[i] = append([]byte(nil), b...)
			}
		}
		all = append(all, vals)
	}
}
