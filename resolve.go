package sqlretry

import (
	"context"
	"crypto/rand"
	"database/sql/driver"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"
)

// How a lost COMMIT is resolved (shared/DESIGN.md):
//
// PostgreSQL: just before COMMIT a transaction that did not provably only
// read asks for its transaction id, assigning one if it has none (NOTIFY
// and writes through postgres_fdw take no local id), and its backend pid
// (one round trip; the pid is asked with the server's start time, once per
// connection before PostgreSQL 10, with every transaction from 10 on:
// resolve_failover.go). A transaction that provably only read is replayed after a
// lost COMMIT without asking; so is one on a server in recovery, which can
// commit nothing. After a lost COMMIT sqlretry
// asks txid_status on a fresh connection. "in progress" is not an answer:
// after a network cut the old backend may not have read the COMMIT or may
// still be committing, so sqlretry ends it (when the role may) if it is
// still idle in its transaction, waits for it if it has begun to commit,
// and asks again until the answer is final or the caller's deadline
// comes. After a crash the server hands out again the ids whose WAL never
// reached the disk, so when it has restarted since,
// "committed" may be another transaction's and is no answer (ambiguous)
// unless the transaction proved where its id is in the WAL
// (resolve_failover.go, PostgreSQL ≥ 10); anything else means ours never
// committed (a committed id is never reused).
//
// MySQL/MariaDB, unless WithMySQLCommitMarker("") turns it off: the
// transaction inserts a row with a random token into the marker table as
// it commits (on MariaDB in the COMMIT's own statement, commitWithMarker;
// on MySQL just before it); the table's name is fixed (qualified with the
// DSN's database) and the table created at first use. After a lost COMMIT
// sqlretry waits for the old session to leave the process list (KILLing it
// where it may) and then looks the token up. READ ONLY transactions write
// no marker: MySQL refuses table writes in them. The default marker turns
// itself off when the user may not create or use it (markerTurnOff).
//
// Nothing that fails in this machinery is a reason to replay the caller's
// transaction: see resolutionFailed and configError.

// pgAskXID takes the transaction's id, assigning one if it has none yet:
// a transaction whose only writes went through postgres_fdw, or that only
// ran NOTIFY, has no local id, yet its COMMIT decides whether they happen
// (issue 15), so "no id" proves nothing. A server in recovery assigns no ids
// and commits nothing (no writes, no NOTIFY): NULL there. The functions are
// qualified: the closure may have set a search_path that puts others first.
// txid_current_if_assigned is asked first (COALESCE evaluates no more than
// it needs) because engines that lack it (CockroachDB) lack txid_status
// too, and its absence (42883) turns the resolution off at once.
const pgAskXID = "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL " +
	"ELSE COALESCE(pg_catalog.txid_current_if_assigned(), pg_catalog.txid_current()) END"

// pgAskXIDAndServer also asks (once per connection before the version is
// known or below PostgreSQL 10) for the backend pid,
// the server's start time and its version (which picks the question with
// the proof of resolve_failover.go from then on).
// With it, where the last recovery ended (conn.serverReplay); without it
// (pgAskXIDAndServerBare) where the role may not ask that or the server
// lacks the function (pgReplayRefused).
const (
	pgAskXIDAndServer     = pgAskXIDAndServerBare + ", " + pgReplayCol
	pgAskXIDAndServerBare = pgAskXID + pgServerInfo
)

// prepareResolution runs inside the transaction, just before COMMIT. Its
// errors never replay the transaction for their own sake (issue 15): a
// lost connection keeps its class (the server rolls back), anything else
// is permanent, reported at once.
func (t *tx) prepareResolution() error {
	c, r := t.c, t.c.r
	switch {
	case r.dialect == DialectPostgres && r.cfg.resolveCommits && !r.resolution.broken.Load():
		q, ask, proof := r.pgAskQuery(c)
		vals, err := queryRow(t.ctx, c.inner, q)
		if err != nil {
			return t.questionFailed(q, err, proof)
		}
		t.pgTakeAnswer(vals, ask, proof)
	case r.dialect == DialectMySQL && r.cfg.mysqlMarker != "" && !r.resolution.markerOff.Load():
		return t.prepareMarker()
	}
	return nil
}

// prepareMarker readies the MySQL/MariaDB commit marker of a transaction
// that wrote, just before COMMIT. On MariaDB the marker's INSERT goes with
// the COMMIT (commitWithMarker); elsewhere it runs now, one round trip.
func (t *tx) prepareMarker() error {
	c, r := t.c, t.c.r
	if t.readOnly {
		// MySQL refuses table writes in a READ ONLY transaction, and what
		// it allows (temporary tables, variables) dies with the session.
		t.nothingDurable = true
		return nil
	}
	if c.noMarker {
		return nil // a role of its own may not write it (markerRefused)
	}
	if t.lockedTables {
		// The closure ran LOCK TABLES (which also committed what came
		// before it): the marker's INSERT would fail with 1100 (not
		// locked) where the plain driver commits (attack9). No marker:
		// a lost COMMIT is ambiguous. Asked before the table is checked:
		// the check's side connection writes a sentinel, which a global
		// read lock of this very session (FLUSH TABLES WITH READ LOCK)
		// blocked until the caller's deadline (attack16).
		return nil
	}
	marker, sentinel, err := r.markerTable(t.ctx)
	if err != nil {
		return err
	}
	if marker == "" {
		return nil // no marker table just now: a lost COMMIT will be ambiguous
	}
	if c.serverID == 0 {
		id, srv, err := r.mysqlAskSession(t.ctx, c.inner)
		switch {
		case err == nil:
		case errors.Is(err, errNoRow) || r.ownStatementRefused(err) || errors.As(err, new(*strconv.NumError)):
			// The session's own settings refused sqlretry's question
			// where the plain COMMIT would pass: sql_select_limit = 0
			// (attack9), max_statement_time, max_join_size,
			// max_session_mem_used (attack14) on a server without SET
			// STATEMENT, an answer in a character_set_results the
			// driver cannot read as a number (attack15). No marker for
			// this transaction rather than a failed COMMIT; the next
			// one asks again.
			return nil
		default:
			return r.resolutionFailed(t.ctx, "asking for the connection id and which server the session runs on", err)
		}
		c.serverID, c.mysqlServer = id, srv
	}
	t.token, t.marker, t.sentinel = markerToken(time.Now()), marker, sentinel
	if c.mysqlServer.block && !r.resolution.markerNoBlock.Load() {
		t.markerWithCommit = true
		return nil
	}
	return t.insertMarker()
}

// mysqlOwnPrefix runs one of sqlretry's own statements on MariaDB (SET
// STATEMENT, 10.1.2 and later) free of the limits the closure, the DSN or
// the role may have put on the session, which the plain COMMIT is not
// subject to: a max_statement_time stopped the marker's block after its
// COMMIT had taken effect (a committed transaction reported as failed),
// and sql_select_limit, max_join_size with sql_big_selects = 0 and
// max_session_mem_used made the question fail (attack14), and a
// character_set_results of utf16 made its answer unreadable (attack15).
// A server that refuses it (MySQL, an older MariaDB: mysqlPrefixRefused)
// gets the statements without it from then on.
const mysqlOwnPrefix = "SET STATEMENT max_statement_time=0, sql_select_limit=18446744073709551615, " +
	"max_join_size=18446744073709551615, sql_big_selects=1, max_session_mem_used=9223372036854775807, " +
	"character_set_results=binary FOR "

// own gives q the prefix while the db's server takes it.
func (r *retrier) own(q string) string {
	if r.resolution.noOwnPrefix.Load() {
		return q
	}
	return mysqlOwnPrefix + q
}

// mysqlPrefixRefused says whether the server refused the prefix itself
// (no SET STATEMENT: a syntax error; a variable it does not know). A
// refused statement did not run.
func mysqlPrefixRefused(err error) bool {
	switch mysqlNumber(err) {
	case 1064, 1193, 1149:
		return true
	}
	return false
}

// ownStatementRefused says whether one of sqlretry's own reads before
// COMMIT failed for a limit of the session's (one the prefix could not
// lift): interrupted by max_statement_time (1969), MySQL's
// max_execution_time (3024) or another session's KILL QUERY (1317),
// refused by max_join_size (1104) or for memory (1290 with
// max_session_mem_used, 1041). The statement was rolled back alone; the
// transaction is open and unharmed.
func (r *retrier) ownStatementRefused(err error) bool {
	if !serverAnswered(err) {
		return false
	}
	switch mysqlNumber(err) {
	case 1969, 3024, 1317, 1104, 1290, 1041:
		return true
	}
	return false
}

// mysqlAskSession asks, once per connection, for the session's id and the
// server it runs on. The id is the process list's, found by a random text
// in the question itself: CONNECTION_ID() answers pseudo_thread_id, which
// a session may set (mysqlbinlog's output does), and a closure that set it
// to another live session's id had the resolution of a lost COMMIT KILL
// that other client's session (attack14).
func (r *retrier) mysqlAskSession(ctx context.Context, dc driver.Conn) (int64, mysqlServer, error) {
	var tag [8]byte
	_, _ = rand.Read(tag[:])
	self := "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%sqlretry-self-" + hex.EncodeToString(tag[:]) + "%'"
	for {
		rows, err := queryRows(ctx, dc, r.own(self))
		if err != nil && mysqlPrefixRefused(err) && !r.resolution.noOwnPrefix.Load() {
			r.resolution.noOwnPrefix.Store(true)
			continue
		}
		if err != nil {
			return 0, mysqlServer{}, err
		}
		if len(rows) != 1 || len(rows[0]) == 0 {
			return 0, mysqlServer{}, errNoRow // sql_select_limit = 0 without the prefix; no unique answer
		}
		srv, err := mysqlAskServer(ctx, dc, r.own(mysqlServerQuery))
		if err != nil {
			return 0, mysqlServer{}, err
		}
		return asInt64(rows[0][0]), srv, nil
	}
}

// markerInsert writes the token as a literal: with an argument
// go-sql-driver/mysql would prepare the statement, two round trips. Its
// time is SYSDATE(6), the server's clock: the column's default follows the
// session's timestamp, which a closure may set (mysqlbinlog's output,
// tests that pin "now"), and a row dated two hours back was deleted by the
// clean-up before a lost COMMIT's lookup, which then replayed a committed
// transaction (attack15).
func markerInsert(table string, token []byte) string {
	return "INSERT INTO " + table + " (token, created_at) VALUES (X'" + hex.EncodeToString(token) + "', SYSDATE(6))"
}

// markerShadowed handles a marker INSERT that failed as a table of
// another shape would (markerShapeNumber): the table the session sees is
// not the one the check found right (a TEMPORARY table of the session's
// under the marker's name, which hides the real one from that session
// also for a name qualified with its database, or the real one altered
// since the check). The failed INSERT left the transaction open and as it
// was; it commits without a marker (a lost COMMIT is then
// ErrAmbiguousCommit, never a replay), as the plain driver commits, and
// the next transaction checks the table again. (It failed the COMMIT as a
// configuration error: attack17. A temporary table of the same shape is
// not seen: see the README.)
func (t *tx) markerShadowed() {
	t.token = nil
	rs := t.c.r.resolution
	// At most once a second: a temporary table of one session's under
	// the marker's name would otherwise have every transaction of that
	// session check the table on a side connection (attack22).
	now := t.c.r.clock.Now().UnixNano()
	if last := rs.shapeForgotAt.Load(); now-last >= int64(time.Second) && rs.shapeForgotAt.CompareAndSwap(last, now) {
		rs.forgetMarker()
	}
}

// markerShapeNumber says whether a MySQL error number at the marker's
// INSERT is one a table of another shape gives: the check found the real
// table's shape right, so the session sees another (markerShadowed).
func markerShapeNumber(n uint16) bool {
	switch n {
	case 1054, 1048, 1364, 1366, 1406:
		return true
	}
	return false
}

// insertMarker runs the marker's INSERT on its own. A failure leaves the
// transaction without a marker (t.token nil).
func (t *tx) insertMarker() error {
	r := t.c.r
	err := execConn(t.ctx, t.c.inner, markerInsert(t.marker, t.token))
	if err == nil {
		return nil
	}
	t.token = nil
	switch n := mysqlNumber(err); {
	case markerShapeNumber(n):
		t.markerShadowed()
		return nil
	case n == 1792:
		// The session made the transaction read-only (SET SESSION
		// TRANSACTION READ ONLY): the failed INSERT left it open, and it
		// can commit nothing durable.
		t.nothingDurable = true
		return nil
	case n == 1146:
		// Not there on this server (markerMissing): the failed INSERT
		// left the transaction open; it commits without a marker.
		r.markerMissing(t.ctx, err)
		return nil
	case sessionLockRefused(n):
		// A table lock of the session's own that sqlretry did not read in
		// the text (escape): the failed INSERT left the transaction as
		// it was; it commits without a marker.
		return nil
	case isConfigNumber(n):
		// Dropped or revoked since. The failed INSERT left the transaction
		// open: the default marker turns itself off and it commits without.
		return r.markerRefused(t.ctx, t.c, t.marker, err)
	}
	return r.resolutionFailed(t.ctx, "writing the commit marker", err)
}

// markerRefused handles a marker table the user may no longer use: a
// named one is looked at again by the next transaction and this one fails
// with what to do; the default one is turned off (nil). Unless the
// refusal is this session's own: a privilege refused while the session
// runs under another role than a new session of the user gets (SET ROLE
// by the closure or an earlier statement on the connection; attack15: a
// closure switching to a read-only role turned the marker off for the
// whole db). The role is the session's: this connection writes no marker
// from now on (its lost COMMITs are ErrAmbiguousCommit), and the db keeps
// it.
func (r *retrier) markerRefused(ctx context.Context, c *conn, table string, err error) error {
	if r.sessionRoleRefused(ctx, c, err) {
		c.noMarker = true
		return nil
	}
	r.resolution.forgetMarker()
	cerr := &configError{what: "writing the commit marker into " + table,
		fix: "the marker table needs SELECT, INSERT and DELETE for this user", err: err}
	if !r.cfg.mysqlMarkerSet {
		r.markerTurnOff(ctx, cerr)
		return nil
	}
	return newError("commit", 1, Permanent, nil, cerr)
}

// sessionRoleRefused says whether err, a refused privilege at the
// marker, came under a role of the session's own: CURRENT_ROLE() differs
// from a new session's.
func (r *retrier) sessionRoleRefused(ctx context.Context, c *conn, err error) bool {
	switch mysqlNumber(err) {
	case 1142, 1143, 1044:
	default:
		return false
	}
	const q = "SELECT CURRENT_ROLE()"
	mine, e := queryRow(ctx, c.inner, r.own(q))
	if e != nil || len(mine) == 0 {
		return false
	}
	dc, e := r.inner.Connect(ctx)
	if e != nil {
		return false
	}
	defer dc.Close()
	fresh, e := queryRow(ctx, dc, q)
	if e != nil || len(fresh) == 0 {
		return false
	}
	return textOf(mine[0]) != textOf(fresh[0])
}

// markerMissing handles a marker table the check found or created that
// this server says does not exist (1146). That refuses nothing: on Galera
// the check's side connection may have reached another node than the
// transaction's, and DDL is applied on the other nodes asynchronously, so
// a table just created there may not be here yet; or it was dropped
// since. The next transaction checks it again (creating it if it is
// gone), and the marker stays on; what the user may not do, the check
// says. A miss within markerRecheck of that check keeps the name: the
// table stays missing where the transactions commit (their side
// connection reaches another server that has it: a proxy, a table created
// with wsrep_on=OFF), and checking it on a side connection at every
// transaction would cost more than the failed INSERT. That is said once
// per window; the transactions commit without a marker (a lost COMMIT is
// ErrAmbiguousCommit) until the table is there.
func (r *retrier) markerMissing(ctx context.Context, err error) {
	rs := r.resolution
	now := r.clock.Now().UnixNano()
	at := rs.markerMissAt.Load()
	if at == 0 || now-at >= int64(markerRecheck) {
		if rs.markerMissAt.CompareAndSwap(at, now) {
			rs.forgetMarker()
		}
		return
	}
	if said := rs.markerMissSaid.Load(); said == at || !rs.markerMissSaid.CompareAndSwap(said, at) {
		return
	}
	r.sayResolutionOff(ctx, err, "the MySQL commit marker table is missing on the server the transactions commit on, though a side connection found it: "+
		"they commit without a marker (a lost COMMIT is ErrAmbiguousCommit) until it is there; checked again every "+markerRecheck.String())
}

// sayResolutionOff tells that lost COMMITs are (for now) ErrAmbiguousCommit:
// to the observer, or on slog's default logger when there is none, which
// the operator must know.
func (r *retrier) sayResolutionOff(ctx context.Context, why error, reason string) {
	if r.obs == nil {
		slog.Default().LogAttrs(ctx, slog.LevelWarn, "sqlretry "+EventResolutionOff.String(),
			slog.String("reason", reason), slog.String("error", why.Error()))
		return
	}
	r.observe(ctx, Event{Kind: EventResolutionOff, Op: "commit", Class: Permanent, Err: why, Reason: reason})
}

// markerTurnOff turns the default marker off for this db, and says so once:
// to the observer, or on slog's default logger when there is none (a lost
// COMMIT is ErrAmbiguousCommit from now on, which the operator must know).
func (r *retrier) markerTurnOff(ctx context.Context, why error) {
	if !r.resolution.markerOff.CompareAndSwap(false, true) {
		return
	}
	r.sayResolutionOff(ctx, why, "the MySQL commit marker is off for this db: a lost COMMIT is ErrAmbiguousCommit; "+
		"name a table the user may use with WithMySQLCommitMarker, or turn it off with WithMySQLCommitMarker(\"\")")
}

// commitWithMarker sends the marker's INSERT and the COMMIT as one
// statement, a MariaDB anonymous block: one round trip, as COMMIT alone.
// A failing statement ends a block with its error and the rest does not
// run (MariaDB 10.11: TestMariaDBMarkerBlockStopsAtAFailedInsert), so a
// failed INSERT never lets the COMMIT through: a transaction that
// committed has its marker. Any error the server answered means the
// transaction did not commit; it may still be open (a failed INSERT rolls
// back only itself), so it is rolled back here.
func (t *tx) commitWithMarker() (abandoned bool, err error) {
	r, inner := t.c.r, t.c.inner
	q := r.own("BEGIN NOT ATOMIC " + markerInsert(t.marker, t.token) + "; COMMIT; END")
	abandoned, err = t.withinDeadline("COMMIT", func(driver.Tx) error {
		return execConn(context.Background(), inner, q)
	})
	if abandoned || err == nil || !serverAnswered(err) {
		return abandoned, err // a lost reply is resolved by the token
	}
	switch n := mysqlNumber(err); {
	case n == 1792:
		// READ ONLY by the session: the INSERT failed, COMMIT did not
		// run, and nothing durable can commit.
		t.token, t.nothingDurable = nil, true
		return t.withinDeadline("COMMIT", driver.Tx.Commit)
	case n == 1146:
		// Not there on this server (markerMissing): the block stopped
		// at the INSERT, the transaction is open; it commits without a
		// marker.
		t.token = nil
		r.markerMissing(t.ctx, err)
		return t.withinDeadline("COMMIT", driver.Tx.Commit)
	case markerShapeNumber(n):
		// The session sees another table under the marker's name (a
		// temporary one): the block stopped at the INSERT; the
		// transaction is open and commits without a marker
		// (markerShadowed).
		t.markerShadowed()
		return t.withinDeadline("COMMIT", driver.Tx.Commit)
	case sessionLockRefused(n):
		// The block stopped at the INSERT: a table lock of the session's
		// own, taken where sqlretry could not read it (LOCK TABLES from a
		// user variable by EXECUTE IMMEDIATE). The transaction is as it
		// was; it commits without a marker, as the plain driver commits.
		t.token = nil
		return t.withinDeadline("COMMIT", driver.Tx.Commit)
	case isConfigNumber(n):
		t.token = nil
		if cerr := r.markerRefused(t.ctx, t.c, t.marker, err); cerr != nil {
			_ = t.rollback()
			return false, cerr
		}
		return t.withinDeadline("COMMIT", driver.Tx.Commit)
	case n == 1317 || n == 1969:
		// Interrupted (KILL QUERY from another session; max_statement_time
		// where the prefix is not taken): the block may have stopped
		// after its COMMIT took effect (attack14: a committed transaction
		// was reported failed). Its own session cannot say which: under
		// completion_type = CHAIN the COMMIT opened the next transaction,
		// and under autocommit = 0 a read of the marker table opens one
		// (attack15). Resolved as a lost COMMIT: the session is not used
		// again, the resolver ends it (KILL) and looks the token up on a
		// side connection.
		t.c.bad.Store(true)
		return false, newError("commit", 1, Ambiguous, nil, fmt.Errorf("sqlretry: the COMMIT's statement was interrupted: %w", err))
	case n == 1064 || n == 1235:
		// The server refused the block (a MariaDB before 10.1.1, a proxy
		// that claims MariaDB's version): nothing ran. Separate INSERTs
		// from now on; this transaction is replayed once.
		r.resolution.markerNoBlock.Store(true)
		t.token = nil
		_ = t.rollback()
		return false, newError("commit", 1, RetryTransaction, nil, fmt.Errorf("sqlretry: the commit marker's block was refused: %w", err))
	}
	_ = t.rollback()
	return false, err
}

// lacksFunction reports the definite "this engine has no such function".
func lacksFunction(err error) bool {
	var pg interface{ SQLState() string }
	if !errors.As(err, &pg) {
		return false
	}
	switch pg.SQLState() {
	case "42883", // undefined_function
		"0A000": // feature_not_supported
		return true
	}
	return false
}

func mysqlNumber(err error) uint16 {
	n, _, _ := mysqlErrorOf(err)
	return n
}

// resolutionFailed is the error of a failed step of sqlretry's own
// resolution machinery before COMMIT. A lost connection, or one the driver
// says it never used, keeps its class: the server rolls the transaction
// back, as for any connection lost before COMMIT. So does a MySQL deadlock
// (1213, also Galera's certification failure): the server rolled the
// transaction back, and it is replayed as after one at COMMIT. Any other failure is
// permanent: it is no reason to run the caller's transaction again.
func (r *retrier) resolutionFailed(ctx context.Context, what string, err error) error {
	cls := r.classify(err)
	switch {
	case ctx.Err() != nil:
		cls = Permanent
	case cls == ConnectionLost:
	case cls == Unavailable && !serverAnswered(err):
	case cls == RetryTransaction && r.dialect == DialectMySQL:
		// A deadlock or a Galera certification failure at sqlretry's own
		// statement: the server rolled the transaction back, exactly as
		// had it come at COMMIT, so the transaction is replayed.
	default:
		cls = Permanent
	}
	return newError("commit", 1, cls, nil, fmt.Errorf("sqlretry: %s before COMMIT: %w", what, err))
}

// configError is a setting or a privilege that sqlretry needs and lacks;
// it says what to do.
type configError struct {
	what, fix string
	err       error
}

func (e *configError) Error() string {
	s := "sqlretry: configuration: " + e.what + " failed; " + e.fix
	if e.err != nil {
		s += ": " + e.err.Error()
	}
	return s
}
func (e *configError) Unwrap() error { return e.err }

// afterCommit asks now and then for old marker rows to be deleted, off the
// caller's path (see cleanMarkers).
func (t *tx) afterCommit() {
	r := t.c.r
	if t.token == nil || r.resolution.markerCount.Add(1)%256 != 0 {
		return
	}
	r.resolution.requestCleanup(r.inner, t.marker)
}

const markerDDL = `CREATE TABLE IF NOT EXISTS %s (
	token BINARY(16) NOT NULL PRIMARY KEY,
	created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	KEY (created_at)
) ENGINE=InnoDB`

// markerRecheck is how long a configuration error of the marker is
// answered from memory before the table is looked at again (a DBA may
// grant what was missing).
const markerRecheck = 10 * time.Second

// markerTable returns the fully qualified marker table, checking it once
// on a side connection (DDL inside the caller's transaction would commit
// it implicitly). The name is fixed here, from the DSN's database when the
// option names no schema, so that USE in a closure cannot move the marker
// away from where the lookup looks (issue 15). The table is created only
// when it is missing: a DBA may have created it and granted only SELECT,
// INSERT and DELETE. A configuration error (no default database, a missing
// privilege) is returned at once, permanent, with what to do, for a table
// the caller named; the default marker turns itself off instead, as it
// does when the server refuses the check for good. When the side
// connection fails otherwise the name is "" and no error: the caller's
// transaction is not at fault, it commits without a marker (a lost COMMIT
// is then ErrAmbiguousCommit) and the next one checks again.
func (r *retrier) markerTable(ctx context.Context) (string, []byte, error) {
	rs := r.resolution
	if m := rs.markerName.Load(); m != nil {
		return m.name, m.sentinel, nil // every writing transaction: no lock
	}
	rs.markerMu.Lock()
	defer rs.markerMu.Unlock()
	if m := rs.markerName.Load(); m != nil {
		return m.name, m.sentinel, nil
	}
	if rs.markerOff.Load() {
		return "", nil, nil // turned off while this transaction waited for the lock
	}
	if rs.markerErr != nil && r.clock.Now().Sub(rs.markerErrAt) < markerRecheck {
		return "", nil, rs.markerErr
	}
	dc, err := r.inner.Connect(ctx)
	if err != nil {
		return "", nil, nil
	}
	defer dc.Close()
	// A second at most for a lock on the table: a READ lock the
	// transaction's own session took on it (LOCK TABLES by EXECUTE
	// IMMEDIATE, out of the text check's sight) held the check until the
	// caller's deadline (attack18). Then this transaction commits without
	// a marker and the next one checks again.
	_ = execConn(ctx, dc, "SET SESSION lock_wait_timeout = 1, innodb_lock_wait_timeout = 1")
	name, sentinel, cerr, err := checkMarkerTable(ctx, dc, r.cfg.mysqlMarker)
	if cerr == nil && err != nil && !r.cfg.mysqlMarkerSet && serverAnswered(err) && r.classify(err) == Permanent {
		// An engine that speaks MySQL's protocol but refuses the check
		// (no information_schema, no such syntax): asking again at every
		// transaction would cost a side connection each time.
		cerr = &configError{what: "checking the commit marker table", fix: "this server does not answer what the marker needs", err: err}
	}
	if cerr != nil && !r.cfg.mysqlMarkerSet {
		r.markerTurnOff(ctx, cerr)
		return "", nil, nil
	}
	if cerr != nil {
		rs.markerErr, rs.markerErrAt = newError("commit", 1, Permanent, nil, cerr), r.clock.Now()
		return "", nil, rs.markerErr
	}
	if err != nil {
		return "", nil, nil
	}
	rs.markerErr = nil
	rs.markerName.Store(&markerInfo{name: name, sentinel: sentinel})
	return name, sentinel, nil
}

// markerInfo is the checked marker table and the sentinel row the check
// found or put in it.
type markerInfo struct {
	name     string
	sentinel []byte
}

// checkMarkerTable qualifies the marker's name, creates the table if it is
// missing and checks the privileges the resolution needs. cerr is a
// configuration error, err any other failure.
func checkMarkerTable(ctx context.Context, dc driver.Conn, option string) (name string, sentinel []byte, cerr, err error) {
	schema, table, qualified := strings.Cut(option, ".")
	if !qualified {
		schema, table = "", option
		vals, err := queryRow(ctx, dc, "SELECT DATABASE()")
		if err != nil {
			return "", nil, nil, err
		}
		if vals[0] == nil {
			return "", nil, &configError{what: fmt.Sprintf("placing the commit marker table %q", option),
				fix: `the DSN names no database: name the table with its database, WithMySQLCommitMarker("db.` + option + `"), or add one to the DSN`}, nil
		}
		schema = asString(vals[0])
	}
	name = quoteMySQL(schema) + "." + quoteMySQL(table)
	vals, err := queryRow(ctx, dc, "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?", schema, table)
	if err != nil {
		return "", nil, nil, err
	}
	ddl := fmt.Sprintf(markerDDL, name)
	if asInt64(vals[0]) != 0 {
		// A table that was there (a DBA's, another program's) must keep a
		// token as it is written; see markerShapeOK.
		if cerr, err := markerShapeOK(ctx, dc, schema, table, name, ddl); cerr != nil || err != nil {
			return "", nil, cerr, err
		}
	} else if err := execConn(ctx, dc, ddl); err != nil {
		if isConfigNumber(mysqlNumber(err)) {
			return "", nil, &configError{what: "creating the commit marker table " + name,
				fix: "create it once as an administrator (" + oneLine(ddl) + ") and grant this user SELECT, INSERT and DELETE on it", err: err}, nil
		}
		return "", nil, nil, err
	}
	// The lookup reads the table, the clean-up deletes from it. WHERE 1=0
	// checks the privilege and touches no row.
	for _, q := range []string{"SELECT COUNT(*) FROM " + name + " WHERE 1=0", "DELETE FROM " + name + " WHERE 1=0"} {
		if err := execConn(ctx, dc, q); err != nil {
			if isConfigNumber(mysqlNumber(err)) {
				return "", nil, &configError{what: "checking the privileges on the commit marker table " + name,
					fix: "grant this user SELECT, INSERT and DELETE on it", err: err}, nil
			}
			return "", nil, nil, err
		}
	}
	// The sentinel row (markerSentinelPrefix and random bytes), which the
	// lookup after a lost COMMIT reads beside the token: the one already
	// there (another db's, an earlier check's), else a new one. No write
	// once one is there (under semi-synchronous replication a write waits
	// for a replica). A table dropped and created again gets a new one,
	// so the old one's absence tells, also when another db (or this one)
	// created the table again before the lookup.
	rows, err := queryRows(ctx, dc, markerSentinelFind(name))
	if err != nil {
		return "", nil, nil, err
	}
	if len(rows) > 0 && len(rows[0]) > 0 {
		if b := []byte(asString(rows[0][0])); len(b) == 16 {
			return name, b, nil, nil
		}
	}
	sentinel = make([]byte, 16)
	copy(sentinel, markerSentinelPrefix)
	_, _ = rand.Read(sentinel[len(markerSentinelPrefix):])
	// Under autocommit=0 (a DSN's, init_connect's) the INSERT would open a
	// transaction that closing the connection rolls back: autocommit on
	// for this side connection first (which commits nothing of note: the
	// check only read).
	if err := execConn(ctx, dc, "SET SESSION autocommit = 1"); err != nil {
		return "", nil, nil, err
	}
	if err := execConn(ctx, dc, markerSentinelInsert(name, sentinel)); err != nil {
		if isConfigNumber(mysqlNumber(err)) {
			return "", nil, &configError{what: "writing to the commit marker table " + name,
				fix: "grant this user SELECT, INSERT and DELETE on it", err: err}, nil
		}
		return "", nil, nil, err
	}

	return name, sentinel, nil, nil
}

// markerSentinelPrefix begins a sentinel row's token: a row the marker
// check puts in the table and the clean-up leaves. A lookup after a lost
// COMMIT that finds neither the token nor the sentinel of the table the
// transaction used looks at a table that was emptied since (dropped and
// created again, TRUNCATEd, all its rows deleted), where "no token" says
// nothing about the COMMIT (attack7: the committed write ran twice).
// Tokens are random: one that begins so is 1 in 2^72.
const markerSentinelPrefix = "sqlretry:"

// markerSentinels is the key range of the sentinel rows (the prefix, up
// to the byte after its last).
const markerSentinels = "token >= '" + markerSentinelPrefix + "' AND token < 'sqlretry;'"

// markerSentinelFind finds a sentinel row (the key's range: no scan).
func markerSentinelFind(name string) string {
	return "SELECT token FROM " + name + " WHERE " + markerSentinels + " LIMIT 1"
}

func markerSentinelInsert(name string, sentinel []byte) string {
	return "INSERT IGNORE INTO " + name + " (token) VALUES (X'" + hex.EncodeToString(sentinel) + "')"
}

// markerLookup counts the token (the second argument) and the sentinel
// (the first) in one statement.
func markerLookup(table string) string {
	return "SELECT COUNT(*), (SELECT COUNT(*) FROM " + table + " WHERE token = ?) FROM " + table + " WHERE token = ?"
}

// markerTriggers counts the triggers on the marker table, by its quoted
// name.
const markerTriggers = "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE " +
	"CONCAT('`', REPLACE(EVENT_OBJECT_SCHEMA, '`', '``'), '`.`', REPLACE(EVENT_OBJECT_TABLE, '`', '``'), '`') = ?"

// errMarkerChanged is a final "cannot know": the marker table is not the
// one whose shape was checked.
var errMarkerChanged = errors.New("sqlretry: the commit marker table changed since it was checked (emptied, created again, or given a trigger): a missing token says nothing about the COMMIT; leave the table to sqlretry")

// markerNotFound is the answer when the token is not found where that
// would say "not committed": it says so only while the table still holds
// the sentinel (it was not emptied since the check) and no trigger is on
// it that this user can see (one that rewrites the token was added since;
// information_schema shows a table's triggers only to users with the
// TRIGGER privilege on it).
func markerNotFound(ctx context.Context, dc driver.Conn, table string, sentinel int64) (CommitOutcome, error) {
	if sentinel == 0 {
		return CommitUnknown, errMarkerChanged
	}
	trg, err := queryRow(ctx, dc, markerTriggers, table)
	if err != nil {
		return CommitUnknown, err
	}
	if asInt64(trg[0]) != 0 {
		return CommitUnknown, errMarkerChanged
	}
	return CommitNotCommitted, nil
}

// markerShapeOK checks an existing marker table: a token column that cut
// or converted the 16 bytes (VARBINARY(8), a character column under a lax
// sql_mode, BINARY(32) padding it) or a trigger on the table (one may
// rewrite the token) would make the lookup after a lost COMMIT find
// nothing, and a COMMIT that took effect would be replayed. So the column
// must be BINARY(16), or a VARBINARY or BLOB of 16 bytes or more, the
// engine transactional, and no trigger may be on the table.
func markerShapeOK(ctx context.Context, dc driver.Conn, schema, table, name, ddl string) (cerr, err error) {
	bad := func(what string) error {
		return &configError{what: "using the existing table " + name + " as the commit marker (" + what + ")",
			fix: "the marker table needs a token column of BINARY(16) and no trigger: drop it and let sqlretry create it (" +
				oneLine(ddl) + "), or name another table with WithMySQLCommitMarker"}
	}
	cols, err := queryRows(ctx, dc, "SELECT DATA_TYPE, CHARACTER_OCTET_LENGTH FROM information_schema.COLUMNS "+
		"WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COLUMN_NAME = 'token'", schema, table)
	if err != nil {
		return nil, err
	}
	if len(cols) == 0 || len(cols[0]) < 2 {
		return bad("it has no token column"), nil
	}
	typ, n := strings.ToLower(textOf(cols[0][0])), asInt64(cols[0][1])
	switch {
	case typ == "binary" && n == 16:
	case (typ == "varbinary" || strings.HasSuffix(typ, "blob")) && n >= 16:
	default:
		return bad(fmt.Sprintf("its token column is %s(%d), which does not keep 16 bytes as written", typ, n)), nil
	}
	// The marker's INSERT writes token and created_at: a table without
	// created_at, or with another column it must fill (NOT NULL, no
	// default, not generated), refuses every marker (attack22: another
	// session's ALTER TABLE made every transaction commit without one and
	// check the table again on a side connection).
	shape, err := queryRow(ctx, dc, markerColumnsQuery, schema, table)
	if err != nil {
		return nil, err
	}
	if len(shape) < 2 || asInt64(shape[0]) != 1 {
		return bad("it has no created_at column"), nil
	}
	if asInt64(shape[1]) != 0 {
		return bad("another column of it must be given a value"), nil
	}
	eng, err := queryRow(ctx, dc, "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?", schema, table)
	if err != nil {
		return nil, err
	}
	switch strings.ToLower(textOf(eng[0])) {
	case "innodb", "rocksdb", "tokudb":
	default:
		// A table that keeps a row its transaction rolled back (MyISAM,
		// Aria, MEMORY) would answer "committed" for a COMMIT that never
		// took effect.
		return bad("its engine " + textOf(eng[0]) + " does not roll a marker back with its transaction"), nil
	}
	trg, err := queryRow(ctx, dc, "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = ? AND EVENT_OBJECT_TABLE = ?", schema, table)
	if err != nil {
		return nil, err
	}
	if asInt64(trg[0]) != 0 {
		return bad("a trigger is on it, which may change the token"), nil
	}
	return nil, nil
}

// markerColumnsQuery counts the marker table's created_at columns and its
// other columns an INSERT of token and created_at cannot leave out.
const markerColumnsQuery = "SELECT COALESCE(SUM(COLUMN_NAME = 'created_at'), 0), COALESCE(SUM(COLUMN_NAME NOT IN ('token', 'created_at') " +
	"AND IS_NULLABLE = 'NO' AND COLUMN_DEFAULT IS NULL AND EXTRA NOT LIKE '%auto_increment%' AND EXTRA NOT LIKE '%GENERATED%' " +
	"AND EXTRA NOT LIKE '%VIRTUAL%' AND EXTRA NOT LIKE '%PERSISTENT%' AND EXTRA NOT LIKE '%STORED%'), 0) " +
	"FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?"

// oneLine is a statement's text on one line, for a message.
func oneLine(q string) string { return strings.Join(strings.Fields(q), " ") }

// isConfigNumber: access denied, no database, no such table or database,
// or a table of another shape under the marker's name (no such column,
// a value it refuses).
func isConfigNumber(n uint16) bool {
	switch n {
	case 1142, 1143, 1044, 1045, 1046, 1049, 1146, 1227:
		return true
	}
	return markerShapeNumber(n) // a table of another shape under the marker's name
}

// sessionLockRefused says whether a MySQL error number refuses the marker's
// INSERT for a table lock the session itself holds: 1099, the table is
// locked with a READ lock (LOCK TABLES ... READ that named it: a
// mysqldump-style lock of every table of the database, attack18); 1100,
// the table was not locked with LOCK TABLES (which locks the session out
// of every other table); 1223, a read lock (FLUSH TABLES WITH READ LOCK, ... FOR EXPORT,
// MariaDB's BACKUP LOCK). escape() finds these statements by their text;
// this is the fallback for text it cannot read: the statement was refused
// and left the transaction as it was (attack9, attack15, attack16 and a
// LOCK TABLES run by EXECUTE IMMEDIATE from a user variable).
func sessionLockRefused(n uint16) bool {
	return n == 1099 || n == 1100 || n == 1223
}

// quoteMySQL quotes an identifier with backticks.
func quoteMySQL(id string) string {
	return "`" + strings.ReplaceAll(id, "`", "``") + "`"
}

// forgetMarker makes the next transaction check the marker table again.
func (rs *resolveState) forgetMarker() {
	rs.markerName.Store(nil)
}

// requestCleanup wakes the clean-up goroutine of the marker table, starting
// it on first use. It never blocks the caller.
func (rs *resolveState) requestCleanup(c driver.Connector, table string) {
	rs.cleanMu.Lock()
	defer rs.cleanMu.Unlock()
	if rs.closed || c == nil {
		return
	}
	if rs.cleanDue == nil {
		ctx, cancel := context.WithCancel(context.Background())
		rs.cleanDue, rs.cleanStop, rs.cleanDone = make(chan string, 1), cancel, make(chan struct{})
		go cleanLoop(ctx, c, rs.cleanDue, rs.cleanDone)
	}
	select {
	case rs.cleanDue <- table:
	default: // one is due already
	}
}

// close stops the clean-up goroutine and waits for it: the db is closing.
func (rs *resolveState) close() {
	rs.cleanMu.Lock()
	rs.closed = true
	stop, done := rs.cleanStop, rs.cleanDone
	rs.cleanMu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
}

func cleanLoop(ctx context.Context, c driver.Connector, due <-chan string, done chan<- struct{}) {
	defer close(done)
	for {
		select {
		case <-ctx.Done():
			return
		case table := <-due:
			cleanMarkers(ctx, c, table)
		}
	}
}

// cleanTimeout bounds one clean-up; cleanBatch the rows it deletes.
const (
	cleanTimeout = 10 * time.Second
	cleanBatch   = 5000
)

// cleanMarkers deletes marker rows older than an hour on a side connection
// of its own, in autocommit. It waits at most a second for a row lock (a
// row someone holds is left for a later round) and gives up after
// cleanTimeout; its errors are nobody's: the next round tries again.
func cleanMarkers(ctx context.Context, c driver.Connector, table string) {
	ctx, cancel := context.WithTimeout(ctx, cleanTimeout)
	defer cancel()
	dc, err := c.Connect(ctx)
	if err != nil {
		return
	}
	defer dc.Close()
	if execConn(ctx, dc, "SET SESSION innodb_lock_wait_timeout = 1, lock_wait_timeout = 1") != nil {
		return
	}
	_ = execConn(ctx, dc, markerCleanQuery(table, time.Now()))
}

// markerToken is a transaction's marker token: the time it was made, in
// milliseconds since 1970, in its first 6 bytes (big-endian), then
// markerTokenTimed, then 9 random bytes. The clean-up deletes such a row
// only when both its created_at and its token's time are over an hour old:
// created_at comes from the server's clock read through the session, which
// a closure can move (SET time_zone for a DATETIME column of a table the
// user made, SET timestamp under --sysdate-is-now), and a marker deleted
// before its lost COMMIT's lookup replays a committed transaction
// (attack15, attack17). Tokens of an earlier release (16 random bytes)
// keep the created_at rule alone, except the 1 in 256 whose 7th byte is
// markerTokenTimed, which stay.
func markerToken(now time.Time) []byte {
	token := make([]byte, 16)
	copy(token, markerTime(now))
	token[6] = markerTokenTimed
	_, _ = rand.Read(token[7:])
	return token
}

const markerTokenTimed = 0xa5

// markerCleanQuery deletes up to cleanBatch marker rows written over an
// hour before now, by both clocks (markerToken), never the sentinels.
func markerCleanQuery(table string, now time.Time) string {
	return fmt.Sprintf("DELETE FROM %s WHERE created_at < NOW(6) - INTERVAL 1 HOUR AND (SUBSTRING(token, 7, 1) <> X'%02x' OR token < X'%s') AND NOT (%s) LIMIT %d",
		table, markerTokenTimed, hex.EncodeToString(markerTime(now.Add(-time.Hour))), markerSentinels, cleanBatch)
}

// markerTime is the first 6 bytes of a token made at t: its milliseconds
// since 1970, big-endian.
func markerTime(t time.Time) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(t.UnixMilli())<<16)
	return b[:6]
}

// resolveCommit finds out whether the COMMIT of t took effect, within ctx.
func (r *retrier) resolveCommit(ctx context.Context, t *tx) CommitOutcome {
	var check func(ctx context.Context, dc driver.Conn) (CommitOutcome, error)
	by, rule := "the transaction id", ""
	unseenLife := false // a question lost with its connection (pgCheckCommit)
	switch {
	case r.dialect == DialectPostgres && t.xid != 0:
		if t.mark.lsn != 0 {
			by = "the transaction id and its WAL position"
		}
		check = func(ctx context.Context, dc driver.Conn) (CommitOutcome, error) {
			return pgCheckCommit(ctx, dc, t.xid, t.c.serverID, t.c.serverStart, t.mark, &rule, unseenLife, t.c.serverReplay)
		}
	case r.dialect == DialectMySQL && t.token != nil:
		by = "the commit marker"
		check = func(ctx context.Context, dc driver.Conn) (CommitOutcome, error) {
			return mysqlCheckCommit(ctx, dc, t.marker, t.token, t.sentinel, t.c.serverID, t.c.mysqlServer)
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
	asked := 0
	for attempt := 1; ; attempt++ {
		closing := r.breaker.nextClosing() // a probe that finds the server back ends the pause below
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
			asked++
			o, err := check(ctx, dc)
			if err == nil && o != CommitUnknown {
				outcome = o
				break
			}
			if errors.Is(err, errUnresolvable) || errors.Is(err, errOtherCluster) || errors.Is(err, errMarkerChanged) {
				lastErr = err
				if errors.Is(err, errMarkerChanged) {
					r.resolution.forgetMarker() // the next transaction checks the table again
				}
				break
			}
			if err != nil {
				lastErr = err
				unseenLife = true
				dc.Close()
				dc = nil
			}
		}
		d, stop := p.next(ctx, attempt)
		if stop != "" || sleepUntilClosed(ctx, r.clock, d, closing) != nil {
			break
		}
	}
	if outcome != CommitUnknown {
		r.counters.commitsResolved.Add(1)
	}
	why := fmt.Sprintf("asked by %s on a new connection (%d question(s))", by, asked)
	if rule != "" && outcome != CommitUnknown {
		why += "; " + rule
	}
	if outcome == CommitUnknown && lastErr != nil {
		why += "; the last answer: " + lastErr.Error()
	}
	r.observe(ctx, Event{Kind: EventCommitResolved, Op: "commit", Attempt: 1, Class: ConnectionLost, Outcome: outcome, Err: lastErr, Reason: why})
	return outcome
}

// pgStartTime is the server's start time in microseconds: a restart since
// the transaction makes its id ambiguous.
const pgStartTime = "(extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint"

// errUnresolvable is a final "cannot know".
var errUnresolvable = errors.New("sqlretry: the server restarted or was promoted since the COMMIT and may have handed out its transaction id again")

// errRecoveredNoProof is errUnresolvable for a transaction without the WAL
// proof on a server whose start time is unchanged but which has run
// recovery since the connection asked (or cannot say whether it has): a
// backend that crashes makes the postmaster end every session and run
// crash recovery, keeping its start time, and a recovery that lost the
// COMMIT's record hands its id out again.
var errRecoveredNoProof = fmt.Errorf("%w (the same start time, but the server has run crash recovery since the connection asked, or cannot say, and the transaction carried no WAL proof to tell whether that was after it)", errUnresolvable)

// pgNoProofLifeQuery is the question after a lost COMMIT for a transaction
// without the WAL proof: the start time, whether the server is a standby
// (or still electing), and where its last recovery ended (NULL when it
// started without one). pgNoProofStartQuery is what is left when the role
// may not run pg_last_wal_replay_lsn.
const (
	pgNoProofLifeQuery  = "SELECT " + pgStartTime + ", pg_catalog.pg_is_in_recovery(), " + pgReplayCol
	pgNoProofStartQuery = "SELECT " + pgStartTime + ", pg_catalog.pg_is_in_recovery()"
)

// pgNoProofNow is the answer of pgNoProofLifeQuery.
type pgNoProofNow struct {
	start      int64
	inRecovery bool
	replay     uint64 // replayUnknown: the role may not ask for it
}

// replayUnknown is a replay position nobody asked for (conn.serverReplay,
// pgNoProofNow.replay); 0 is a server that started without recovery.
const replayUnknown = ^uint64(0)

// replayAt is the replay position in column i of an answer, replayUnknown
// where the question did not ask for it.
func replayAt(vals []driver.Value, i int) uint64 {
	if len(vals) > i {
		return lsnValue(vals[i])
	}
	return replayUnknown
}

// pgAskLifeNoProof asks pgNoProofLifeQuery, or pgNoProofStartQuery where
// the role may not run the function that tells the replay position.
func pgAskLifeNoProof(ctx context.Context, dc driver.Conn) (pgNoProofNow, error) {
	vals, err := queryRow(ctx, dc, pgNoProofLifeQuery)
	known := true
	var pg interface{ SQLState() string }
	if err != nil && errors.As(err, &pg) {
		switch pg.SQLState() {
		case "42501", "42883": // EXECUTE revoked, or no such function (an engine that speaks PostgreSQL's protocol)
			known = false
			vals, err = queryRow(ctx, dc, pgNoProofStartQuery)
		}
	}
	if err != nil {
		return pgNoProofNow{}, err
	}
	if len(vals) < 2 || (known && len(vals) < 3) {
		return pgNoProofNow{}, errors.New("sqlretry: the server's start time query returned too few columns")
	}
	rec, ok := vals[1].(bool)
	if !ok {
		return pgNoProofNow{}, fmt.Errorf("sqlretry: pg_is_in_recovery() answered %T", vals[1])
	}
	n := pgNoProofNow{start: asInt64(vals[0]), inRecovery: rec, replay: replayUnknown}
	if known {
		n.replay = lsnValue(vals[2])
	}
	return n, nil
}

// pgNoProofRecovered says whether a server with the transaction's start
// time may have run recovery since the connection asked: its replay
// position differs from the one the connection recorded (a crash cycle
// always moves it on: each recovery replays at least the checkpoint the
// one before ended with), or either is not known, and then any recovery
// in the server's life counts.
func pgNoProofRecovered(now pgNoProofNow, replay uint64) bool {
	switch {
	case now.replay == replayUnknown:
		return true
	case replay == replayUnknown:
		return now.replay != 0
	}
	return now.replay != replay
}

// pgCheckCommit asks once. "in progress" means the old backend still holds
// the transaction: end it if it is still that backend and has sat idle in
// its transaction for pgIdleGrace (never once seen to have begun its
// COMMIT, with or without synchronous replication: pgTerminateQuery), and
// ask again later. "committed"
// counts only once the old backend has let go of the id and, under
// synchronous replication, the synchronous standbys have the commit
// (pgReplicated): until then the commit may be on the primary alone, and a
// failover would lose it. When the server restarted since (start differs),
// or it is a promoted standby, the id may have been handed out again:
// "committed" is then no answer unless the transaction's mark proves the
// id's WAL record is in the history the server continues (pgJudgeLife);
// anything else is an answer.
//
// After a restart or a promotion, rule says which history rule decided.
//
// unseenLife: an earlier question of this resolution reached a server that
// had finished recovery and lost the connection before it answered.
func pgCheckCommit(ctx context.Context, dc driver.Conn, xid, pid, start int64, m pgMark, rule *string, unseenLife bool, replay uint64) (CommitOutcome, error) {
	restarted, proven, beyond := false, false, false
	recoveredNoProof := false // no proof, the same start time, a recovery since the server started
	unseen := false           // proven by the replay position, doubted for an unseen life
	var now pgNow
	switch {
	case m.lsn != 0:
		// The transaction recorded where its id is in the WAL
		// (resolve_failover.go).
		var err error
		now, err = pgAskNow(ctx, dc)
		if err != nil {
			return CommitUnknown, err
		}
		if now.inRecovery {
			// A standby, or a server still electing: its answer may change
			// as it replays; ask again later.
			return CommitUnknown, nil
		}
		restarted, proven, beyond, err = pgJudgeLife(m, now)
		if err != nil {
			return CommitUnknown, err
		}
		if restarted && beyond {
			// Final whatever the id's status: a later life on this
			// history continues it. Answered at once, so that a crash
			// before the next question cannot hide this life.
			*rule = "the server restarted or was promoted since (" + pgLifeAccount(m, now, "not read") + "): its history does not reach the record"
			return CommitNotCommitted, nil
		}
		if restarted && proven && now.tli == m.tli && now.replay != 0 && unseenLife {
			// The end of this life's recovery reaches the record, but a
			// server that had finished recovery (it took the connection)
			// died under an earlier question: it may have been a life
			// that lost the record, handed the id out again and wrote past
			// it before crashing too. The replay position cannot tell;
			// the WAL at L can (below).
			proven, unseen = false, true
		}
	case start != 0:
		n, err := pgAskLifeNoProof(ctx, dc)
		if err != nil {
			return CommitUnknown, err
		}
		if n.inRecovery {
			// A standby, or a server still electing: it may not have
			// replayed the COMMIT yet ("in progress", "in the future");
			// ask again later.
			return CommitUnknown, nil
		}
		restarted = n.start != start
		recoveredNoProof = !restarted && pgNoProofRecovered(n, replay)
	}
	st, err := pgAskStatus(ctx, dc, xid, pid)
	if err != nil {
		var pg interface{ SQLState() string }
		if (restarted || recoveredNoProof) && errors.As(err, &pg) && pg.SQLState() == "22023" {
			// "is in the future": the recovery ended before the id's
			// record, so our commit record, after it, is not in this
			// history either.
			return CommitNotCommitted, nil
		}
		return CommitUnknown, err
	}
	fork := "not read"
	if st.status == "committed" && restarted && !proven && !beyond && m.lsn != 0 && now.tli > m.tli {
		// A promoted server (restarted since, or started after the
		// connection asked): where its timeline forked from ours says.
		past, known, desc, child := pgHistoryFork(ctx, dc, now.tli, m)
		proven, beyond, fork = known && past, known && !past, desc
		if proven {
			// Past L on our timeline, but is the WAL at L ours? A crash
			// may have lost the record and a later life of our timeline
			// written past it before the promotion (pgRecordAt).
			ans, what, err := pgRecordAt(ctx, dc, []int64{m.tli, child}, m, xid)
			if err != nil {
				return CommitUnknown, err
			}
			proven, beyond, fork = ans == walOurs, ans == walOther, desc+"; "+what
		}
	}
	if st.status == "committed" && restarted && (proven || unseen) && now.tli == m.tli && m.lsn != 0 {
		// Another life of our timeline whose recovery reached L (or which
		// started without one, after a clean shutdown): the lives between
		// it and ours may not have been ours. A crash that lost the
		// record, then a life that no client of ours reached (a crash
		// recovery in single-user mode, or one that took writes for a
		// moment) handing the id out again and writing past L, then a
		// clean shutdown or a second crash: the id's status is another
		// transaction's. The WAL at L tells, where it can be read: our
		// message there is ours (a history that holds it never hands our
		// id out again), anything else is another life's, and our commit
		// record after it is not in this history. Read but not telling
		// (the segment removed by a checkpoint since, bytes that cannot
		// be placed): not proven. Where the role may not read it, the
		// answer stays what the replay position said (resolve_failover.go).
		ans, what, err := pgRecordAt(ctx, dc, []int64{m.tli}, m, xid)
		if err != nil {
			return CommitUnknown, err
		}
		switch ans {
		case walOurs:
			proven = true
		case walOther:
			proven, beyond = false, true
		case walUnknown:
			proven = false
		}
		fork = "none (same timeline); " + what
	}
	if restarted && m.lsn != 0 {
		*rule = "the server restarted or was promoted since (" + pgLifeAccount(m, now, fork) + "): "
		switch {
		case beyond:
			*rule += "its history does not reach the record"
		case proven:
			*rule += "its history holds the record"
		default:
			*rule += "not proven either way"
		}
	}
	switch {
	case st.status == "committed" && restarted && beyond:
		// The history the server continues does not hold the id's
		// record, nor our commit record after it: the id was taken again
		// by a transaction that committed. Ours did not.
		return CommitNotCommitted, nil
	case st.status == "committed" && recoveredNoProof:
		// The recovery may have come after the transaction, lost its
		// record and handed the id out again; nothing recorded says when
		// it ran. "aborted" or "in progress" stay answers: whoever holds
		// the id now, ours did not commit.
		*rule = "the same start time, a recovery since the connection asked (or not known), no WAL proof"
		return CommitUnknown, errRecoveredNoProof
	case st.status == "committed" && restarted && !proven:
		if m.lsn == 0 {
			return CommitUnknown, errUnresolvable
		}
		return CommitUnknown, fmt.Errorf("%w (%s)", errUnresolvable, pgLifeAccount(m, now, fork))
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
		if st.mayEnd() {
			// backend_xid guards against a reused pid; the state is read
			// again at the moment it is ended.
			_, _ = queryRow(ctx, dc, pgTerminateQuery, pid, xid)
		}
		return CommitUnknown, nil
	}
	// NULL: too old to know (wraparound); cannot happen within a deadline.
	return CommitUnknown, errors.New("sqlretry: txid_status has no answer")
}

// pgLifeAccount says what the history rules saw, for the event's reason
// and the error.
func pgLifeAccount(m pgMark, now pgNow, fork string) string {
	return fmt.Sprintf("the transaction: timeline %d, record end %s, server start %d, replay end %s; the server now: start %d, timeline %d, replay end %s; its timeline's fork: %s",
		m.tli, lsnString(m.lsn), m.start, lsnString(m.replay), now.start, now.tli, lsnString(now.replay), fork)
}

// mysqlServer names the server a session runs on: the connection ids of
// two servers are unrelated, so the old session is looked for (and
// KILLed) only on the server it ran on. key is empty when the server does
// not say (then every session looks alike, as before this was asked).
type mysqlServer struct {
	key    string // server_id/hostname:port
	galera bool   // wsrep_on=ON
	node   string // wsrep_node_name, on a Galera node
	// block: MariaDB, whose anonymous blocks carry the marker with the
	// COMMIT (commitWithMarker).
	block bool
}

// mysqlServerQuery works on MySQL (no wsrep rows) and MariaDB alike.
const mysqlServerQuery = "SHOW VARIABLES WHERE Variable_name IN ('server_id', 'hostname', 'port', 'wsrep_on', 'wsrep_node_name', 'version')"

func mysqlAskServer(ctx context.Context, dc driver.Conn, query string) (mysqlServer, error) {
	rows, err := queryRows(ctx, dc, query)
	if err != nil {
		return mysqlServer{}, err
	}
	vars := map[string]string{}
	for _, row := range rows {
		if len(row) >= 2 {
			vars[strings.ToLower(textOf(row[0]))] = textOf(row[1])
		}
	}
	var s mysqlServer
	if vars["server_id"] != "" || vars["hostname"] != "" || vars["port"] != "" {
		s.key = vars["server_id"] + "/" + vars["hostname"] + ":" + vars["port"]
	}
	s.galera = strings.EqualFold(vars["wsrep_on"], "ON") || vars["wsrep_on"] == "1"
	if s.galera {
		s.node = vars["wsrep_node_name"]
	}
	s.block = strings.Contains(vars["version"], "MariaDB")
	return s, nil
}

// mysqlCheckCommit asks once, on a side connection that may have reached
// another server than the transaction's (a Galera survivor, another
// endpoint). On a Galera node the marker is read causally (wsrep_sync_wait):
// the node first applies all the cluster has committed.
//
// On the transaction's own server: while the old session is in the
// process list it may still commit: KILL it and ask again later, unless
// semi-synchronous replication is on and the session has begun to commit
// (it may be waiting for a replica's ACK, and a KILL would publish a
// commit no replica has). Once it is gone, the marker says whether it
// committed; under semi-sync that counts only once a replica has it
// (mysqlReplicaHas).
//
// On another server the old session is neither looked for nor KILLed (the
// same id there is another client's session). A marker found is an answer.
// None found is one only on a Galera node that the old node is no longer
// a member of: Galera certifies at COMMIT, so a write set the cluster did
// not receive before the old node left is committed nowhere, and one it
// did receive is applied before a causal read answers. Otherwise the old
// session may still commit: ask again later.
func mysqlCheckCommit(ctx context.Context, dc driver.Conn, table string, token, sentinel []byte, connID int64, old mysqlServer) (CommitOutcome, error) {
	side, err := mysqlAskServer(ctx, dc, mysqlServerQuery)
	if err != nil {
		return CommitUnknown, err
	}
	if side.galera {
		if err := execConn(ctx, dc, "SET SESSION wsrep_sync_wait = 1"); err != nil {
			return CommitUnknown, err
		}
	}
	same := side.key == old.key
	if same {
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
	}
	vals, err := queryRow(ctx, dc, markerLookup(table), sentinel, token)
	if err != nil {
		return CommitUnknown, err
	}
	if asInt64(vals[0]) == 0 {
		if same {
			return markerNotFound(ctx, dc, table, asInt64(vals[1]))
		}
		if !side.galera || old.node == "" || old.node == side.node {
			return CommitUnknown, nil
		}
		member, err := queryRow(ctx, dc, "SELECT COUNT(*) FROM mysql.wsrep_cluster_members WHERE node_name = ?", old.node)
		if err != nil {
			return CommitUnknown, err
		}
		if asInt64(member[0]) != 0 {
			return CommitUnknown, nil // the old node is still in the cluster: its session may still commit
		}
		// The view without the old node came after anything it sent; the
		// causal read above waited for it. Read again to be sure the
		// answer is from after that view.
		vals, err = queryRow(ctx, dc, markerLookup(table), sentinel, token)
		if err != nil {
			return CommitUnknown, err
		}
		if asInt64(vals[0]) == 0 {
			return markerNotFound(ctx, dc, table, asInt64(vals[1]))
		}
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

// errNoRow: a one-row query answered no row (a session's
// sql_select_limit of 0 does that to SELECT CONNECTION_ID()).
var errNoRow = errors.New("sqlretry: no row")

// queryRow runs a one-row query on a driver connection. The query has
// succeeded only once the whole result has: a server may send the row and
// then an error where the end of the result should be, which
// go-sql-driver/mysql reports at Close (a Galera node that BF-aborts the
// transaction while the answer is on its way: the transaction was rolled
// back, and the session is in autocommit from then on). So the result is
// closed here, and its error is the query's.
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
	vals := make([]driver.Value, len(rows.Columns()))
	if err := rows.Next(vals); err != nil {
		rows.Close()
		if err == io.EOF {
			return nil, errNoRow
		}
		return nil, err
	}
	// A driver's []byte may point into its read buffer, which Close reads
	// the rest of the result into.
	for i, v := range vals {
		if b, ok := v.([]byte); ok {
			vals[i] = append([]byte(nil), b...)
		}
	}
	if err := rows.Close(); err != nil {
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
