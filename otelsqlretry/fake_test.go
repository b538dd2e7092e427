package otelsqlretry_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// pgError is a PostgreSQL error as pgconn reports it: the shape sqlretry
// classifies.
type pgError struct{ code, msg string }

func (e pgError) Error() string    { return "ERROR: " + e.msg + " (SQLSTATE " + e.code + ")" }
func (e pgError) SQLState() string { return e.code }

var serializationFailure = pgError{"40001", "could not serialize access"}

// fakeDB is a driver whose statements fail with the errors scripted for
// their prefix, in order, then succeed; its dials fail while refuse is set.
type fakeDB struct {
	mu     sync.Mutex
	errs   map[string][]error
	refuse bool
}

func newFakeDB() *fakeDB { return &fakeDB{errs: map[string][]error{}} }

func (f *fakeDB) script(prefix string, errs ...error) {
	f.mu.Lock()
	f.errs[prefix] = append(f.errs[prefix], errs...)
	f.mu.Unlock()
}

func (f *fakeDB) Connect(context.Context) (driver.Conn, error) { return f.Open("") }
func (f *fakeDB) Driver() driver.Driver                        { return f }
func (f *fakeDB) Open(string) (driver.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.refuse {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	}
	return &fakeConn{f}, nil
}

var driverSeq atomic.Int64

// register registers f under a new name, for drivers found by name
// (otelsql.Register).
func (f *fakeDB) register() string {
	name := fmt.Sprintf("otelsqlretry-fake-%d", driverSeq.Add(1))
	sql.Register(name, f)
	return name
}

type fakeConn struct{ f *fakeDB }

func (c *fakeConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("fake: no Prepare") }
func (c *fakeConn) Close() error                        { return nil }
func (c *fakeConn) Begin() (driver.Tx, error)           { return fakeTx{}, nil }
func (c *fakeConn) BeginTx(context.Context, driver.TxOptions) (driver.Tx, error) {
	return fakeTx{}, nil
}
func (c *fakeConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	for prefix, errs := range c.f.errs {
		if strings.HasPrefix(q, prefix) && len(errs) > 0 {
			c.f.errs[prefix] = errs[1:]
			return nil, errs[0]
		}
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
