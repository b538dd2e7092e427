package sqlretrytest_test

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
)

// memDB is a tiny in-memory database for the examples and the fake-driver
// tests: tables of text values, three statements, transactions that apply
// their writes at COMMIT.
//
//	INSERT INTO <table> VALUES (?)
//	SELECT msg FROM <table> ORDER BY msg
//	DELETE FROM <table>
type memDB struct {
	mu       sync.Mutex
	tables   map[string][]string
	closed   int // connections closed
	askedXID int // sqlretry's transaction id queries
}

func newMemDB() *memDB { return &memDB{tables: map[string][]string{}} }

// connector returns a connector to the database.
func (m *memDB) connector() driver.Connector { return memConnector{m} }

type memConnector struct{ m *memDB }

func (c memConnector) Connect(context.Context) (driver.Conn, error) { return &memConn{m: c.m}, nil }
func (c memConnector) Driver() driver.Driver                        { return memDriver(c) }

type memDriver struct{ m *memDB }

func (d memDriver) Open(string) (driver.Conn, error) { return &memConn{m: d.m}, nil }

type write struct {
	table, value string // value "" with del: delete all
	del          bool
}

type memConn struct {
	m       *memDB
	inTx    bool
	closed  bool
	pending []write
}

func (c *memConn) Prepare(string) (driver.Stmt, error) {
	return nil, errors.New("memdb: no prepared statements")
}

func (c *memConn) Close() error {
	c.m.mu.Lock()
	c.m.closed++
	c.m.mu.Unlock()
	c.closed = true
	return nil
}

func (c *memConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *memConn) BeginTx(context.Context, driver.TxOptions) (driver.Tx, error) {
	if c.closed {
		return nil, driver.ErrBadConn
	}
	c.inTx, c.pending = true, nil
	return memTx{c}, nil
}

type memTx struct{ c *memConn }

func (t memTx) Commit() error {
	t.c.m.apply(t.c.pending)
	t.c.inTx, t.c.pending = false, nil
	return nil
}

func (t memTx) Rollback() error {
	t.c.inTx, t.c.pending = false, nil
	return nil
}

func (m *memDB) apply(ws []write) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range ws {
		if w.del {
			delete(m.tables, w.table)
		} else {
			m.tables[w.table] = append(m.tables[w.table], w.value)
		}
	}
}

func (c *memConn) ExecContext(_ context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.closed {
		return nil, driver.ErrBadConn
	}
	f := strings.Fields(query)
	var w write
	switch {
	case len(f) == 5 && f[0] == "INSERT" && f[3] == "VALUES" && f[4] == "(?)" && len(args) == 1:
		w = write{table: f[2], value: fmt.Sprint(args[0].Value)}
	case len(f) == 3 && f[0] == "DELETE":
		w = write{table: f[2], del: true}
	default:
		return nil, fmt.Errorf("memdb: cannot run %q", query)
	}
	if c.inTx {
		c.pending = append(c.pending, w)
	} else {
		c.m.apply([]write{w})
	}
	return driver.RowsAffected(1), nil
}

func (c *memConn) QueryContext(_ context.Context, query string, _ []driver.NamedValue) (driver.Rows, error) {
	if c.closed {
		return nil, driver.ErrBadConn
	}
	if strings.HasPrefix(query, "SELECT CASE WHEN pg_catalog.pg_is_in_recovery()") {
		// sqlretry asks a PostgreSQL connection for the transaction id
		// before COMMIT (and the first time for the backend pid and the
		// server's start): a db opened WithDialect(DialectPostgres).
		c.m.mu.Lock()
		c.m.askedXID++
		c.m.mu.Unlock()
		row := []driver.Value{int64(7)}
		if strings.Contains(query, "pg_backend_pid") {
			row = append(row, int64(4242), int64(1))
		}
		return &valueRows{row: row}, nil
	}
	f := strings.Fields(query)
	if len(f) != 7 || f[0] != "SELECT" || f[2] != "FROM" {
		return nil, fmt.Errorf("memdb: cannot run %q", query)
	}
	c.m.mu.Lock()
	vals := append([]string(nil), c.m.tables[f[3]]...)
	c.m.mu.Unlock()
	if c.inTx {
		for _, w := range c.pending {
			if w.table == f[3] && !w.del {
				vals = append(vals, w.value)
			}
		}
	}
	sort.Strings(vals)
	return &memRows{vals: vals}, nil
}

type memRows struct{ vals []string }

func (r *memRows) Columns() []string { return []string{"msg"} }
func (r *memRows) Close() error      { return nil }
func (r *memRows) Next(dest []driver.Value) error {
	if len(r.vals) == 0 {
		return io.EOF
	}
	dest[0], r.vals = r.vals[0], r.vals[1:]
	return nil
}

type valueRows struct{ row []driver.Value }

func (r *valueRows) Columns() []string { return make([]string, len(r.row)) }
func (r *valueRows) Close() error      { return nil }
func (r *valueRows) Next(dest []driver.Value) error {
	if r.row == nil {
		return io.EOF
	}
	copy(dest, r.row)
	r.row = nil
	return nil
}
