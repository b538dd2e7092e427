package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// The first operations on a fresh db on a private 3-node Galera cluster,
// over and over (the lost ack of TestGaleraCommitMarker, "conflicts, no
// node killed", was a worker's first operation): a diagnostic run by hand,
//
//	SQLRETRY_GALERA_FIRSTOPS=200 CI=true go test -run TestGaleraFirstOperations -v .
//
// First what a Galera node does, which the marker relies on: a block whose
// INSERT fails leaves the transaction open; a transaction BF-aborted while
// idle fails the next statement with 1213, and one BF-aborted while a
// result streams gets the rows, then 1213 (at Next or at Close); either
// way the session is in autocommit afterwards, where a block would commit
// its marker alone. Then SQLRETRY_GALERA_FIRSTOPS repetitions: a fresh
// database (so the marker table is created again), 8 workers through the
// endpoints connector for 1 s, a causal check; on a wrong outcome the
// nodes' general logs and error logs are kept in /tmp/galera_firstops_<db>.
// A run that takes 5 s past its end dumps the nodes' process lists.
func TestGaleraFirstOperations(t *testing.T) {
	reps, err := strconv.Atoi(os.Getenv("SQLRETRY_GALERA_FIRSTOPS"))
	if err != nil {
		t.Skip("SQLRETRY_GALERA_FIRSTOPS (repetitions) not set")
	}
	g, err := dbserver.StartGalera()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(g.Stop)
	ctx := context.Background()
	t.Run("block with a failing INSERT on a Galera node", func(t *testing.T) {
		for i, n := range g.Nodes {
			db, err := sql.Open("mysql", n.DSN)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			tbl := fmt.Sprintf("probe_t%d", i)
			mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int)")
			mustExec(t, db, "INSERT INTO "+tbl+" VALUES (1, 0)")
			sc, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range []string{"START TRANSACTION", "UPDATE " + tbl + " SET n = n + 1"} {
				if _, err := sc.ExecContext(ctx, q); err != nil {
					t.Fatal(err)
				}
			}
			_, berr := sc.ExecContext(ctx, "BEGIN NOT ATOMIC INSERT INTO probe_missing (token) VALUES (X'00'); COMMIT; END")
			var open int
			oerr := sc.QueryRowContext(ctx, "SELECT @@in_transaction").Scan(&open)
			_, cerr := sc.ExecContext(ctx, "COMMIT")
			sc.Close()
			var v int
			if err := db.QueryRowContext(ctx, "SELECT n FROM "+tbl).Scan(&v); err != nil {
				t.Fatal(err)
			}
			t.Logf("node %d: block err=%v; in_transaction=%d (%v); COMMIT err=%v; n=%d (1: committed)", i, berr, open, oerr, cerr, v)
			if mysqlNumberOf(berr) != 1146 || open != 1 || cerr != nil || v != 1 {
				t.Errorf("want the block's 1146 with the transaction still open, and COMMIT committing it")
			}
		}
	})
	for _, closeFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("BF abort while idle, statement closed after it %v", closeFirst), func(t *testing.T) {
			galeraAbortedWhileIdle(t, g, closeFirst)
		})
	}
	t.Run("BF abort while a result streams", func(t *testing.T) { galeraAbortedWhileStreaming(t, g) })
	causalAdmin, err := sql.Open("mysql", g.Nodes[2].DSN+"?wsrep_sync_wait=1")
	if err != nil {
		t.Fatal(err)
	}
	defer causalAdmin.Close()
	var logs []string
	for i, n := range g.Nodes {
		ndb, err := sql.Open("mysql", n.RootDSN)
		if err != nil {
			t.Fatal(err)
		}
		var dd, el string
		if err := ndb.QueryRow("SELECT @@datadir, @@log_error").Scan(&dd, &el); err != nil {
			t.Fatal(err)
		}
		gl := fmt.Sprintf("%s/general-%d.log", dd, i)
		mustExec(t, ndb, "SET GLOBAL general_log_file = '"+gl+"'")
		mustExec(t, ndb, "SET GLOBAL log_output = 'FILE'")
		mustExec(t, ndb, "SET GLOBAL general_log = 1")
		logs = append(logs, gl, el)
		ndb.Close()
	}
	keep := func(dir string) {
		os.MkdirAll(dir, 0o755)
		for _, l := range logs {
			b, _ := os.ReadFile(l)
			os.WriteFile(dir+"/"+strings.ReplaceAll(strings.TrimPrefix(l, "/"), "/", "_"), b, 0o644)
		}
	}
	workers := 8
	if w, _ := strconv.Atoi(os.Getenv("SQLRETRY_GALERA_FIRSTOPS_WORKERS")); w > 0 {
		workers = w
	}
	dur := time.Second
	lost, offs, connIDAborts := 0, 0, 0
	for rep := range reps {
		name := fmt.Sprintf("firstops%d", rand.Uint32())
		mustExec(t, causalAdmin, "CREATE DATABASE "+name)
		dsn := func(i int) string { return g.Nodes[i].RootDSN + name }
		admin, err := sql.Open("mysql", dsn(2))
		if err != nil {
			t.Fatal(err)
		}
		causal, err := sql.Open("mysql", dsn(2)+"?wsrep_sync_wait=1")
		if err != nil {
			t.Fatal(err)
		}
		bank, err := workload.NewBank(ctx, admin, "mysql", "b", 4)
		if err != nil {
			t.Fatal(err)
		}
		galeraSync(t, g)
		ec, err := sqlretry.NewEndpointsConnector(firstOpsConnectors(t, g, name), sqlretry.WithEndpointChoice(sqlretry.Spread))
		if err != nil {
			t.Fatal(err)
		}
		log := &timedLog{start: time.Now()}
		db := sqlretry.OpenDB(ec, sqlretry.WithObserver(log))
		db.SetMaxOpenConns(workers)
		db.SetMaxIdleConns(workers)
		runDone := make(chan struct{})
		var stallDump []string
		go func() {
			select {
			case <-runDone:
				return
			case <-time.After(dur + 5*time.Second):
			}
			for i := range g.Nodes {
				ndb, _ := sql.Open("mysql", g.Nodes[i].RootDSN)
				r, err := ndb.Query("SELECT ID, COMMAND, TIME, STATE, LEFT(COALESCE(INFO, ''), 120) FROM information_schema.PROCESSLIST WHERE COMMAND <> 'Sleep'")
				if err == nil {
					for r.Next() {
						var id, tm int64
						var cmd, st, info string
						_ = r.Scan(&id, &cmd, &tm, &st, &info)
						stallDump = append(stallDump, fmt.Sprintf("node %d: id=%d %s %ds state=%q %q", i, id, cmd, tm, st, info))
					}
					r.Close()
				}
				ndb.Close()
			}
		}()
		res := workload.Run(ctx, workload.Config{Workers: workers, Duration: dur, OpTimeout: 20 * time.Second}, bank, db, workload.RunInTx)
		close(runDone)
		for _, l := range stallDump {
			t.Logf("  STALL %s", l)
		}
		inv, err := bank.Check(ctx, causal, res)
		if err != nil {
			t.Fatal(err)
		}
		nOff := 0
		for _, e := range log.all() {
			if e.e.Err != nil && strings.Contains(e.e.Err.Error(), "asking for the connection id") {
				connIDAborts++
			}
			if e.e.Kind == sqlretry.EventResolutionOff {
				nOff++
				t.Logf("rep %d: EventResolutionOff at +%v: %v", rep, e.at.Round(time.Millisecond), e.e.Err)
			}
		}
		if nOff > 0 {
			offs++
		}
		if !inv.OK() || res.Failed != 0 {
			lost++
			t.Errorf("rep %d db %s: committed %d failed %d %v; %v", rep, name, res.Committed, res.Failed, res.Errors, inv)
			for _, e := range log.all() {
				t.Logf("  +%v %v op=%s att=%d class=%v outcome=%v reason=%q err=%v", e.at.Round(time.Microsecond), e.e.Kind, e.e.Op, e.e.Attempt, e.e.Class, e.e.Outcome, e.e.Reason, e.e.Err)
			}
			var rows []string
			r, err := causal.QueryContext(ctx, "SELECT op, src, dst, amount FROM b_ledger ORDER BY op")
			if err == nil {
				for r.Next() {
					var op string
					var s, d, a int
					_ = r.Scan(&op, &s, &d, &a)
					rows = append(rows, fmt.Sprintf("%s:%d->%d:%d", op, s, d, a))
				}
				r.Close()
			}
			t.Logf("  ledger: %s", strings.Join(rows, " "))
			dir := fmt.Sprintf("/tmp/galera_firstops_%s", name)
			keep(dir)
			t.Logf("  logs kept in %s", dir)
			for i := range g.Nodes {
				ndb, _ := sql.Open("mysql", dsn(i)+"?wsrep_sync_wait=1")
				var cnt, mk int
				e1 := ndb.QueryRowContext(ctx, "SELECT COUNT(*) FROM b_ledger").Scan(&cnt)
				e2 := ndb.QueryRowContext(ctx, "SELECT COUNT(*) FROM sqlretry_commit_marker").Scan(&mk)
				t.Logf("  node %d: ledger rows %d (%v), marker rows %d (%v)", i, cnt, e1, mk, e2)
				ndb.Close()
			}
		} else if rep%10 == 0 || nOff > 0 {
			t.Logf("rep %d: committed %d, resolution-off events %d; %v", rep, res.Committed, nOff, inv)
		}
		db.Close()
		admin.Close()
		causal.Close()
		_, _ = causalAdmin.Exec("DROP DATABASE " + name)
		if inv.Lost > 0 {
			break
		}
	}
	t.Logf("FIGURES galera/first operations: %d reps of %d workers, %d with a wrong outcome, %d with the marker turned off, %d transactions aborted at SELECT CONNECTION_ID() (replayed)", reps, workers, lost, offs, connIDAborts)
}

func firstOpsConnectors(t *testing.T, g *dbserver.Galera, dbname string) []driver.Connector {
	var cs []driver.Connector
	for _, n := range g.Nodes {
		cfg, err := mysql.ParseDSN(n.RootDSN + dbname + "?timeout=3s")
		if err != nil {
			t.Fatal(err)
		}
		c, err := mysql.NewConnector(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	return cs
}

type timedEvent struct {
	at time.Duration
	e  sqlretry.Event
}

type timedLog struct {
	start time.Time
	mu    sync.Mutex
	ev    []timedEvent
}

func (l *timedLog) Observe(_ context.Context, e sqlretry.Event) {
	l.mu.Lock()
	l.ev = append(l.ev, timedEvent{time.Since(l.start), e})
	l.mu.Unlock()
}

func (l *timedLog) all() []timedEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]timedEvent(nil), l.ev...)
}

// A transaction BF-aborted while idle (by a conflicting write on another
// node): the next statement fails with 1213, also when the first command
// after the abort is the close of a prepared statement, which has no reply.
func galeraAbortedWhileIdle(t *testing.T, g *dbserver.Galera, closeAfter bool) {
	ctx := context.Background()
	n1, err := sql.Open("mysql", g.Nodes[1].DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer n1.Close()
	n0, err := sql.Open("mysql", g.Nodes[0].DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer n0.Close()
	tbl, mk := fmt.Sprintf("sw_t%d", rand.Uint32()), fmt.Sprintf("sw_m%d", rand.Uint32())
	mustExec(t, n1, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int)")
	mustExec(t, n1, "CREATE TABLE "+mk+" (token int PRIMARY KEY)")
	mustExec(t, n1, "INSERT INTO "+tbl+" VALUES (1, 0)")
	galeraSync(t, g)
	tx, err := n1.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	st, err := tx.PrepareContext(ctx, "UPDATE "+tbl+" SET n = n + ? WHERE id = ?")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.ExecContext(ctx, 1, 1); err != nil {
		t.Fatal(err)
	}
	if !closeAfter {
		st.Close()
	}
	// The conflicting write on node 0 BF-aborts the idle transaction on
	// node 1 when it is applied there.
	mustExec(t, n0, "UPDATE "+tbl+" SET n = n + 10 WHERE id = 1")
	galeraSync(t, g)
	time.Sleep(200 * time.Millisecond)
	if closeAfter {
		st.Close() // COM_STMT_CLOSE: no reply
	}
	var id int64
	var inTx int
	qerr := tx.QueryRowContext(ctx, "SELECT CONNECTION_ID(), @@in_transaction").Scan(&id, &inTx)
	_, berr := tx.ExecContext(ctx, "BEGIN NOT ATOMIC INSERT INTO "+mk+" VALUES (1); COMMIT; END")
	var n, m int
	n0.QueryRowContext(ctx, "SELECT n FROM "+tbl).Scan(&n)
	n1.QueryRowContext(ctx, "SELECT COUNT(*) FROM "+mk).Scan(&m)
	t.Logf("close after the abort=%v: next query err=%v (in_transaction=%d); block err=%v; n=%d (11: the tx committed, 10: not); marker rows=%d", closeAfter, qerr, inTx, berr, n, m)
	if mysqlNumberOf(qerr) != 1213 {
		t.Errorf("the statement after the abort: %v, want 1213", qerr)
	}
}

// A transaction BF-aborted while its SELECT's result streams: the rows
// come, then the error, which the driver reports at Next or Close.
func galeraAbortedWhileStreaming(t *testing.T, g *dbserver.Galera) {
	ctx := context.Background()
	n1, _ := sql.Open("mysql", g.Nodes[1].DSN)
	defer n1.Close()
	n0, _ := sql.Open("mysql", g.Nodes[0].DSN)
	defer n0.Close()
	tbl := fmt.Sprintf("ar_t%d", rand.Uint32())
	mustExec(t, n1, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int)")
	mustExec(t, n1, "INSERT INTO "+tbl+" VALUES (1, 0)")
	galeraSync(t, g)
	tx, err := n1.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	rows, err := tx.QueryContext(ctx, "SELECT CONNECTION_ID() FROM seq_1_to_20000000")
	if err != nil {
		t.Fatal(err)
	}
	var id int64
	rows.Next()
	rows.Scan(&id)
	mustExec(t, n0, "UPDATE "+tbl+" SET n = n + 10 WHERE id = 1")
	galeraSync(t, g)
	time.Sleep(200 * time.Millisecond)
	n := 1
	for rows.Next() {
		n++
	}
	rerr, cerr := rows.Err(), rows.Close()
	t.Logf("rows read %d, rows.Err()=%v, Close=%v", n, rerr, cerr)
	var inTx int
	qerr := tx.QueryRowContext(ctx, "SELECT @@in_transaction").Scan(&inTx)
	var v int
	n0.QueryRowContext(ctx, "SELECT n FROM "+tbl).Scan(&v)
	t.Logf("next query err=%v in_transaction=%d; n=%d (10: the transaction was rolled back)", qerr, inTx, v)
	if mysqlNumberOf(rerr) != 1213 && mysqlNumberOf(cerr) != 1213 || qerr != nil || inTx != 0 || v != 10 {
		t.Errorf("want the rows, then 1213, the transaction rolled back and the session in autocommit")
	}
}

func mysqlNumberOf(err error) uint16 {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return me.Number
	}
	return 0
}
