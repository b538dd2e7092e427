package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// errCertification is what a Galera node answers when a transaction loses
// certification or is aborted by a replicated one (also a plain deadlock).
var errCertification = &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock; try restarting transaction"}

// A deadlock (a Galera certification failure) at sqlretry's own marker
// INSERT before COMMIT is the same as one at COMMIT: the server rolled the
// transaction back, so RunInTx replays it, and a BeginTx caller gets the
// retryable class to replay it itself. Never a final error.
func TestMarkerInsertDeadlockReplays(t *testing.T) {
	for _, at := range []string{"INSERT INTO `test`.`m`"} {
		t.Run("RunInTx/"+at, func(t *testing.T) {
			srv := newFakeServer()
			srv.script(at, step{err: errCertification})
			db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
			calls, err := insertOnce(db, nil, "INSERT INTO t VALUES (1)")
			if err != nil || calls != 2 {
				t.Fatalf("err=%v calls=%d; want the transaction replayed once and committed", err, calls)
			}
			if n := srv.ranCount("INSERT INTO t "); n != 1 {
				t.Fatalf("committed %d times; want once", n)
			}
		})
	}
	t.Run("BeginTx", func(t *testing.T) {
		srv := newFakeServer()
		srv.script("INSERT INTO `test`.`m`", step{err: errCertification})
		db := markerDB(t, &markerConnector{fakeConnector: fakeConnector{srv: srv}, database: "test", tableExists: true}, WithMySQLCommitMarker("m"))
		commitIsRetryableCertification(t, db, srv)
	})
}

// commitIsRetryableCertification runs one INSERT in a transaction of db's
// by hand and wants its Commit to fail with the retryable class and the
// server's 1213, and the write never to commit.
func commitIsRetryableCertification(t *testing.T, db *sql.DB, srv *fakeServer) {
	t.Helper()
	tx, err := db.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	err = tx.Commit()
	var se *Error
	if !errors.As(err, &se) || se.Class != RetryTransaction || !errors.Is(err, errCertification) {
		t.Fatalf("Commit: %v (ran %q); want the retryable class RetryTransaction with the server's 1213", err, srv.ran)
	}
	if n := srv.ranCount("INSERT INTO t "); n != 0 {
		t.Fatalf("committed %d times; want none", n)
	}
}

// myNodesConnector is a fake cluster: the first connection reaches node 0
// (the transaction's), every later one (the resolver's side connections,
// the replay's) node 1. Both give out the same connection ids.
type myNodesConnector struct {
	fakeConnector
	galera  bool
	members []string // mysql.wsrep_cluster_members as node 1 sees it
	dialed  atomic.Int32
}

func (c *myNodesConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	node := 0
	if c.dialed.Add(1) > 1 {
		node = 1
	}
	return &myNodeConn{fakeConn: dc.(*fakeConn), nc: c, node: node}, nil
}

type myNodeConn struct {
	*fakeConn
	nc   *myNodesConnector
	node int
}

func (c *myNodeConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	q = fakeOwn(q)
	switch {
	case q == mysqlServerQuery:
		wsrep := "OFF"
		if c.nc.galera {
			wsrep = "ON"
		}
		return &fakeRows{cols: []string{"Variable_name", "Value"}, data: [][]driver.Value{
			{[]byte("hostname"), []byte("h")}, {[]byte("port"), []byte(fmt.Sprint(3306 + c.node))}, {[]byte("server_id"), []byte("1")},
			{[]byte("wsrep_node_name"), []byte(fmt.Sprint("node", c.node))}, {[]byte("wsrep_on"), []byte(wsrep)}}}, nil
	case strings.HasPrefix(q, "SELECT COUNT(*) FROM mysql.wsrep_cluster_members"):
		n := int64(0)
		for _, m := range c.nc.members {
			if m == args[0].Value {
				n = 1
			}
		}
		return &fakeRows{cols: []string{"n"}, data: [][]driver.Value{{n}}}, nil
	}
	return c.fakeConn.QueryContext(ctx, q, args)
}

// Across servers (Galera nodes, endpoints) connection ids are unrelated:
// the resolver looks for the old session and KILLs it only on the server
// the transaction ran on; a Galera survivor's answer counts, read
// causally, once the old node has left the cluster.
func TestMarkerResolutionAcrossNodes(t *testing.T) {
	run := func(t *testing.T, nc *myNodesConnector, commit step, deadline time.Duration) (int, error) {
		t.Helper()
		nc.srv.script("COMMIT", commit)
		wc, err := WrapConnector(nc, WithDialect(DialectMySQL), WithMySQLCommitMarker("m"))
		if err != nil {
			t.Fatal(err)
		}
		db := sql.OpenDB(wc)
		t.Cleanup(func() { db.Close() })
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		calls := 0
		err = RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')")
			return err
		})
		return calls, err
	}
	t.Run("another server's session with the same id is never KILLed", func(t *testing.T) {
		srv := newFakeServer()
		srv.oldSession = &fakeBackend{state: "Sleep"} // node 1's own client, same id
		nc := &myNodesConnector{fakeConnector: fakeConnector{srv: srv}}
		calls, err := run(t, nc, step{err: errLost}, 300*time.Millisecond)
		if len(srv.mysqlKills) != 0 {
			t.Fatalf("KILLed %v on another server", srv.mysqlKills)
		}
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ambiguous (the old server cannot be asked), no replay", err, calls)
		}
	})
	t.Run("another server that has the marker: committed", func(t *testing.T) {
		srv := newFakeServer()
		nc := &myNodesConnector{fakeConnector: fakeConnector{srv: srv}}
		calls, err := run(t, nc, step{err: errLost, ran: true}, 5*time.Second)
		if err != nil || calls != 1 || srv.ranCount("INSERT INTO ledger") != 1 {
			t.Fatalf("err=%v calls=%d; want success, no replay", err, calls)
		}
	})
	t.Run("Galera survivor, old node gone, no marker: not committed, replayed, read causally", func(t *testing.T) {
		srv := newFakeServer()
		srv.oldSession = &fakeBackend{state: "Sleep"}
		nc := &myNodesConnector{fakeConnector: fakeConnector{srv: srv}, galera: true, members: []string{"node1", "node2"}}
		calls, err := run(t, nc, step{err: errLost}, 5*time.Second)
		if err != nil || calls != 2 || srv.ranCount("INSERT INTO ledger") != 1 || len(srv.mysqlKills) != 0 {
			t.Fatalf("err=%v calls=%d inserts=%d kills=%v; want one replay, no KILL", err, calls, srv.ranCount("INSERT INTO ledger"), srv.mysqlKills)
		}
		if srv.ranCount("SET SESSION wsrep_sync_wait = 1") == 0 {
			t.Fatal("the marker was not read causally (wsrep_sync_wait)")
		}
	})
	t.Run("Galera survivor, old node still a member, no marker: ambiguous", func(t *testing.T) {
		srv := newFakeServer()
		nc := &myNodesConnector{fakeConnector: fakeConnector{srv: srv}, galera: true, members: []string{"node0", "node1"}}
		calls, err := run(t, nc, step{err: errLost}, 300*time.Millisecond)
		if !errors.Is(err, ErrAmbiguousCommit) || calls != 1 {
			t.Fatalf("err=%v calls=%d; want ambiguous: the old node's session may still commit", err, calls)
		}
	})
	t.Run("Galera survivor with the marker: committed", func(t *testing.T) {
		srv := newFakeServer()
		nc := &myNodesConnector{fakeConnector: fakeConnector{srv: srv}, galera: true, members: []string{"node0", "node1"}}
		calls, err := run(t, nc, step{err: errLost, ran: true}, 5*time.Second)
		if err != nil || calls != 1 {
			t.Fatalf("err=%v calls=%d; want success, no replay", err, calls)
		}
	})
}
