package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/XSAM/otelsql"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// Raw driver vs sqlretry against the real local servers, as sub-benchmarks
// db=.../wrap=... for `benchstat -col /wrap`. "sqlretry-noresolve" turns
// the PostgreSQL transaction-id lookup before COMMIT off, to measure it;
// XSAM/otelsql (no-op tracer provider) is the reference wrapper.
func benchReal(b *testing.B, body func(b *testing.B, db *sql.DB, dialect string)) {
	for _, dialect := range []string{"pgx", "mysql"} {
		d := needB(b, dialect)
		wraps := []string{"raw", "sqlretry", "otelsql"}
		if dialect == "pgx" {
			wraps = append(wraps, "sqlretry-noresolve")
		}
		for _, wrap := range wraps {
			b.Run(fmt.Sprintf("db=%s/wrap=%s", dialect, wrap), func(b *testing.B) {
				var db *sql.DB
				var err error
				switch wrap {
				case "raw":
					db, err = sql.Open(dialect, d)
				case "sqlretry":
					db, err = sqlretry.Open(dialect, d)
				case "otelsql":
					db, err = otelsql.Open(dialect, d)
				default:
					db, err = sqlretry.Open(dialect, d, sqlretry.WithCommitResolution(false))
				}
				if err != nil {
					b.Fatal(err)
				}
				defer db.Close()
				db.SetMaxIdleConns(4)
				b.ReportAllocs()
				body(b, db, dialect)
			})
		}
	}
}

func needB(b *testing.B, driverName string) string {
	var d string
	switch driverName {
	case "pgx":
		d = dsn("SQLRETRY_PG_DSN", defaultPG)
	default:
		d = dsn("SQLRETRY_MYSQL_DSN", defaultMySQL)
	}
	db, err := sql.Open(driverName, d)
	if err == nil {
		err = db.Ping()
		db.Close()
	}
	if err != nil {
		b.Skipf("%s unreachable: %v", driverName, err)
	}
	return d
}

func BenchmarkRealSelect1(b *testing.B) {
	benchReal(b, func(b *testing.B, db *sql.DB, _ string) {
		var n int
		for b.Loop() {
			if err := db.QueryRow("SELECT 1").Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// A small write transaction: BEGIN, one INSERT, COMMIT, into a fresh
// table per run (updating one hot row makes later runs slower). The raw
// driver runs it by hand; sqlretry through RunInTx.
func BenchmarkRealSmallTx(b *testing.B) {
	benchReal(b, func(b *testing.B, db *sql.DB, dialect string) {
		tbl := fmt.Sprintf("bench_%s_%d", dialect, rand.Uint32())
		if _, err := db.Exec("CREATE TABLE " + tbl + " (id bigint NOT NULL, note varchar(32))"); err != nil {
			b.Fatal(err)
		}
		defer db.Exec("DROP TABLE " + tbl)
		update := "INSERT INTO " + tbl + " VALUES (1, 'x')"
		ctx := context.Background()
		fn := func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, update)
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

// txStrategy is sqlretry.RunInTx on a *sql.DB sqlretry opened, and the
// same transaction by hand (BeginTx, the closure, Commit) on any other.
func txStrategy(db *sql.DB) workload.Strategy {
	if _, wrapped := sqlretry.StatsOf(db); wrapped {
		return workload.RunInTx
	}
	return workload.Plain
}
