package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

func mysqlErr(n uint16, msg string) error { return &mysql.MySQLError{Number: n, Message: msg} }

// fakeNode is one server of a fake cluster: it can be down (dials
// refused), read-only, or a Galera node in some wsrep_local_state.
type fakeNode struct {
	srv *fakeServer

	mu         sync.Mutex
	down       bool
	readOnly   bool
	wsrepState string // "": no Galera; "4": Synced
	// plainMariaDB: no Galera, answered as MariaDB does without it
	// (wsrep_ready OFF, wsrep_cluster_status Disconnected, no provider).
	plainMariaDB bool
	conns        []*fakeConn
	dials        int
}

func newFakeNodes(n int) []*fakeNode {
	var nodes []*fakeNode
	for range n {
		nodes = append(nodes, &fakeNode{srv: newFakeServer(), wsrepState: "4"})
	}
	return nodes
}

// kill takes the node down: dials are refused and its open connections
// are broken (their next use fails before sending, as go-sql-driver/mysql's
// connection check finds a closed socket).
func (n *fakeNode) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.down = true
	for _, c := range n.conns {
		c.broken = true
	}
}

func (n *fakeNode) set(f func(n *fakeNode)) { n.mu.Lock(); f(n); n.mu.Unlock() }

func (n *fakeNode) dialCount() int { n.mu.Lock(); defer n.mu.Unlock(); return n.dials }

type nodeConnector struct{ n *fakeNode }

func (c nodeConnector) Connect(ctx context.Context) (driver.Conn, error) {
	n := c.n
	n.mu.Lock()
	defer n.mu.Unlock()
	n.dials++
	if n.down {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	n.srv.openConns.Add(1)
	fc := &fakeConn{srv: n.srv, pid: int64(1000 + n.dials)}
	n.conns = append(n.conns, fc)
	return &nodeConn{fakeConn: fc, n: n}, nil
}
func (c nodeConnector) Driver() driver.Driver { return fakeDriver{} }

// nodeConn answers the endpoint check's questions.
type nodeConn struct {
	*fakeConn
	n *fakeNode
}

func (c *nodeConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	switch q {
	case galeraStatusQuery, mysqlReadOnlyQuery:
		if c.broken {
			return nil, driver.ErrBadConn
		}
		c.n.mu.Lock()
		defer c.n.mu.Unlock()
		cols := []string{"Variable_name", "Value"}
		if q == mysqlReadOnlyQuery {
			ro := "OFF"
			if c.n.readOnly {
				ro = "ON"
			}
			return &fakeRows{cols: cols, data: [][]driver.Value{{[]byte("read_only"), []byte(ro)}, {[]byte("tx_read_only"), []byte("OFF")}}, clobber: true}, nil
		}
		if c.n.plainMariaDB {
			return &fakeRows{cols: cols, data: [][]driver.Value{{[]byte("wsrep_cluster_status"), []byte("Disconnected")},
				{[]byte("wsrep_provider_name"), []byte("")}, {[]byte("wsrep_ready"), []byte("OFF")}}, clobber: true}, nil
		}
		if c.n.wsrepState == "" {
			return &fakeRows{cols: cols}, nil
		}
		return &fakeRows{cols: cols, data: [][]driver.Value{{[]byte("wsrep_ready"), []byte("ON")}, {[]byte("wsrep_provider_name"), []byte("Galera")},
			{[]byte("wsrep_local_state"), []byte(c.n.wsrepState)}, {[]byte("wsrep_cluster_status"), []byte("Primary")}}, clobber: true}, nil
	}
	return c.fakeConn.QueryContext(ctx, q, args)
}

// endpointsDB opens a db through sqlretry over the nodes, with a fake
// clock shared by sqlretry and the endpoints' breakers.
func endpointsDB(t *testing.T, nodes []*fakeNode, choice EndpointChoice, opts ...Option) (*sql.DB, *EndpointsConnector, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	var cs []driver.Connector
	for _, n := range nodes {
		cs = append(cs, nodeConnector{n})
	}
	ec, err := NewEndpointsConnector(cs, WithEndpointChoice(choice), WithEndpointClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	db := OpenDB(ec, append([]Option{WithClock(clock), WithDialect(DialectMySQL)}, opts...)...)
	t.Cleanup(func() { db.Close() })
	return db, ec, clock
}

// ranOn is the index of the node where the statement ran, or -1.
func ranOn(nodes []*fakeNode, stmt string) []int {
	var on []int
	for i, n := range nodes {
		for range n.srv.ranCount(stmt) {
			on = append(on, i)
		}
	}
	return on
}

func TestEndpointsPreferFirstAndSpread(t *testing.T) {
	ctx := context.Background()
	t.Run("prefer first", func(t *testing.T) {
		nodes := newFakeNodes(3)
		db, ec, _ := endpointsDB(t, nodes, PreferFirst)
		db.SetMaxIdleConns(0) // every call dials
		for range 4 {
			if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
				t.Fatal(err)
			}
		}
		if got := ranOn(nodes, "INSERT"); len(got) != 4 || got[0] != 0 || got[3] != 0 {
			t.Errorf("ran on nodes %v, want all on node 0", got)
		}
		if h := ec.Health(); h[0].Dials != 4 || h[1].Dials != 0 || h[0].State != BreakerClosed {
			t.Errorf("health %+v", h)
		}
	})
	t.Run("spread", func(t *testing.T) {
		nodes := newFakeNodes(3)
		db, _, _ := endpointsDB(t, nodes, Spread)
		db.SetMaxIdleConns(0)
		for range 6 {
			if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
				t.Fatal(err)
			}
		}
		for i, n := range nodes {
			if got := n.srv.ranCount("INSERT"); got != 2 {
				t.Errorf("node %d ran %d inserts, want 2 (round robin)", i, got)
			}
		}
	})
}

// A node that is down is passed over at once and not dialled again until
// its breaker's probe; when it is back, the first endpoint is preferred
// again.
func TestEndpointsNodeDownPassedOver(t *testing.T) {
	ctx := context.Background()
	nodes := newFakeNodes(3)
	db, ec, clock := endpointsDB(t, nodes, PreferFirst)
	db.SetMaxIdleConns(0)
	nodes[0].kill()
	for range 5 {
		if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
			t.Fatalf("a node down must cost no error: %v", err)
		}
	}
	if got := ranOn(nodes, "INSERT"); len(got) != 5 || got[0] != 1 || got[4] != 1 {
		t.Errorf("ran on nodes %v, want node 1", got)
	}
	if d := nodes[0].dialCount(); d != 1 {
		t.Errorf("the dead node was dialled %d times, want once (its breaker opens on the first refusal)", d)
	}
	h := ec.Health()
	if h[0].State != BreakerOpen || h[0].Failures != 1 || !errors.Is(h[0].LastErr, syscall.ECONNREFUSED) {
		t.Errorf("node 0's health: %+v", h[0])
	}
	// Back, and its breaker's open time is over: the probe takes it.
	nodes[0].set(func(n *fakeNode) { n.down = false })
	clock.Advance(2 * DefaultEndpointBreaker.OpenTimeout)
	if _, err := db.ExecContext(ctx, "UPDATE t SET x = 1"); err != nil {
		t.Fatal(err)
	}
	if got := ranOn(nodes, "UPDATE"); len(got) != 1 || got[0] != 0 {
		t.Errorf("after the node came back: ran on %v, want node 0", got)
	}
	if h := ec.Health(); h[0].State != BreakerClosed {
		t.Errorf("node 0's breaker %v after a good probe", h[0].State)
	}
}

// A server that answers but does not take writes (read_only, a Galera
// node that is not Synced) is passed over; so is one that turns
// read-only while its connection is pooled: the write's read-only answer
// is judged by asking the server, the connection is dropped and the
// RunInTx closure runs again on the next node.
func TestEndpointsReadOnlyOrNotSyncedNode(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		set  func(n *fakeNode)
		why  string
	}{
		{"read_only", func(n *fakeNode) { n.readOnly = true }, "read_only is on"},
		{"donor", func(n *fakeNode) { n.wsrepState = "2" }, "not Synced (wsrep_local_state 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nodes := newFakeNodes(2)
			db, ec, _ := endpointsDB(t, nodes, PreferFirst)
			nodes[0].set(tc.set)
			if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
				t.Fatal(err)
			}
			if got := ranOn(nodes, "INSERT"); len(got) != 1 || got[0] != 1 {
				t.Errorf("ran on %v, want node 1", got)
			}
			if h := ec.Health(); h[0].State != BreakerOpen || h[0].LastErr == nil || !strings.Contains(h[0].LastErr.Error(), tc.why) {
				t.Errorf("node 0's health %+v, want open with %q", h[0], tc.why)
			}
		})
	}
	t.Run("turns read-only while pooled", func(t *testing.T) {
		nodes := newFakeNodes(2)
		db, _, _ := endpointsDB(t, nodes, PreferFirst)
		db.SetMaxOpenConns(1)
		if err := db.PingContext(ctx); err != nil {
			t.Fatal(err)
		}
		nodes[0].set(func(n *fakeNode) { n.readOnly = true })
		nodes[0].srv.script("UPDATE", step{err: mysqlErr(1290, "The MariaDB server is running with the --read-only option so it cannot execute this statement")})
		runs := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			_, err := tx.ExecContext(ctx, "UPDATE t SET x = x + 1")
			return err
		})
		if err != nil {
			t.Fatalf("RunInTx: %v", err)
		}
		if runs != 2 || nodes[1].srv.committed != 1 || nodes[0].srv.committed != 0 {
			t.Errorf("runs %d, commits node 0 %d, node 1 %d; want 2 runs, one commit on node 1", runs, nodes[0].srv.committed, nodes[1].srv.committed)
		}
	})
}

// Work bound to a connection on a node that dies: a call whose connection
// is found broken before anything was sent goes to another node; a
// RunInTx transaction that lost its connection before COMMIT is replayed
// there; an autocommit write lost after it was sent is never re-run
// blindly on another node.
func TestEndpointsNodeLossSafety(t *testing.T) {
	ctx := context.Background()
	t.Run("nothing sent", func(t *testing.T) {
		nodes := newFakeNodes(2)
		db, _, _ := endpointsDB(t, nodes, PreferFirst)
		db.SetMaxOpenConns(2)
		if err := db.PingContext(ctx); err != nil {
			t.Fatal(err)
		}
		nodes[0].kill()
		if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
		if got := ranOn(nodes, "INSERT"); len(got) != 1 || got[0] != 1 {
			t.Errorf("ran on %v, want node 1 once", got)
		}
	})
	t.Run("transaction replayed", func(t *testing.T) {
		nodes := newFakeNodes(2)
		db, _, _ := endpointsDB(t, nodes, PreferFirst)
		runs := 0
		err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			runs++
			if runs == 1 {
				// The node dies under the transaction's statement.
				nodes[0].srv.script("UPDATE", step{err: mysqlInvalidConn()})
				defer nodes[0].kill()
			}
			_, err := tx.ExecContext(ctx, "UPDATE t SET x = x + 1")
			return err
		})
		if err != nil {
			t.Fatalf("RunInTx: %v", err)
		}
		if runs != 2 || nodes[0].srv.committed != 0 || nodes[1].srv.committed != 1 {
			t.Errorf("runs %d, commits node 0 %d, node 1 %d; want the replay committed on node 1 only", runs, nodes[0].srv.committed, nodes[1].srv.committed)
		}
	})
	t.Run("autocommit write sent", func(t *testing.T) {
		nodes := newFakeNodes(2)
		db, _, _ := endpointsDB(t, nodes, PreferFirst)
		nodes[0].srv.script("INSERT", step{err: mysqlInvalidConn(), ran: true})
		_, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		if err == nil {
			t.Fatal("a write lost after it was sent succeeded: it was re-run")
		}
		if got := ranOn(nodes, "INSERT"); len(got) != 1 || got[0] != 0 {
			t.Errorf("ran on %v, want node 0 only (never re-run on node 1)", got)
		}
	})
}

// mysqlInvalidConn is go-sql-driver/mysql's answer when the server's
// socket closes under a request it sent.
func mysqlInvalidConn() error { return mysql.ErrInvalidConn }

// All nodes down: the caller gets an error that names every endpoint and
// the cause, before its deadline, with the real clock.
func TestEndpointsAllDown(t *testing.T) {
	nodes := newFakeNodes(3)
	var cs []driver.Connector
	for _, n := range nodes {
		n.kill()
		cs = append(cs, nodeConnector{n})
	}
	ec, err := NewEndpointsConnector(cs, WithEndpointNames("a:1", "b:2", "c:3"))
	if err != nil {
		t.Fatal(err)
	}
	db := OpenDB(ec, WithDialect(DialectMySQL))
	defer db.Close()
	for _, deadline := range []time.Duration{300 * time.Millisecond, 1500 * time.Millisecond} {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		t0 := time.Now()
		_, err = db.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		took := time.Since(t0)
		cancel()
		if err == nil {
			t.Fatal("no error with every node down")
		}
		if took > deadline+time.Second {
			t.Errorf("returned %v after a %v deadline", took, deadline)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("the cause is not in the error: %v", err)
		}
		for _, name := range []string{"a:1", "b:2", "c:3"} {
			if !strings.Contains(err.Error(), name) {
				t.Errorf("error does not name %s: %v", name, err)
			}
		}
	}
	for i, h := range ec.Health() {
		if h.Dials != 0 || h.Failures == 0 || h.State == BreakerClosed {
			t.Errorf("endpoint %d: %+v", i, h)
		}
	}
}

// A refusal for good (a wrong password on every node) is not retried.
func TestEndpointsPermanentDialError(t *testing.T) {
	nodes := newFakeNodes(2)
	var cs []driver.Connector
	for _, n := range nodes {
		n.srv.dialErrs = []error{mysqlErr(1045, "Access denied for user 'app'@'localhost'")}
		cs = append(cs, failingDialConnector{n: n})
	}
	ec, err := NewEndpointsConnector(cs)
	if err != nil {
		t.Fatal(err)
	}
	db := OpenDB(ec, WithDialect(DialectMySQL))
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	t0 := time.Now()
	err = db.PingContext(ctx)
	if err == nil || !strings.Contains(err.Error(), "Access denied") || time.Since(t0) > 2*time.Second {
		t.Errorf("err %v after %v, want the access denied at once", err, time.Since(t0))
	}
}

type failingDialConnector struct{ n *fakeNode }

func (c failingDialConnector) Connect(context.Context) (driver.Conn, error) {
	return nil, c.n.srv.dialErrs[0]
}
func (c failingDialConnector) Driver() driver.Driver { return fakeDriver{} }

func TestEndpointsBadInput(t *testing.T) {
	var nilConn *fakeConnector
	one := &fakeConnector{srv: newFakeServer()}
	for _, tc := range []struct {
		name string
		cs   []driver.Connector
		opts []EndpointOption
		want string
	}{
		{"none", nil, nil, "no endpoints"},
		{"nil", []driver.Connector{one, nil}, nil, "endpoint 2 is nil"},
		{"typed nil", []driver.Connector{nilConn}, nil, "endpoint 1 is nil"},
		{"twice", []driver.Connector{one, one}, nil, "endpoint 2 is endpoint 1 again"},
		{"names", []driver.Connector{one}, []EndpointOption{WithEndpointNames("a", "b")}, "2 names for 1 endpoints"},
		{"nil option", []driver.Connector{one}, []EndpointOption{nil}, "option 0 is nil"},
		{"nil check", []driver.Connector{one}, []EndpointOption{WithEndpointCheck(nil)}, "check is nil"},
		{"choice", []driver.Connector{one}, []EndpointOption{WithEndpointChoice(7)}, "unknown choice"},
		{"timeout", []driver.Connector{one}, []EndpointOption{WithEndpointTimeout(0)}, "WithEndpointTimeout"},
		{"breaker", []driver.Connector{one}, []EndpointOption{WithEndpointBreaker(Breaker{FailureRatio: 2})}, "FailureRatio"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewEndpointsConnector(tc.cs, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want %q", err, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name, driver string
		dsns         []string
		want         string
	}{
		{"no dsns", "sqlretry-endpoints-none", nil, "no endpoints"},
		{"unknown driver", "no-such-driver", []string{"a"}, `unknown driver "no-such-driver"`},
		{"empty dsn", "mysql", []string{"a", " "}, "endpoint 2 has an empty DSN"},
		{"repeated dsn", "mysql", []string{"a", "a"}, "endpoint 2 is endpoint 1 again"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := OpenEndpoints(tc.driver, tc.dsns)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want %q", err, tc.want)
			}
		})
	}
}

// OpenEndpoints over a registered driver names each endpoint by the DSN's
// address, never by its password.
func TestOpenEndpointsNames(t *testing.T) {
	if got := endpointName("app:secret@tcp(10.0.0.1:3306)/db?x=@", 0); got != "10.0.0.1:3306" {
		t.Errorf("endpointName %q", got)
	}
	if got := endpointName("postgres://u:p@h/db", 1); got != "endpoint 2" {
		t.Errorf("endpointName %q", got)
	}
	if got := endpointName("app:p(a)ss@unix(/run/mysqld.sock)/db", 1); got != "/run/mysqld.sock" {
		t.Errorf("endpointName %q", got)
	}
	name := "sqlretry-endpoints-names"
	sql.Register(name, dsnDriver{})
	db, err := OpenEndpoints(name, []string{"app:secret@tcp(10.0.0.1:3306)/db", "app:secret@tcp(10.0.0.2:3306)/db"}, WithDialect(DialectMySQL))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err = db.PingContext(ctx)
	if err == nil || !strings.Contains(err.Error(), "10.0.0.2:3306") || strings.Contains(err.Error(), "secret") {
		t.Errorf("err %v, want both endpoints named, no password", err)
	}
}

// dsnDriver refuses every dial.
type dsnDriver struct{}

func (dsnDriver) Open(dsn string) (driver.Conn, error) {
	return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
}

// closeErrRows hands out its rows, then fails at Close: go-sql-driver/mysql
// reads the rest of a result set at Close, where an error packet (a
// Galera certification failure that aborted the query while it sent its
// rows) comes out.
type closeErrRows struct {
	fakeRows
	closeErr error
}

func (r *closeErrRows) Close() error { return r.closeErr }

type closeErrConn struct {
	*nodeConn
	once *sync.Once
}

func (c *closeErrConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	if strings.HasPrefix(q, "SELECT balance") {
		var rows driver.Rows
		c.once.Do(func() {
			rows = &closeErrRows{fakeRows: fakeRows{cols: []string{"balance"}, data: [][]driver.Value{{int64(10)}}},
				closeErr: mysqlErr(1213, "Deadlock found when trying to get lock; try restarting transaction")}
		})
		if rows != nil {
			return rows, nil
		}
		return &fakeRows{cols: []string{"balance"}, data: [][]driver.Value{{int64(10)}}}, nil
	}
	return c.nodeConn.QueryContext(ctx, q, args)
}

type closeErrConnector struct {
	nodeConnector
	once *sync.Once
}

func (c closeErrConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.nodeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &closeErrConn{nodeConn: dc.(*nodeConn), once: c.once}, nil
}

// A transaction-aborting error that reaches the closure through
// Rows.Close (Row.Scan returns it) is the database's and RunInTx replays
// it: seen on Galera under multi-master conflicts, where RunInTx returned
// such a 1213 unchanged.
func TestRunInTxReplaysAbortAtRowsClose(t *testing.T) {
	node := newFakeNodes(1)[0]
	ec, err := NewEndpointsConnector([]driver.Connector{closeErrConnector{nodeConnector{node}, &sync.Once{}}})
	if err != nil {
		t.Fatal(err)
	}
	db := OpenDB(ec, WithDialect(DialectMySQL), WithClock(newFakeClock()))
	defer db.Close()
	runs := 0
	err = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		var b int
		if err := tx.QueryRowContext(ctx, "SELECT balance FROM a WHERE id = ? FOR UPDATE", 1).Scan(&b); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE a SET balance = balance - 1 WHERE id = 1")
		return err
	})
	if err != nil || runs != 2 || node.srv.committed != 1 {
		t.Errorf("err %v, runs %d, commits %d; want the abort replayed: 2 runs, 1 commit", err, runs, node.srv.committed)
	}
}

// A MariaDB without Galera still has the wsrep status variables
// (wsrep_ready OFF, wsrep_cluster_status Disconnected, an empty
// wsrep_provider_name): it takes writes, and the default check must say
// so (it refused every plain MariaDB before).
func TestEndpointsPlainMariaDBIsWritable(t *testing.T) {
	nodes := newFakeNodes(2)
	for _, n := range nodes {
		n.set(func(n *fakeNode) { n.plainMariaDB = true })
	}
	db, ec, _ := endpointsDB(t, nodes, PreferFirst)
	if _, err := db.ExecContext(context.Background(), "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if got := ranOn(nodes, "INSERT"); len(got) != 1 || got[0] != 0 {
		t.Errorf("ran on %v, want node 0", got)
	}
	if h := ec.Health(); h[0].State != BreakerClosed {
		t.Errorf("node 0's health %+v, want closed", h[0])
	}
}
