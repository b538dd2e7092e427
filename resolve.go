package sqlretry

import (
	"context"
	"crypto/rand"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"time"
)

// How a lost COMMIT is resolved (shared/DESIGN.md):
//
// PostgreSQL: just before COMMIT a transaction that wrote asks for its
// transaction id and backend pid (one round trip; the pid is asked once per
// connection, with the server's start time). After a lost COMMIT sqlretry
// asks txid_status on a fresh connection. "in progress" is not an answer:
// after a network cut the old backend may still be committing, so sqlretry
// ends it (when the role may) and asks again until the answer is final or
// the caller's deadline comes. After a crash the server hands out again the
// ids whose WAL never reached the disk, so when it has restarted since,
// "committed" may be another transaction's and is no answer (ambiguous);
// anything else means ours never committed (a committed id is never reused).
//
// MySQL/MariaDB, with WithMySQLCommitMarker: the transaction inserts a row
// with a random token before COMMIT; after a lost COMMIT sqlretry waits for
// the old session to leave the process list (KILLing it where it may) and
// then looks the token up.

// prepareResolution runs inside the transaction, just before COMMIT.
func (t *tx) prepareResolution() error {
	c, r := t.c, t.c.r
	switch {
	case r.dialect == DialectPostgres && r.cfg.resolveCommits && !r.resolution.broken.Load():
		q, ask := "SELECT txid_current_if_assigned()", c.serverID == 0
		if ask {
			q = "SELECT txid_current_if_assigned(), pg_backend_pid(), " + pgStartTime
		}
		vals, err := queryRow(t.ctx, c.inner, q)
		if err != nil {
			if r.classify(err) == Permanent {
				// An engine without the function (CockroachDB): the failed
				// statement aborted this transaction, so replay it once and
				// stop asking.
				r.resolution.broken.Store(true)
			}
			return err
		}
		t.xid = asInt64(vals[0])
		if ask {
			c.serverID, c.serverStart = asInt64(vals[1]), asInt64(vals[2])
		}
	case r.dialect == DialectMySQL && r.cfg.mysqlMarker != "":
		if err := r.ensureMarkerTable(t.ctx); err != nil {
			return err
		}
		if c.serverID == 0 {
			vals, err := queryRow(t.ctx, c.inner, "SELECT CONNECTION_ID()")
			if err != nil {
				return err
			}
			c.serverID = asInt64(vals[0])
		}
		t.token = make([]byte, 16)
		_, _ = rand.Read(t.token)
		if err := execConn(t.ctx, c.inner, "INSERT INTO "+r.cfg.mysqlMarker+" (token) VALUES (?)", t.token); err != nil {
			return err
		}
	}
	return nil
}

// afterCommit deletes old marker rows now and then, on the connection that
// just committed (in autocommit).
func (t *tx) afterCommit() {
	r := t.c.r
	if t.token == nil || r.resolution.markerCount.Add(1)%256 != 0 {
		return
	}
	_ = execConn(context.Background(), t.c.inner, "DELETE FROM "+r.cfg.mysqlMarker+" WHERE created_at < NOW(6) - INTERVAL 1 HOUR")
}

const markerDDL = `CREATE TABLE IF NOT EXISTS %s (
	token BINARY(16) NOT NULL PRIMARY KEY,
	created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	KEY (created_at)
) ENGINE=InnoDB`

// ensureMarkerTable creates the marker table once, on a side connection:
// DDL inside the caller's transaction would commit it implicitly.
func (r *retrier) ensureMarkerTable(ctx context.Context) error {
	rs := r.resolution
	rs.markerMu.Lock()
	defer rs.markerMu.Unlock()
	if rs.markerReady {
		return nil
	}
	dc, err := r.inner.Connect(ctx)
	if err != nil {
		return err
	}
	defer dc.Close()
	if err := execConn(ctx, dc, fmt.Sprintf(markerDDL, r.cfg.mysqlMarker)); err != nil {
		return fmt.Errorf("sqlretry: creating the commit marker table: %w", err)
	}
	rs.markerReady = true
	return nil
}

// resolveCommit finds out whether the COMMIT of t took effect, within ctx.
func (r *retrier) resolveCommit(ctx context.Context, t *tx) CommitOutcome {
	var check func(ctx context.Context, dc driver.Conn) (CommitOutcome, error)
	switch {
	case r.dialect == DialectPostgres && t.xid != 0:
		check = func(ctx context.Context, dc driver.Conn) (CommitOutcome, error) {
			return pgCheckCommit(ctx, dc, t.xid, t.c.serverID, t.c.serverStart)
		}
	case r.dialect == DialectPostgres && r.cfg.resolveCommits && !r.resolution.broken.Load():
		// The id was asked and there was none: the transaction wrote nothing.
		return CommitNotCommitted
	case r.dialect == DialectMySQL && t.token != nil:
		check = func(ctx context.Context, dc driver.Conn) (CommitOutcome, error) {
			return mysqlCheckCommit(ctx, dc, r.cfg.mysqlMarker, t.token, t.c.serverID)
		}
	default:
		return CommitUnknown
	}
	// Bounded by the caller's deadline, else by the backoff's MaxElapsed.
	b := Backoff{Initial: 10 * time.Millisecond, Max: 500 * time.Millisecond, Multiplier: 2, Jitter: FullJitter,
		MaxAttempts: 1 << 30, MaxElapsed: r.cfg.backoff.MaxElapsed}
	p := newPacer(b, r.clock, r.rnd)
	var dc driver.Conn
	defer func() {
		if dc != nil {
			dc.Close()
		}
	}()
	outcome := CommitUnknown
	var lastErr error
	for attempt := 1; ; attempt++ {
		if dc == nil {
			// A side connection straight from the driver: the pool may be
			// full and the breaker open, and the question must be answered.
			if err := r.dials.acquire(ctx); err != nil {
				break
			}
			c, err := r.inner.Connect(ctx)
			r.dials.release()
			if err == nil {
				dc = c
			}
			lastErr = err
		}
		if dc != nil {
			o, err := check(ctx, dc)
			if err == nil && o != CommitUnknown {
				outcome = o
				break
			}
			if errors.Is(err, errUnresolvable) {
				lastErr = err
				break
			}
			if err != nil {
				lastErr = err
				dc.Close()
				dc = nil
			}
		}
		d, stop := p.next(ctx, attempt)
		if stop != "" || r.clock.Sleep(ctx, d) != nil {
			break
		}
	}
	if outcome != CommitUnknown {
		r.counters.commitsResolved.Add(1)
	}
	r.observe(ctx, Event{Kind: EventCommitResolved, Op: "commit", Attempt: 1, Class: ConnectionLost, Outcome: outcome, Err: lastErr})
	return outcome
}

// pgStartTime is the server's start time in microseconds: a restart since
// the transaction makes its id ambiguous.
const pgStartTime = "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint"

// errUnresolvable is a final "cannot know".
var errUnresolvable = errors.New("sqlretry: the server restarted since the COMMIT and has handed out its transaction id again")

// pgCheckCommit asks once. "in progress" means the old backend still holds
// the transaction: end it if it is still that backend and has not begun to
// commit under synchronous replication, and ask again later. "committed"
// counts only once the old backend has let go of the id and, under
// synchronous replication, the synchronous standbys have the commit
// (pgReplicated): until then the commit may be on the primary alone, and a
// failover would lose it. When the server restarted since (start differs),
// the id may have been handed out again: "committed" is then no answer,
// anything else is.
func pgCheckCommit(ctx context.Context, dc driver.Conn, xid, pid, start int64) (CommitOutcome, error) {
	restarted := false
	if start != 0 {
		vals, err := queryRow(ctx, dc, "SELECT "+pgStartTime)
		if err != nil {
			return CommitUnknown, err
		}
		restarted = asInt64(vals[0]) != start
	}
	st, err := pgAskStatus(ctx, dc, xid, pid)
	if err != nil {
		var pg interface{ SQLState() string }
		if restarted && errors.As(err, &pg) && pg.SQLState() == "22023" {
			return CommitNotCommitted, nil // "is in the future": the id was never logged
		}
		return CommitUnknown, err
	}
	switch {
	case st.status == "committed" && restarted:
		return CommitUnknown, errUnresolvable
	case st.status == "committed" && st.holding:
		// Committed locally, not yet visible: the old backend waits for a
		// synchronous standby (SyncRep) or is about to let go. Ending it
		// would publish a commit no standby may have; wait for it.
		return CommitUnknown, nil
	case st.status == "committed" && st.syncRequired():
		if ok, err := pgReplicated(ctx, dc, st); !ok || err != nil {
			return CommitUnknown, err
		}
		return CommitCommitted, nil
	case st.status == "committed":
		return CommitCommitted, nil
	case st.status == "aborted", st.status == "in progress" && restarted: // the old backend died with the server
		return CommitNotCommitted, nil
	case st.status == "in progress":
		if st.holding && st.mayEnd() {
			// backend_xid guards against a reused pid; the wait_event and
			// state are read again at the moment it is ended.
			_, _ = queryRow(ctx, dc, pgTerminateQuery, pid, xid, !st.syncRequired())
		}
		return CommitUnknown, nil
	}
	// NULL: too old to know (wraparound); cannot happen within a deadline.
	return CommitUnknown, errors.New("sqlretry: txid_status has no answer")
}

// mysqlCheckCommit asks once. While the old session is in the process list
// it may still commit: KILL it and ask again later, unless semi-synchronous
// replication is on and the session has begun to commit (it may be waiting
// for a replica's ACK, and a KILL would publish a commit no replica has).
// Once it is gone, the marker says whether it committed; under semi-sync
// that counts only once a replica has it (mysqlReplicaHas).
func mysqlCheckCommit(ctx context.Context, dc driver.Conn, table string, token []byte, connID int64) (CommitOutcome, error) {
	// Not MAX(COMMAND): MariaDB 10.11 answers it with a mangled string.
	session, err := queryRows(ctx, dc, "SELECT COMMAND, STATE FROM information_schema.PROCESSLIST WHERE ID = ?", connID)
	if err != nil {
		return CommitUnknown, err
	}
	if len(session) > 0 {
		semi, err := mysqlSemiSync(ctx, dc)
		if err != nil {
			return CommitUnknown, err
		}
		if mysqlMayKill(semi, textOf(session[0][0]), textOf(session[0][1])) {
			_ = execConn(ctx, dc, fmt.Sprintf("KILL %d", connID))
		}
		return CommitUnknown, nil
	}
	vals, err := queryRow(ctx, dc, "SELECT COUNT(*) FROM "+table+" WHERE token = ?", token)
	if err != nil {
		return CommitUnknown, err
	}
	if asInt64(vals[0]) == 0 {
		return CommitNotCommitted, nil
	}
	semi, err := mysqlSemiSync(ctx, dc)
	if err != nil {
		return CommitUnknown, err
	}
	var probe []byte
	if semi {
		var ok bool
		if ok, probe, err = mysqlReplicaHas(ctx, dc, table); !ok || err != nil {
			return CommitUnknown, err
		}
	}
	if probe != nil {
		_ = execConn(ctx, dc, "DELETE FROM "+table+" WHERE token IN (?, ?)", token, probe)
	} else {
		_ = execConn(ctx, dc, "DELETE FROM "+table+" WHERE token = ?", token)
	}
	return CommitCommitted, nil
}

func namedArgs(args []any) []driver.NamedValue {
	nv := make([]driver.NamedValue, len(args))
	for i, a := range args {
		nv[i] = driver.NamedValue{Ordinal: i + 1, Value: a}
	}
	return nv
}

// queryRow runs a one-row query on a driver connection.
func queryRow(ctx context.Context, dc driver.Conn, query string, args ...any) ([]driver.Value, error) {
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
		if sq, ok := s.(driver.StmtQueryContext); ok {
			rows, err = sq.QueryContext(ctx, namedArgs(args))
		} else {
			return nil, errors.New("sqlretry: driver statement lacks QueryContext")
		}
	}
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	vals := make([]driver.Value, len(rows.Columns()))
	if err := rows.Next(vals); err != nil {
		if err == io.EOF {
			return nil, errors.New("sqlretry: no row")
		}
		return nil, err
	}
	return vals, nil
}

func execConn(ctx context.Context, dc driver.Conn, query string, args ...any) error {
	if e, ok := dc.(driver.ExecerContext); ok {
		_, err := e.ExecContext(ctx, query, namedArgs(args))
		if err != driver.ErrSkip {
			return err
		}
	}
	s, err := prepare(ctx, dc, query)
	if err != nil {
		return err
	}
	defer s.Close()
	if se, ok := s.(driver.StmtExecContext); ok {
		_, err = se.ExecContext(ctx, namedArgs(args))
		return err
	}
	return errors.New("sqlretry: driver statement lacks ExecContext")
}

// prepare prepares within ctx: go-sql-driver/mysql answers ErrSkip to any
// statement with arguments, and its Prepare without a context blocks on a
// silent network past the caller's deadline.
func prepare(ctx context.Context, dc driver.Conn, query string) (driver.Stmt, error) {
	if pc, ok := dc.(driver.ConnPrepareContext); ok {
		return pc.PrepareContext(ctx, query)
	}
	s, err := dc.Prepare(query)
	if err == nil && ctx.Err() != nil {
		s.Close()
		return nil, ctx.Err()
	}
	return s, err
}

func asInt64(v driver.Value) int64 {
	switch x := v.(type) {
	case int64:
		return x
	case uint64:
		return int64(x)
	case []byte:
		var n int64
		for _, b := range x {
			if b < '0' || b > '9' {
				return 0
			}
			n = n*10 + int64(b-'0')
		}
		return n
	case string:
		return asInt64([]byte(x))
	}
	return 0
}
