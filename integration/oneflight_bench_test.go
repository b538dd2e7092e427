package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"testing"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/pgxsqlretry"
)

// The one-flight COMMIT against the separate question, on a small write
// transaction (BEGIN, one INSERT, COMMIT) on the local PostgreSQL, as
// sub-benchmarks wrap=... for `benchstat -col /wrap`: the plain driver by
// hand, sqlretry with the separate question (the default), sqlretry with
// pgxsqlretry.CommitInOneFlight, and sqlretry with the resolution off.
func BenchmarkPgSmallTxOneFlight(b *testing.B) {
	benchOneFlight(b, needB(b, "pgx"))
}

// The same through the chaos benchmark's latency proxy (toxiproxy, 20 ms
// each way; no jitter here, so that round trips count cleanly). Run with
// a fixed -benchtime (each transaction takes 120-160 ms).
func BenchmarkPgSmallTxOneFlightSlowLink(b *testing.B) {
	d := needB(b, "pgx")
	cfg, err := pgx.ParseConfig(d)
	if err != nil {
		b.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "db", "127.0.0.1:0", net.JoinHostPort(cfg.Host, fmt.Sprint(cfg.Port)))
	if err := p.Start(); err != nil {
		b.Fatal(err)
	}
	defer p.Stop()
	for _, stream := range []string{"upstream", "downstream"} {
		js := fmt.Sprintf(`{"name":"lat-%s","type":"latency","stream":%q,"toxicity":1,"attributes":{"latency":20}}`, stream, stream)
		if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
			b.Fatal(err)
		}
	}
	host, port, _ := net.SplitHostPort(p.Listen)
	cfg.Host = host
	fmt.Sscan(port, &cfg.Port)
	benchOneFlight(b, stdlib.RegisterConnConfig(cfg))
}

func benchOneFlight(b *testing.B, dsn string) {
	for _, wrap := range []string{"raw", "sqlretry", "sqlretry-oneflight", "sqlretry-noresolve"} {
		b.Run("wrap="+wrap, func(b *testing.B) {
			var db *sql.DB
			var err error
			switch wrap {
			case "raw":
				db, err = sql.Open("pgx", dsn)
			case "sqlretry":
				db, err = sqlretry.Open("pgx", dsn)
			case "sqlretry-oneflight":
				db, err = sqlretry.Open("pgx", dsn, pgxsqlretry.CommitInOneFlight())
			default:
				db, err = sqlretry.Open("pgx", dsn, sqlretry.WithCommitResolution(false))
			}
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			db.SetMaxIdleConns(4)
			tbl := fmt.Sprintf("bench_flight_%d", rand.Uint32())
			if _, err := db.Exec("CREATE TABLE " + tbl + " (id bigint NOT NULL, note varchar(32))"); err != nil {
				b.Fatal(err)
			}
			defer db.Exec("DROP TABLE " + tbl)
			insert := "INSERT INTO " + tbl + " VALUES (1, 'x')"
			fn := func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, insert)
				return err
			}
			run := txStrategy(db)
			ctx := context.Background()
			if err := run(ctx, db, nil, fn); err != nil { // the connection's first question asks for the server
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := run(ctx, db, nil, fn); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
