package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"io"
	"testing"
)

// A driver that does no I/O, so that the benchmarks measure the wrapper.
type nopConnector struct{}

func (nopConnector) Connect(context.Context) (driver.Conn, error) { return nopConn{}, nil }
func (nopConnector) Driver() driver.Driver                        { return nopDriver{} }

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

// benchDBs runs body against the raw driver and against sqlretry, as
// sub-benchmarks wrap=raw and wrap=sqlretry for `benchstat -col /wrap`.
func benchDBs(b *testing.B, body func(b *testing.B, db *sql.DB)) {
	for _, wrap := range []string{"raw", "sqlretry"} {
		b.Run("wrap="+wrap, func(b *testing.B) {
			var db *sql.DB
			if wrap == "raw" {
				db = sql.OpenDB(nopConnector{})
			} else {
				db = OpenDB(nopConnector{})
			}
			defer db.Close()
			db.SetMaxIdleConns(4)
			b.ReportAllocs()
			body(b, db)
		})
	}
}

func BenchmarkExec(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		for b.Loop() {
			if _, err := db.Exec("UPDATE t SET n = n + 1 WHERE id = 1"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkQueryScan(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		var n int
		for b.Loop() {
			if err := db.QueryRow("SELECT n FROM t WHERE id = 1").Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkPreparedExec(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		stmt, err := db.Prepare("UPDATE t SET n = n + 1 WHERE id = 1")
		if err != nil {
			b.Fatal(err)
		}
		defer stmt.Close()
		for b.Loop() {
			if _, err := stmt.Exec(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkTxExecCommit(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		ctx := context.Background()
		for b.Loop() {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1"); err != nil {
				b.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// RunInTx against the raw driver is the hand-written equivalent: BeginTx,
// the closure, Commit.
func BenchmarkRunInTx(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		ctx := context.Background()
		fn := func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1")
			return err
		}
		raw := retrierOf(db) == nil
		for b.Loop() {
			var err error
			if raw {
				var tx *sql.Tx
				if tx, err = db.BeginTx(ctx, nil); err == nil {
					if err = fn(ctx, tx); err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				}
			} else {
				err = RunInTx(ctx, db, nil, fn)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkParallelExec(b *testing.B) {
	benchDBs(b, func(b *testing.B, db *sql.DB) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := db.Exec("UPDATE t SET n = n + 1 WHERE id = 1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}
