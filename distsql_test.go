package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/go-sql-driver/mysql"
)

// The distributed SQL engines' error shapes (issue 10, item 5). None of
// these servers could be installed here (README "Distributed SQL
// engines"), so no row below was captured from a live server: each
// code's class is taken from the source named in it, and these tests pin
// the classifier and the retry paths to what that source says. The
// messages are modelled on the documentation (only Vitess's 1105 is
// classified by its text); replace them by captured ones when a server is
// at hand.
type distsqlShape struct {
	engine string
	pg     string // SQLSTATE, for the pgwire engines
	num    uint16 // error number, for the MySQL-protocol engines
	state  string // SQLSTATE the MySQL-protocol engine sends with num
	msg    string
	want   Class  // classifyDefault's answer
	source string // where the shape comes from
}

func (s distsqlShape) err() error {
	if s.pg != "" {
		return &pgError{code: s.pg, msg: s.msg}
	}
	e := &mysql.MySQLError{Number: s.num, Message: s.msg}
	copy(e.SQLState[:], s.state)
	return e
}

func (s distsqlShape) String() string {
	if s.pg != "" {
		return s.engine + " " + s.pg
	}
	return fmt.Sprintf("%s %d", s.engine, s.num)
}

const (
	srcERRORS   = "shared/ERRORS.md"
	srcCRDBDocs = "CockroachDB docs: transaction retry error reference"
	srcCRDBGo   = "cockroach-go crdb.ExecuteTx (retries CR000, a legacy code, and 40001)"
	srcYBDocs   = "YugabyteDB docs: transaction error codes"
	srcTiDBDocs = "TiDB docs: error codes and troubleshooting"
	srcVitess   = "vitess v0.24.4 source: go/mysql/sqlerror/sql_error.go mapToSQLErrorFromErrorCode"
)

var distsqlShapes = []distsqlShape{
	// CockroachDB (pgwire).
	{engine: "CockroachDB", pg: "40001", msg: "restart transaction: TransactionRetryWithProtoRefreshError: WriteTooOldError: write for key /Table/104/1/1/0 at timestamp 1700000000.000000000,0 too old; must write at or above 1700000000.000000001,1", want: RetryStatement, source: srcCRDBDocs},
	{engine: "CockroachDB", pg: "40001", msg: "restart transaction: TransactionRetryWithProtoRefreshError: ReadWithinUncertaintyIntervalError: read at time 1700000000.000000000,0 encountered previous write with future timestamp", want: RetryStatement, source: srcCRDBDocs},
	{engine: "CockroachDB", pg: "CR000", msg: "restart transaction", want: RetryTransaction, source: srcCRDBGo},
	{engine: "CockroachDB", pg: "40003", msg: "result is ambiguous: error=rpc error: code = Unavailable desc = transport is closing", want: Ambiguous, source: srcCRDBDocs},
	{engine: "CockroachDB", pg: "57P01", msg: "server is shutting down", want: ConnectionLost, source: srcERRORS},
	// YugabyteDB (YSQL, pgwire).
	{engine: "YugabyteDB", pg: "40001", msg: "could not serialize access due to concurrent update", want: RetryStatement, source: srcYBDocs},
	{engine: "YugabyteDB", pg: "40001", msg: "Restart read required at: { read: { physical: 1700000000000000 } local_limit: { physical: 1700000000000500 } }", want: RetryStatement, source: srcYBDocs},
	{engine: "YugabyteDB", pg: "40P01", msg: "deadlock detected", want: RetryTransaction, source: srcYBDocs},
	// TiDB (MySQL protocol): the transaction was rolled back.
	{engine: "TiDB", num: 9007, state: "HY000", msg: "Write conflict, txnStartTS=450000000000000001, conflictStartTS=450000000000000002, conflictCommitTS=450000000000000003, key={tableID=104, handle=1} primary={tableID=104, handle=1} [try again later]", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 8002, state: "HY000", msg: "can not retry select for update statement", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 8005, state: "HY000", msg: "Write Conflict, txnStartTS is stale", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 8022, state: "HY000", msg: "Error: KV error safe to retry [try again later]", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 8028, state: "HY000", msg: "Information schema is changed during the execution of the statement(for example, table definition may be updated by other DDL ran in parallel). If you see this error often, try increasing `tidb_max_delta_schema_count`. [try again later]", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 8229, state: "HY000", msg: "TTL manager has timed out, pessimistic locks may expire, please commit or rollback this transaction", want: RetryTransaction, source: srcTiDBDocs},
	{engine: "TiDB", num: 1213, state: "40001", msg: "Deadlock found when trying to get lock; try restarting transaction", want: RetryTransaction, source: srcTiDBDocs},
	// TiDB: only the statement waited too long (pessimistic mode).
	{engine: "TiDB", num: 1205, state: "HY000", msg: "Lock wait timeout exceeded; try restarting transaction", want: RetryStatement, source: srcTiDBDocs},
	// TiDB: storage or placement unavailable.
	{engine: "TiDB", num: 9001, state: "HY000", msg: "PD server timeout", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 9002, state: "HY000", msg: "TiKV server timeout", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 9003, state: "HY000", msg: "TiKV server is busy", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 9004, state: "HY000", msg: "Resolve lock timeout", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 9005, state: "HY000", msg: "Region is unavailable", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 9008, state: "HY000", msg: "Too many pending tasks, please try again later", want: Unavailable, source: srcERRORS},
	{engine: "TiDB", num: 8027, state: "HY000", msg: "Information schema is out of date: schema failed to update in 1 lease, please make sure TiDB can connect to TiKV", want: Unavailable, source: srcTiDBDocs},
	{engine: "TiDB", num: 8120, state: "HY000", msg: "Start tso is not ready", want: Unavailable, source: srcERRORS},
	{engine: "TiDB", num: 8252, state: "HY000", msg: "Exceeded resource group quota limitation", want: Unavailable, source: srcERRORS},
	// TiDB: never retried.
	{engine: "TiDB", num: 8004, state: "HY000", msg: "Transaction is too large, size: 104857600", want: Permanent, source: srcTiDBDocs},
	{engine: "TiDB", num: 8001, state: "HY000", msg: "Out Of Memory Quota!", want: Permanent, source: srcTiDBDocs},
	{engine: "TiDB", num: 9006, state: "HY000", msg: "GC life time is shorter than transaction duration", want: Permanent, source: srcTiDBDocs},
	{engine: "TiDB", num: 9500, state: "HY000", msg: "Transaction is too large", want: Permanent, source: srcERRORS},
	{engine: "TiDB", num: 8175, state: "HY000", msg: "Your query has been cancelled due to exceeding the allowed memory limit for a single SQL query", want: Permanent, source: srcERRORS},
	{engine: "TiDB", num: 8176, state: "HY000", msg: "Your query has been cancelled due to exceeding the allowed memory limit for the tidb-server instance", want: Permanent, source: srcERRORS},
	{engine: "TiDB", num: 8055, state: "HY000", msg: "snapshot is older than GC safe point", want: Permanent, source: srcERRORS},
	// Vitess (vtgate, MySQL protocol). UNAVAILABLE and CLUSTER_EVENT have
	// no MySQL number of their own: vtgate sends 1105 HY000 with the
	// vtrpc text; RESOURCE_EXHAUSTED becomes 1203 42000.
	{engine: "Vitess", num: 1105, state: "HY000", msg: "target: commerce.0.primary: primary is not serving, there may be a reparent operation in progress", want: Unavailable, source: srcVitess},
	{engine: "Vitess", num: 1105, state: "HY000", msg: "no healthy tablet available for 'keyspace:\"commerce\" shard:\"0\" tablet_type:PRIMARY'", want: Unavailable, source: srcVitess},
	{engine: "Vitess", num: 1105, state: "HY000", msg: "target: commerce.0.primary: vttablet: rpc error: code = Unavailable desc = connection error: desc = \"transport: Error while dialing: dial tcp 127.0.0.1:15991: connect: connection refused\"", want: Unavailable, source: srcVitess},
	{engine: "Vitess", num: 1203, state: "42000", msg: "target: commerce.0.primary: vttablet: rpc error: code = ResourceExhausted desc = transaction pool connection limit exceeded", want: Unavailable, source: srcVitess},
	{engine: "Vitess", num: 1105, state: "HY000", msg: "target: commerce.0.primary: vttablet: rpc error: code = Unavailable desc = transaction pool connection limit exceeded", want: Unavailable, source: srcERRORS},
	{engine: "Vitess", num: 1105, state: "HY000", msg: "VT12001: unsupported: this construct is not supported", want: Permanent, source: srcVitess},
}

// Every documented shape gets the class shared/ERRORS.md gives it, at
// connect time and answered for a statement alike.
func TestDistSQLShapesClassify(t *testing.T) {
	for _, s := range distsqlShapes {
		if got := classifyDefault(s.err()); got != s.want {
			t.Errorf("%v %q (%s): class %v, want %v", s, s.msg, s.source, got, s.want)
		}
		if got := classify(nil, s.err()); got != s.want {
			t.Errorf("%v %q answered for a statement: class %v, want %v", s, s.msg, got, s.want)
		}
	}
}

// sessionNumber: a MySQL number that may also mean "this session ended or
// was refused" (answered.go); on a session that still answers, sqlretry
// takes it as the statement's own error. See
// TestDistSQLVitessPoolLimitOnALiveSession.
func (s distsqlShape) sessionNumber() bool { return s.pg == "" && mysqlSessionNumber(s.num) }

func distsqlDialect(s distsqlShape) Dialect {
	if s.pg != "" {
		return DialectPostgres
	}
	return DialectMySQL
}

// Each engine's "transaction aborted, run it again" shapes, raised by a
// statement or by COMMIT (TiDB's optimistic write conflicts and
// CockroachDB's restarts come at COMMIT): RunInTx runs the closure again
// and the work commits exactly once.
func TestDistSQLRunInTxReplaysAbortedTransactions(t *testing.T) {
	for _, s := range distsqlShapes {
		if s.want != RetryTransaction && s.want != RetryStatement && s.want != Unavailable || s.sessionNumber() {
			continue
		}
		for _, where := range []string{"UPDATE", "COMMIT"} {
			if where == "COMMIT" && s.want == Unavailable && s.engine == "TiDB" {
				// TiDB sends these for reads and writes; what COMMIT's
				// failure leaves unknown is the rule-2 case.
				continue
			}
			t.Run(fmt.Sprintf("%v at %s", s, where), func(t *testing.T) {
				srv := newFakeServer()
				srv.script(where, step{err: s.err()})
				db, clock := testDB(t, srv, WithDialect(distsqlDialect(s)))
				calls := 0
				err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
					return err
				})
				if err != nil {
					t.Fatalf("RunInTx: %v", err)
				}
				if calls != 2 {
					t.Errorf("closure ran %d times, want 2", calls)
				}
				if srv.committed != 1 || srv.ranCount("UPDATE") != 1 {
					t.Errorf("committed=%d, UPDATE ran %d times; want exactly once", srv.committed, srv.ranCount("UPDATE"))
				}
				if n := len(clock.Sleeps()); n != 1 {
					t.Errorf("sleeps = %d, want 1 (a backoff before the replay)", n)
				}
			})
		}
	}
}

// An autocommit statement that the engine rolled back (or never ran, the
// storage being unavailable) is run again: it took effect once.
func TestDistSQLAutocommitStatementIsRunAgain(t *testing.T) {
	for _, s := range distsqlShapes {
		if s.want != RetryTransaction && s.want != RetryStatement && s.want != Unavailable || s.sessionNumber() {
			continue
		}
		t.Run(s.String(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: s.err()})
			db, clock := testDB(t, srv, WithDialect(distsqlDialect(s)))
			if _, err := db.Exec("UPDATE t SET n = n + 1"); err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if n := srv.ranCount("UPDATE"); n != 1 {
				t.Errorf("UPDATE took effect %d times, want 1", n)
			}
			if n := len(clock.Sleeps()); n != 1 {
				t.Errorf("sleeps = %d, want 1", n)
			}
		})
	}
}

// CockroachDB's "result is ambiguous" for a write is never run again: the
// caller gets ErrAmbiguousCommit with the server's error inside.
func TestDistSQLAmbiguousResultIsNotRunAgain(t *testing.T) {
	for _, s := range distsqlShapes {
		if s.want != Ambiguous {
			continue
		}
		t.Run(s.String(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("INSERT", step{err: s.err(), ran: true})
			db, _ := testDB(t, srv, WithDialect(distsqlDialect(s)))
			_, err := db.Exec("INSERT INTO ledger VALUES (42)")
			if !errors.Is(err, ErrAmbiguousCommit) {
				t.Fatalf("err = %v, want ErrAmbiguousCommit", err)
			}
			var pe *pgError
			if !errors.As(err, &pe) || pe.code != s.pg {
				t.Errorf("err = %v does not carry the server's %s", err, s.pg)
			}
			if n := srv.ranCount("INSERT"); n != 1 {
				t.Errorf("INSERT ran %d times, want exactly 1", n)
			}
		})
	}
}

// A draining CockroachDB node ends the session (57P01): a read is run
// again on a new connection.
func TestDistSQLDrainingNodeReadIsRunAgainElsewhere(t *testing.T) {
	for _, s := range distsqlShapes {
		if s.want != ConnectionLost {
			continue
		}
		t.Run(s.String(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("SELECT", step{err: s.err(), closes: true})
			db, _ := testDB(t, srv, WithDialect(distsqlDialect(s)))
			var n int
			if err := db.QueryRow("SELECT 1").Scan(&n); err != nil {
				t.Fatalf("QueryRow: %v", err)
			}
			if srv.dials != 2 {
				t.Errorf("dials = %d, want 2 (the read ran again on a new connection)", srv.dials)
			}
		})
	}
}

// The engines' permanent errors come back unchanged, at once.
func TestDistSQLPermanentErrorsAreNotRetried(t *testing.T) {
	for _, s := range distsqlShapes {
		if s.want != Permanent {
			continue
		}
		t.Run(s.String(), func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: s.err()})
			db, clock := testDB(t, srv, WithDialect(distsqlDialect(s)))
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
				return err
			})
			var me *mysql.MySQLError
			if !errors.As(err, &me) || me.Number != s.num {
				t.Fatalf("err = %v, want the server's %d", err, s.num)
			}
			if calls != 1 || len(clock.Sleeps()) != 0 {
				t.Errorf("closure ran %d times after %d sleeps, want once and none", calls, len(clock.Sleeps()))
			}
		})
	}
}

// Vitess reports a full transaction pool as 1203 (ER_TOO_MANY_USER_CONNECTIONS)
// on a vtgate session that stays open (vitess v0.24.4,
// demuxResourceExhaustedErrors). sqlretry reads 1203 as "session refused"
// only when the session is gone (answered.go: a statement on a live
// session can SIGNAL any number), so today this shape comes back to the
// caller unretried, although shared/ERRORS.md files "transaction pool
// connection limit" under C. This test pins today's behaviour, from
// vitess's source and not from a live vtgate; change it with the
// classifier if a live vtgate shows the rule should differ.
func TestDistSQLVitessPoolLimitOnALiveSession(t *testing.T) {
	var s distsqlShape
	for _, x := range distsqlShapes {
		if x.engine == "Vitess" && x.num == 1203 {
			s = x
		}
	}
	srv := newFakeServer()
	srv.script("UPDATE", step{err: s.err()})
	db, clock := testDB(t, srv, WithDialect(DialectMySQL))
	_, err := db.Exec("UPDATE t SET n = n + 1")
	var me *mysql.MySQLError
	if !errors.As(err, &me) || me.Number != 1203 {
		t.Fatalf("err = %v, want vtgate's 1203 returned", err)
	}
	if n := len(clock.Sleeps()); n != 0 {
		t.Errorf("sleeps = %d, want 0 (answered on a live session: the statement's error)", n)
	}
	if srv.dials != 1 {
		t.Errorf("dials = %d, want 1", srv.dials)
	}

	// The README's advice: a rule of the caller's own takes it as
	// unavailable, and the statement runs again.
	pool := func(err error) (Class, bool) {
		var me *mysql.MySQLError
		if errors.As(err, &me) && me.Number == 1203 && strings.Contains(me.Message, "transaction pool connection limit") {
			return Unavailable, true
		}
		return 0, false
	}
	srv = newFakeServer()
	srv.script("UPDATE", step{err: s.err()})
	db, clock = testDB(t, srv, WithDialect(DialectMySQL), WithClassifier(pool))
	if _, err := db.Exec("UPDATE t SET n = n + 1"); err != nil {
		t.Fatalf("with the rule: %v", err)
	}
	if n := srv.ranCount("UPDATE"); n != 1 || len(clock.Sleeps()) != 1 {
		t.Errorf("with the rule: UPDATE took effect %d times after %d sleeps, want 1 after 1", n, len(clock.Sleeps()))
	}
}

// capturedShapes reads testdata/distsql/<name>.tsv: error shapes captured
// from a live server (the file's header says which and how).
func capturedShapes(t *testing.T, name string) []distsqlShape {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "distsql", name+".tsv"))
	if err != nil {
		t.Fatal(err)
	}
	classes := map[string]Class{"RetryStatement": RetryStatement, "RetryTransaction": RetryTransaction,
		"Unavailable": Unavailable, "ConnectionLost": ConnectionLost, "Ambiguous": Ambiguous, "Permanent": Permanent}
	var out []distsqlShape
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.SplitN(line, "\t", 5)
		if len(f) != 5 {
			t.Fatalf("%s.tsv: bad line %q", name, line)
		}
		n, err := strconv.ParseUint(f[1], 10, 16)
		c, ok := classes[f[3]]
		if err != nil || !ok {
			t.Fatalf("%s.tsv: bad line %q", name, line)
		}
		out = append(out, distsqlShape{engine: name + " " + f[0], num: uint16(n), state: f[2], msg: f[4], want: c, source: "captured"})
	}
	if len(out) == 0 {
		t.Fatalf("%s.tsv: no shapes", name)
	}
	return out
}

// Vitess's real error shapes, captured from vtgate (testdata header),
// replayed through the classifier and, for the retryable ones, through
// RunInTx and an autocommit statement on the fake driver.
func TestDistSQLCapturedVitessShapes(t *testing.T) {
	for _, s := range capturedShapes(t, "vitess") {
		if got := classifyDefault(s.err()); got != s.want {
			t.Errorf("%s %d %q: class %v, want %v", s.engine, s.num, s.msg, got, s.want)
		}
		if got := classify(nil, s.err()); got != s.want {
			t.Errorf("%s %d answered for a statement: class %v, want %v", s.engine, s.num, got, s.want)
		}
		t.Run(s.engine, func(t *testing.T) {
			srv := newFakeServer()
			srv.script("UPDATE", step{err: s.err()})
			db, _ := testDB(t, srv, WithDialect(DialectMySQL))
			calls := 0
			err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
				return err
			})
			switch s.want {
			case RetryTransaction, RetryStatement:
				if err != nil || calls != 2 || srv.committed != 1 {
					t.Errorf("RunInTx: err=%v calls=%d committed=%d; want one replay, one commit", err, calls, srv.committed)
				}
			case Permanent:
				var me *mysql.MySQLError
				if !errors.As(err, &me) || me.Number != s.num || calls != 1 {
					t.Errorf("RunInTx: err=%v calls=%d; want vtgate's %d after one run", err, calls, s.num)
				}
			}
		})
	}
}

// vttablet ends a transaction that outlives its transaction timeout and
// vtgate then answers the transaction's COMMIT with success, committing
// nothing (seen on a live vtgate, README "Distributed SQL engines"). The
// 1317 it sends for the next statement is the transaction's end, not a
// statement's interruption: a closure that swallows it must not get a
// success from RunInTx; the transaction is run again.
func TestDistSQLVitessEndedTransactionIsReplayed(t *testing.T) {
	var ended distsqlShape
	for _, s := range capturedShapes(t, "vitess") {
		if s.num == 1317 {
			ended = s
		}
	}
	srv := newFakeServer()
	srv.script("UPDATE t SET n = n + 1 WHERE id = 1", step{err: ended.err()})
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	calls := 0
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 100 WHERE id = 2"); err != nil {
			return err
		}
		_, _ = tx.ExecContext(ctx, "UPDATE t SET n = n + 1 WHERE id = 1") // swallowed
		return nil
	})
	if err != nil {
		t.Fatalf("RunInTx: %v", err)
	}
	if calls != 2 {
		t.Errorf("closure ran %d times, want 2 (the ended transaction replayed)", calls)
	}
	if srv.committed != 1 {
		t.Errorf("committed %d transactions, want 1 (the replay)", srv.committed)
	}
}
