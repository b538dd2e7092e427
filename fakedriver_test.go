package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock never sleeps: Sleep moves time forward and records the pause.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	sleeps []time.Duration
}

// It starts at the real time so that context deadlines made from it are
// not already past.
func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.sleeps = append(c.sleeps, d)
	c.mu.Unlock()
	return ctx.Err()
}
func (c *fakeClock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func (c *fakeClock) Sleeps() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.sleeps...)
}

// pgError is a server error with a SQLSTATE, like *pgconn.PgError.
type pgError struct{ code, msg string }

func (e *pgError) Error() string    { return "ERROR: " + e.msg + " (SQLSTATE " + e.code + ")" }
func (e *pgError) SQLState() string { return e.code }

// step is one scripted answer of the fake server to a statement.
type step struct {
	err   error
	ran   bool // the statement took effect even though err is set (lost reply)
	block bool // no answer until the caller's context is done
	// closes: the server ended the session with err (a FATAL, a KILL): the
	// connection is broken from then on (Ping and IsValid say so).
	closes bool
	// kills: the server sent err and closed the session, and the driver
	// has not noticed yet (go-sql-driver/mysql after a KILL): IsValid
	// holds until the next use (a statement, Ping, ROLLBACK) fails.
	kills bool
}

// fakeServer is what the fake connections talk to: scripts per statement
// (matched by prefix), and a log of what ran and what committed.
type fakeServer struct {
	refuseOwnPrefix bool // a MySQL: SET STATEMENT is a syntax error (mariaDBConn)
	// pgAborts makes a transaction behave as on PostgreSQL: after an error
	// every statement fails with 25P02 and COMMIT turns into a rollback.
	pgAborts bool

	mu         sync.Mutex
	scripts    map[string][]step
	dialErrs   []error
	dials      int
	ran        []string // autocommit statements and committed transactions' statements
	committed  int
	nextXID    int64
	xidStatus  map[int64]string // txid_status answers
	inflight   map[int64]int    // xid -> kills needed before the committed transaction shows its final status
	final      map[int64]string
	killed     []int64
	openConns  atomic.Int64
	hangCommit chan struct{} // when set, COMMIT and ROLLBACK wait for it to close

	inRecovery bool // a PostgreSQL standby: no transaction ids

	// pgLife, when set, answers the questions of resolve_failover.go
	// (hardening_resolve_failover_test.go): a PostgreSQL ≥ 10 server
	// that may restart or be replaced by a promoted standby.
	pgLife *fakePGLife

	// Synchronous replication (PostgreSQL), for pgStatusQuery and the
	// standby position checks.
	syncNames     string                // synchronous_standby_names
	syncCommit    string                // the side connection's synchronous_commit; "" is "on"
	oldBackend    map[int64]fakeBackend // xid -> its old backend, still holding it
	standbyLag    int                   // position checks that find the standby behind; -1 never caught up
	standbyHidden bool                  // the role cannot read pg_stat_replication's positions
	replChecks    int                   // position checks asked

	// Semi-synchronous replication (MySQL/MariaDB), for the marker's
	// resolution.
	semiSync          bool         // rpl_semi_sync_master_enabled
	markerEmptiedAt   int          // the marker table was emptied when ran had this many entries: rows written before are gone
	emptyBeforeLookup bool         // the marker table is emptied right before the next lookup after a lost COMMIT
	recreatedBy       []byte       // ... and created again by another db, whose sentinel this is
	markerTriggers    int64        // triggers on the marker table
	semiSyncOff       bool         // Rpl_semi_sync_master_status OFF (a wait timed out)
	semiSyncTimesOut  bool         // the next autocommit INSERT's wait times out: semiSyncOff from then on
	replicaFrozen     bool         // an autocommit INSERT or DELETE waits for the ACK until its context ends
	oldSession        *fakeBackend // the old session in the process list (any ID) until KILLed: state is its Command, waitEvent its State
	mysqlKills        []string     // KILL statements run

	// onQuery, when set, answers a query before the defaults (after its
	// script): ok false lets the defaults answer.
	onQuery func(c *fakeConn, q string, args []driver.NamedValue) (rows driver.Rows, ok bool)
	// onExec, when set, sees every statement run with Exec that its script
	// let through.
	onExec func(c *fakeConn, q string)

	// handCommits: statements (by prefix) that, run inside a transaction,
	// commit its work so far (a COMMIT by hand, MySQL's implicit commits);
	// the transaction goes on as a new one. Empty: none do.
	handCommits []string
}

// fakeBackend is what pg_stat_activity shows of an old backend.
type fakeBackend struct{ waitEvent, state string }

// fakeStart is the fake server's start time: it never restarts.
const fakeStart = int64(1_700_000_000_000_000)

func newFakeServer() *fakeServer {
	return &fakeServer{scripts: map[string][]step{}, xidStatus: map[int64]string{}, inflight: map[int64]int{}, final: map[int64]string{}, nextXID: 700,
		oldBackend: map[int64]fakeBackend{}}
}

func (s *fakeServer) script(prefix string, steps ...step) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.scripts[prefix] = append(s.scripts[prefix], steps...)
}

func (s *fakeServer) next(query string) (step, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for prefix, steps := range s.scripts {
		if strings.HasPrefix(query, prefix) && len(steps) > 0 {
			s.scripts[prefix] = steps[1:]
			return steps[0], true
		}
	}
	return step{}, false
}

func (s *fakeServer) ranCount(prefix string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, q := range s.ran {
		if strings.HasPrefix(q, prefix) {
			n++
		}
	}
	return n
}

// fakeConnector dials the fake server.
type fakeConnector struct {
	srv     *fakeServer
	minimal bool // connections implement no optional interface
}

func (c *fakeConnector) Connect(ctx context.Context) (driver.Conn, error) {
	c.srv.mu.Lock()
	c.srv.dials++
	pid := int64(1000 + c.srv.dials) // read under the lock: dials may be concurrent
	if len(c.srv.dialErrs) > 0 {
		err := c.srv.dialErrs[0]
		c.srv.dialErrs = c.srv.dialErrs[1:]
		c.srv.mu.Unlock()
		return nil, err
	}
	c.srv.mu.Unlock()
	c.srv.openConns.Add(1)
	fc := &fakeConn{srv: c.srv, pid: pid}
	if c.minimal {
		return &minimalConn{fc}, nil
	}
	return fc, nil
}
func (c *fakeConnector) Driver() driver.Driver { return fakeDriver{} }

type fakeDriver struct{}

func (fakeDriver) Open(string) (driver.Conn, error) { return nil, errors.New("use the connector") }

// fakeConn implements every optional interface.
type fakeConn struct {
	srv     *fakeServer
	pid     int64
	closed  bool
	broken  bool
	inTx    bool
	pending []string
	xid     int64
	resets  int
	aborted bool // pgAborts: an error aborted the open transaction
	gone    bool // step.kills: the server closed the session; the next use fails
}

// noticeGone is the driver's next use of a session the server closed.
func (c *fakeConn) noticeGone() error {
	if c.gone {
		c.broken = true
		return io.ErrUnexpectedEOF
	}
	return nil
}

func (c *fakeConn) Prepare(q string) (driver.Stmt, error) { return &fakeStmt{c: c, q: q}, nil }
func (c *fakeConn) PrepareContext(_ context.Context, q string) (driver.Stmt, error) {
	// A script under "PREPARE "+q fails the prepare itself (nothing runs).
	if st, ok := c.srv.next("PREPARE " + q); ok && st.err != nil {
		if st.closes {
			c.broken = true
		}
		return nil, st.err
	}
	return c.Prepare(q)
}
func (c *fakeConn) Close() error {
	if !c.closed {
		c.closed = true
		c.srv.openConns.Add(-1)
	}
	return nil
}
func (c *fakeConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}
func (c *fakeConn) BeginTx(ctx context.Context, _ driver.TxOptions) (driver.Tx, error) {
	if c.broken {
		return nil, driver.ErrBadConn
	}
	if st, ok := c.srv.next("BEGIN"); ok && st.err != nil {
		return nil, st.err
	}
	c.inTx, c.pending, c.xid, c.aborted = true, nil, 0, false
	return &fakeTx{c: c}, nil
}

// run is the server side of one statement.
func (c *fakeConn) run(ctx context.Context, q string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.aborted {
		return errInFailedTx
	}
	if c.broken {
		return driver.ErrBadConn
	}
	if err := c.noticeGone(); err != nil {
		return err
	}
	if !c.inTx && c.srv.semiSyncTimesOut && strings.HasPrefix(q, "INSERT INTO ") {
		c.srv.mu.Lock()
		c.srv.semiSyncOff = true // its wait timed out: the primary goes on without replicas
		c.srv.mu.Unlock()
	}
	if !c.inTx && c.srv.replicaFrozen && (strings.HasPrefix(q, "INSERT INTO ") || strings.HasPrefix(q, "DELETE FROM ")) &&
		!strings.HasSuffix(q, " WHERE 1=0") { // a DELETE of no row logs nothing, so it waits for no ACK
		<-ctx.Done() // waits for a replica's ACK that never comes
		c.broken = true
		return ctx.Err()
	}
	if strings.HasPrefix(q, "KILL ") {
		c.srv.mu.Lock()
		c.srv.mysqlKills = append(c.srv.mysqlKills, q)
		c.srv.oldSession = nil
		c.srv.mu.Unlock()
	}
	st, ok := c.srv.next(q)
	if ok && st.block {
		<-ctx.Done()
		return ctx.Err()
	}
	if ok && st.err != nil {
		if isConnErr(st.err) || st.closes {
			c.broken = true
		}
		c.gone = c.gone || st.kills
		if c.inTx && c.srv.pgAborts {
			c.aborted = true
		}
		if st.ran {
			c.apply(q)
		}
		return st.err
	}
	if c.srv.pgLife.owns(q) {
		return nil
	}
	if q == pgAskXID || q == pgAskXIDAndServer || q == pgAskXIDAndServerBare || q == "SELECT "+pgStartTime || q == pgNoProofLifeQuery || q == "SELECT txid_status($1)" ||
		q == pgStatusQuery || strings.HasPrefix(q, "SELECT pg_current_wal_flush_lsn()") || strings.Contains(q, "FROM pg_catalog.pg_stat_replication") {
		return nil
	}
	c.apply(q)
	return nil
}

// commitsByHand reports a statement that commits the open transaction.
func (s *fakeServer) commitsByHand(q string) bool {
	for _, p := range s.handCommits {
		if strings.HasPrefix(q, p) {
			return true
		}
	}
	return false
}

// errInFailedTx is PostgreSQL's answer to a statement after an error in
// the same transaction.
var errInFailedTx = &pgError{"25P02", "current transaction is aborted, commands ignored until end of transaction block"}

func isConnErr(err error) bool {
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, driver.ErrBadConn) || errors.Is(err, io.EOF)
}

func (c *fakeConn) apply(q string) {
	if c.inTx && c.srv.commitsByHand(q) {
		c.srv.mu.Lock()
		c.srv.ran = append(c.srv.ran, c.pending...)
		c.srv.ran = append(c.srv.ran, q)
		c.srv.committed++
		c.srv.mu.Unlock()
		c.setXID("committed")
		c.pending, c.xid = nil, 0
		return
	}
	if c.inTx {
		c.pending = append(c.pending, q)
		if c.xid == 0 && !strings.HasPrefix(q, "SELECT") && !strings.HasPrefix(q, "NOTIFY") { // NOTIFY takes no id
			c.srv.mu.Lock()
			c.srv.nextXID++
			c.xid = c.srv.nextXID
			c.srv.xidStatus[c.xid] = "in progress"
			c.srv.mu.Unlock()
		}
		return
	}
	c.srv.mu.Lock()
	c.srv.ran = append(c.srv.ran, q)
	c.srv.mu.Unlock()
}

func (c *fakeConn) ExecContext(ctx context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	q = fakeOwn(q)
	if q == "ERRSKIP" {
		return nil, driver.ErrSkip
	}
	if err := c.run(ctx, q); err != nil {
		return nil, err
	}
	if c.srv.onExec != nil {
		c.srv.onExec(c, q)
	}
	return driver.RowsAffected(1), nil
}

func (c *fakeConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	q = fakeOwn(q)
	if err := c.run(ctx, q); err != nil {
		return nil, err
	}
	if rows, ok := c.srv.pgLife.answer(c, q, args); ok {
		return rows, nil
	}
	if c.srv.onQuery != nil {
		if rows, ok := c.srv.onQuery(c, q, args); ok {
			return rows, nil
		}
	}
	switch q {
	case pgAskXID, pgAskXIDAndServer, pgAskXIDAndServerBare:
		var xid driver.Value // NULL: in recovery
		if !c.srv.inRecovery {
			if c.xid == 0 && strings.Contains(q, "txid_current()") { // it assigns one
				c.srv.mu.Lock()
				c.srv.nextXID++
				c.xid = c.srv.nextXID
				c.srv.xidStatus[c.xid] = "in progress"
				c.srv.mu.Unlock()
			}
			xid = c.xid
		}
		return &fakeRows{cols: []string{"xid", "pid", "start"}, data: [][]driver.Value{{xid, c.pid, fakeStart}}}, nil
	case "SELECT " + pgStartTime:
		return &fakeRows{cols: []string{"start"}, data: [][]driver.Value{{fakeStart}}}, nil
	case pgNoProofLifeQuery: // a primary that has run no recovery since it started
		return &fakeRows{cols: []string{"start", "in_recovery", "replay"}, data: [][]driver.Value{{fakeStart, false, nil}}}, nil
	case "SELECT txid_status($1)":
		xid := args[0].Value.(int64)
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		status := c.srv.xidStatus[xid]
		if status == "future" {
			return nil, &pgError{"22023", fmt.Sprintf("transaction ID %d is in the future", xid)}
		}
		return &fakeRows{cols: []string{"txid_status"}, data: [][]driver.Value{{status}}}, nil
	}
	// A MySQL-like default: the DSN's database is test, and the commit
	// marker table exists there (markerConnector in hardening_resolve_test.go
	// configures other layouts).
	switch {
	case q == "SELECT DATABASE()":
		return &fakeRows{cols: []string{"DATABASE()"}, data: [][]driver.Value{{"test"}}}, nil
	case q == "SELECT CONNECTION_ID()":
		return &fakeRows{cols: []string{"ID"}, data: [][]driver.Value{{int64(1)}}}, nil // the first row of the default answer, as before
	case strings.HasPrefix(q, "SELECT COUNT(*) FROM information_schema.TABLES"):
		return &fakeRows{cols: []string{"n"}, data: [][]driver.Value{{int64(1)}}}, nil
	case strings.HasPrefix(q, "SELECT DATA_TYPE, CHARACTER_OCTET_LENGTH FROM information_schema.COLUMNS"):
		return &fakeRows{cols: []string{"t", "n"}, data: [][]driver.Value{{"binary", int64(16)}}}, nil // as sqlretry creates it
	case q == markerColumnsQuery:
		return &fakeRows{cols: []string{"c", "n"}, data: [][]driver.Value{{int64(1), int64(0)}}}, nil // as sqlretry creates it
	case strings.HasPrefix(q, "SELECT ENGINE FROM information_schema.TABLES"):
		return &fakeRows{cols: []string{"e"}, data: [][]driver.Value{{"InnoDB"}}}, nil
	case strings.HasPrefix(q, "SELECT COUNT(*) FROM information_schema.TRIGGERS"):
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		return &fakeRows{cols: []string{"n"}, data: [][]driver.Value{{c.srv.markerTriggers}}}, nil
	}
	if q == "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?" {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		n := int64(0)
		if c.srv.oldSession != nil {
			n = 1
		}
		return &fakeRows{cols: []string{"n"}, data: [][]driver.Value{{n}}}, nil
	}
	if strings.HasPrefix(q, "SELECT COMMAND, STATE FROM information_schema.PROCESSLIST") {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		if b := c.srv.oldSession; b != nil {
			return &fakeRows{cols: []string{"COMMAND", "STATE"}, data: [][]driver.Value{{[]byte(b.state), []byte(b.waitEvent)}}, clobber: true}, nil
		}
		return &fakeRows{cols: []string{"COMMAND", "STATE"}}, nil
	}
	if strings.HasPrefix(q, "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('rpl_semi_sync") {
		v := "OFF"
		if c.srv.semiSync {
			v = "ON"
		}
		return &fakeRows{cols: []string{"Variable_name", "Value"}, data: [][]driver.Value{{[]byte("rpl_semi_sync_master_enabled"), []byte(v)}}, clobber: true}, nil
	}
	if strings.HasPrefix(q, "SHOW GLOBAL STATUS WHERE Variable_name IN ('Rpl_semi_sync") {
		v := "ON"
		if c.srv.semiSyncOff || !c.srv.semiSync {
			v = "OFF"
		}
		return &fakeRows{cols: []string{"Variable_name", "Value"}, data: [][]driver.Value{{[]byte("Rpl_semi_sync_master_status"), []byte(v)}}, clobber: true}, nil
	}
	if strings.HasPrefix(q, "SELECT token FROM ") && strings.Contains(q, " WHERE token >= '"+markerSentinelPrefix+"'") {
		// The sentinel rows the checks put in, since the table was last
		// emptied.
		table, _, _ := strings.Cut(strings.TrimPrefix(q, "SELECT token FROM "), " ")
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		prefix := strings.TrimSuffix(markerSentinelInsert(table, []byte(markerSentinelPrefix)), "')")
		for _, r := range c.srv.ran[c.srv.markerEmptiedAt:] {
			if strings.HasPrefix(r, prefix) {
				b, _ := hex.DecodeString(strings.TrimSuffix(strings.TrimPrefix(r, "INSERT IGNORE INTO "+table+" (token) VALUES (X'"), "')"))
				return &fakeRows{cols: []string{"token"}, data: [][]driver.Value{{b}}}, nil
			}
		}
		return &fakeRows{cols: []string{"token"}}, nil
	}
	if strings.HasPrefix(q, "SELECT COUNT(*), (SELECT COUNT(*) FROM ") && strings.HasSuffix(q, " WHERE token = ?") {
		// The marker: there once a transaction that inserted it committed;
		// the table's sentinel once the check put it in; both unless the
		// table was emptied since.
		table, _, _ := strings.Cut(strings.TrimPrefix(q, "SELECT COUNT(*), (SELECT COUNT(*) FROM "), " ")
		if q != markerLookup(table) || len(args) != 2 || !isBytes(args[0].Value) || !isBytes(args[1].Value) {
			return nil, fmt.Errorf("fake: unexpected marker lookup %q %v", q, args)
		}
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		if c.srv.emptyBeforeLookup {
			c.srv.markerEmptiedAt, c.srv.emptyBeforeLookup = len(c.srv.ran), false
			if c.srv.recreatedBy != nil {
				// Another db created the table again, with its sentinel.
				c.srv.ran = append(c.srv.ran, markerSentinelInsert(table, c.srv.recreatedBy))
			}
		}
		n, sentinel := int64(0), int64(0)
		for _, r := range c.srv.ran[c.srv.markerEmptiedAt:] {
			if strings.HasPrefix(r, "INSERT IGNORE INTO "+table+" ") && strings.Contains(r, hex.EncodeToString(args[0].Value.([]byte))) {
				sentinel = 1
			}
			if (strings.HasPrefix(r, "INSERT INTO "+table+" ") || strings.HasPrefix(r, "BEGIN NOT ATOMIC INSERT INTO "+table+" ")) &&
				strings.Contains(r, hex.EncodeToString(args[1].Value.([]byte))) {
				n = 1
			}
		}
		return &fakeRows{cols: []string{"n", "sentinel"}, data: [][]driver.Value{{n, sentinel}}}, nil
	}
	if q == pgStatusQuery {
		xid := args[0].Value.(int64)
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		b, holding := c.srv.oldBackend[xid]
		if c.srv.inflight[xid] > 0 && !holding {
			holding, b = true, fakeBackend{state: "idle in transaction"}
		}
		commit := c.srv.syncCommit
		if commit == "" {
			commit = "on"
		}
		var state driver.Value
		if holding {
			state = b.state
		}
		if c.srv.xidStatus[xid] == "future" { // a recovery that lost the id's record: no id handed out up to it yet
			return nil, &pgError{"22023", fmt.Sprintf("transaction ID %d is in the future", xid)}
		}
		return &fakeRows{cols: []string{"txid_status", "holding", "state", "names", "commit"},
			data: [][]driver.Value{{c.srv.xidStatus[xid], holding, state, c.srv.syncNames, commit}}}, nil
	}
	if q == pgProbeQuery && c.srv.standbyHidden {
		c.srv.mu.Lock()
		c.srv.replChecks++
		lag := c.srv.standbyLag
		c.srv.mu.Unlock()
		if lag < 0 {
			<-ctx.Done() // the probe's COMMIT waits in SyncRep
			c.broken = true
			return nil, ctx.Err()
		}
		return &fakeRows{cols: []string{"txid_current"}, data: [][]driver.Value{{int64(900)}}}, nil
	}
	if strings.HasPrefix(q, "SELECT pg_current_wal_flush_lsn()") {
		return &fakeRows{cols: []string{"lsn", "see"}, data: [][]driver.Value{{"0/3000148", !c.srv.standbyHidden}}}, nil
	}
	if strings.Contains(q, "FROM pg_catalog.pg_stat_replication") {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
		c.srv.replChecks++
		n := int64(0)
		if c.srv.standbyLag == 0 {
			n = int64(syncStandbysNeeded(c.srv.syncNames))
		} else if c.srv.standbyLag > 0 {
			c.srv.standbyLag--
		}
		return &fakeRows{cols: []string{"count"}, data: [][]driver.Value{{n}}}, nil
	}
	if strings.HasPrefix(q, "SELECT pg_terminate_backend") {
		if want := strings.Count(q, "$"); strings.Contains(q, "$3") && len(args) != want {
			// Like the server: "bind message supplies 2 parameters, but
			// prepared statement requires 3".
			return nil, &pgError{"08P01", fmt.Sprintf("bind message supplies %d parameters, but prepared statement requires %d", len(args), want)}
		}
		c.srv.mu.Lock()
		pid := args[0].Value.(int64)
		xid := args[1].Value.(int64)
		c.srv.killed = append(c.srv.killed, pid)
		if c.srv.inflight[xid] > 0 {
			c.srv.inflight[xid]--
		}
		if c.srv.inflight[xid] == 0 && c.srv.final[xid] != "" {
			c.srv.xidStatus[xid] = c.srv.final[xid]
		}
		c.srv.mu.Unlock()
		return &fakeRows{cols: []string{"ok"}, data: [][]driver.Value{{true}}}, nil
	}
	return &fakeRows{cols: []string{"n"}, data: [][]driver.Value{{int64(1)}, {int64(2)}}}, nil
}

func (c *fakeConn) Ping(context.Context) error {
	if c.broken {
		return driver.ErrBadConn
	}
	if err := c.noticeGone(); err != nil {
		return err
	}
	return nil
}
func (c *fakeConn) ResetSession(context.Context) error {
	c.resets++
	if c.broken {
		return driver.ErrBadConn
	}
	return nil
}
func (c *fakeConn) IsValid() bool { return !c.broken && !c.closed }
func (c *fakeConn) CheckNamedValue(nv *driver.NamedValue) error {
	if s, ok := nv.Value.(fmt.Stringer); ok {
		nv.Value = "checked:" + s.String()
		return nil
	}
	return driver.ErrSkip
}

type fakeTx struct{ c *fakeConn }

func (t *fakeTx) Commit() error {
	c := t.c
	if h := c.srv.hangCommit; h != nil {
		<-h // a silent network: the driver's COMMIT takes no context
	}
	c.inTx = false
	if c.aborted {
		c.aborted, c.pending = false, nil
		c.setXID("aborted")
		return errors.New(errTxCommitRollbackText) // pgx.ErrTxCommitRollback
	}
	st, _ := c.srv.next("COMMIT")
	if c.broken {
		return driver.ErrBadConn
	}
	if st.err != nil && !st.ran {
		if isConnErr(st.err) {
			c.broken = true
		}
		c.setXID("aborted")
		return st.err
	}
	c.srv.mu.Lock()
	c.srv.ran = append(c.srv.ran, c.pending...)
	c.srv.committed++
	c.srv.mu.Unlock()
	c.setXID("committed")
	if st.err != nil {
		c.broken = true
		return st.err
	}
	return nil
}

func (c *fakeConn) setXID(status string) {
	if c.xid == 0 {
		return
	}
	c.srv.mu.Lock()
	if c.srv.inflight[c.xid] > 0 {
		// The old backend is still finishing: txid_status says "in progress"
		// until it has been asked to end often enough.
		c.srv.final[c.xid] = status
	} else {
		c.srv.xidStatus[c.xid] = status
	}
	c.srv.mu.Unlock()
}

func (t *fakeTx) Rollback() error {
	if h := t.c.srv.hangCommit; h != nil {
		<-h
	}
	t.c.inTx, t.c.aborted = false, false
	t.c.pending = nil
	t.c.setXID("aborted")
	return t.c.noticeGone()
}

type fakeStmt struct {
	c *fakeConn
	q string
}

func (s *fakeStmt) Close() error  { return nil }
func (s *fakeStmt) NumInput() int { return -1 }
func (s *fakeStmt) Exec(args []driver.Value) (driver.Result, error) {
	return s.c.ExecContext(context.Background(), s.q, nil)
}
func (s *fakeStmt) Query(args []driver.Value) (driver.Rows, error) {
	return s.c.QueryContext(context.Background(), s.q, nil)
}
func (s *fakeStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if err := s.c.run(ctx, s.q); err != nil { // the prepared path never skips
		return nil, err
	}
	return driver.RowsAffected(1), nil
}
func (s *fakeStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	return s.c.QueryContext(ctx, s.q, args)
}

type fakeRows struct {
	cols    []string
	data    [][]driver.Value
	i       int
	nextErr error // returned after the data, instead of io.EOF
	sets    int   // further result sets
	clobber bool  // like go-sql-driver/mysql: a []byte handed out is overwritten by the next Next
	lent    [][]byte
}

func (r *fakeRows) Columns() []string { return r.cols }
func (r *fakeRows) Close() error      { return nil }
func (r *fakeRows) Next(dest []driver.Value) error {
	for _, b := range r.lent {
		for i := range b {
			b[i] = '#'
		}
	}
	r.lent = nil
	if r.clobber && r.i < len(r.data) {
		defer func() {
			for i, v := range dest {
				if b, ok := v.([]byte); ok {
					b = append([]byte(nil), b...)
					dest[i] = b
					r.lent = append(r.lent, b)
				}
			}
		}()
	}
	if r.i >= len(r.data) {
		if r.nextErr != nil {
			return r.nextErr
		}
		return io.EOF
	}
	copy(dest, r.data[r.i])
	r.i++
	return nil
}
func (r *fakeRows) HasNextResultSet() bool { return r.sets > 0 }
func (r *fakeRows) NextResultSet() error {
	if r.sets == 0 {
		return io.EOF
	}
	r.sets--
	r.i = 0
	return nil
}

// minimalConn hides every optional interface of fakeConn.
type minimalConn struct{ c *fakeConn }

func (m *minimalConn) Prepare(q string) (driver.Stmt, error) {
	return &minimalStmt{&fakeStmt{c: m.c, q: q}}, nil
}
func (m *minimalConn) Close() error              { return m.c.Close() }
func (m *minimalConn) Begin() (driver.Tx, error) { return m.c.Begin() }

type minimalStmt struct{ s *fakeStmt }

func (m *minimalStmt) Close() error                                 { return nil }
func (m *minimalStmt) NumInput() int                                { return -1 }
func (m *minimalStmt) Exec(a []driver.Value) (driver.Result, error) { return m.s.Exec(a) }
func (m *minimalStmt) Query(a []driver.Value) (driver.Rows, error)  { return m.s.Query(a) }

// testDB opens a *sql.DB through sqlretry on a fake server with a fake clock.
func testDB(t *testing.T, srv *fakeServer, opts ...Option) (*sql.DB, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	all := append([]Option{WithClock(clock), WithDialect(DialectPostgres)}, opts...)
	wc, err := WrapConnector(&fakeConnector{srv: srv}, all...)
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	return db, clock
}

func stats(t *testing.T, db *sql.DB) Stats {
	t.Helper()
	s, ok := StatsOf(db)
	if !ok {
		t.Fatal("StatsOf: not a sqlretry db")
	}
	return s
}

func isBytes(v any) bool { _, ok := v.([]byte); return ok }

// fakeOwn reads one of sqlretry's own MySQL statements as the fakes knew
// them before SET STATEMENT (mysqlOwnPrefix) and the process-list
// question: without the prefix, the question as SELECT CONNECTION_ID().
func fakeOwn(q string) string {
	q = strings.TrimPrefix(q, mysqlOwnPrefix)
	if strings.HasPrefix(q, "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%sqlretry-self-") {
		return "SELECT CONNECTION_ID()"
	}
	return q
}
