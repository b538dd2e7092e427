// Package nopdriver is a database/sql driver that does no I/O, so that
// benchmarks measure what a wrapper around it costs.
package nopdriver

import (
	"context"
	"database/sql/driver"
	"io"
)

// Connector is a driver.Connector whose connections do no I/O: Exec
// affects one row, Query returns one row with one column n = 1.
type Connector struct{}

func (Connector) Connect(context.Context) (driver.Conn, error) { return nopConn{}, nil }
func (Connector) Driver() driver.Driver                        { return nopDriver{} }

type nopDriver struct{}

func (nopDriver) Open(string) (driver.Conn, error) { return nopConn{}, nil }

type nopConn struct{}

func (nopConn) Prepare(string) (driver.Stmt, error) { return nopStmt{}, nil }
func (nopConn) Close() error                        { return nil }
func (nopConn) Begin() (driver.Tx, error)           { return nopTx{}, nil }
func (nopConn) BeginTx(context.Context, driver.TxOptions) (driver.Tx, error) {
	return nopTx{}, nil
}
func (nopConn) ExecContext(context.Context, string, []driver.NamedValue) (driver.Result, error) {
	return driver.RowsAffected(1), nil
}
func (nopConn) QueryContext(context.Context, string, []driver.NamedValue) (driver.Rows, error) {
	return &nopRows{}, nil
}
func (nopConn) ResetSession(context.Context) error { return nil }
func (nopConn) IsValid() bool                      { return true }

type nopStmt struct{}

func (nopStmt) Close() error                               { return nil }
func (nopStmt) NumInput() int                              { return -1 }
func (nopStmt) Exec([]driver.Value) (driver.Result, error) { return driver.RowsAffected(1), nil }
func (nopStmt) Query([]driver.Value) (driver.Rows, error)  { return &nopRows{}, nil }
func (nopStmt) ExecContext(context.Context, []driver.NamedValue) (driver.Result, error) {
	return driver.RowsAffected(1), nil
}

type nopTx struct{}

func (nopTx) Commit() error   { return nil }
func (nopTx) Rollback() error { return nil }

type nopRows struct{ done bool }

func (*nopRows) Columns() []string { return []string{"n"} }
func (*nopRows) Close() error      { return nil }
func (r *nopRows) Next(dest []driver.Value) error {
	if r.done {
		return io.EOF
	}
	r.done = true
	dest[0] = int64(1)
	return nil
}
