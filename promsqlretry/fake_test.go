package promsqlretry_test

import (
	"context"
	"database/sql/driver"
	"errors"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
)

// serializationFailure is a PostgreSQL error as pgconn reports it: the
// shape sqlretry classifies.
type serializationFailure struct{}

func (serializationFailure) Error() string {
	return "ERROR: could not serialize access (SQLSTATE 40001)"
}
func (serializationFailure) SQLState() string { return "40001" }

// fakeDB is a driver whose statements fail with the scripted errors, in
// order, then succeed; its dials fail while refuse is set.
type fakeDB struct {
	mu     sync.Mutex
	errs   []error
	refuse bool
}

func (f *fakeDB) Connect(context.Context) (driver.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.refuse {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	}
	return &fakeConn{f}, nil
}
func (f *fakeDB) Driver() driver.Driver { return fakeDriver{} }

type fakeDriver struct{}

func (fakeDriver) Open(string) (driver.Conn, error) { return nil, errors.New("use the connector") }

type fakeConn struct{ f *fakeDB }

func (c *fakeConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("not supported") }
func (c *fakeConn) Close() error                        { return nil }
func (c *fakeConn) Begin() (driver.Tx, error)           { return fakeTx{}, nil }
func (c *fakeConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if len(c.f.errs) > 0 && !strings.HasPrefix(q, "SELECT txid") {
		err := c.f.errs[0]
		c.f.errs = c.f.errs[1:]
		return nil, err
	}
	return driver.RowsAffected(1), nil
}

type fakeTx struct{}

func (fakeTx) Commit() error   { return nil }
func (fakeTx) Rollback() error { return nil }

// instantClock never sleeps: backoff costs the tests nothing.
type instantClock struct{}

func (instantClock) Now() time.Time { return time.Now() }
func (instantClock) Sleep(ctx context.Context, _ time.Duration) error {
	return ctx.Err()
}
