package integration

import (
	"context"
	"database/sql"
	"testing"

	"github.com/XSAM/otelsql"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/nopdriver"
)

// Happy-path overhead on a driver that does no I/O: the raw driver,
// sqlretry, and XSAM/otelsql (with OpenTelemetry's default no-op tracer
// provider) as a reference for what a well-kept wrapper costs, as
// sub-benchmarks wrap=... for `benchstat -col /wrap`. -count runs the
// variants interleaved (raw, sqlretry, otelsql, raw, ...).
func benchNop(b *testing.B, body func(b *testing.B, db *sql.DB)) {
	for _, wrap := range []string{"raw", "sqlretry", "otelsql"} {
		b.Run("wrap="+wrap, func(b *testing.B) {
			var db *sql.DB
			switch wrap {
			case "raw":
				db = sql.OpenDB(nopdriver.Connector{})
			case "sqlretry":
				db = sqlretry.OpenDB(nopdriver.Connector{})
			case "otelsql":
				db = otelsql.OpenDB(nopdriver.Connector{})
			}
			defer db.Close()
			db.SetMaxIdleConns(4)
			b.ReportAllocs()
			body(b, db)
		})
	}
}

func BenchmarkNopExec(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
		for b.Loop() {
			if _, err := db.Exec("UPDATE t SET n = n + 1 WHERE id = 1"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkNopQueryScan(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
		var n int
		for b.Loop() {
			if err := db.QueryRow("SELECT n FROM t WHERE id = 1").Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkNopPreparedExec(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
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

func BenchmarkNopTxExecCommit(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
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

// RunInTx through sqlretry; on the raw driver and otelsql the hand-written
// equivalent (BeginTx, the closure, Commit), which is what RunInTx also
// does on a *sql.DB sqlretry did not open.
func BenchmarkNopRunInTx(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
		ctx := context.Background()
		fn := func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1")
			return err
		}
		run := txStrategy(db)
		for b.Loop() {
			if err := run(ctx, db, nil, fn); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkNopParallelExec(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := db.Exec("UPDATE t SET n = n + 1 WHERE id = 1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// RunInTx (by hand on raw and otelsql) from GOMAXPROCS goroutines at once:
// what shared counters and the per-commit bookkeeping cost when other
// transactions run at the same time (-cpu 1,2).
func BenchmarkNopParallelRunInTx(b *testing.B) {
	benchNop(b, func(b *testing.B, db *sql.DB) {
		fn := func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1")
			return err
		}
		run := txStrategy(db)
		b.RunParallel(func(pb *testing.PB) {
			ctx := context.Background()
			for pb.Next() {
				if err := run(ctx, db, nil, fn); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}
