package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

var flightWraps = []string{"raw", "sqlretry", "sqlretry-oneflight", "sqlretry-noresolve"}

func benchOneFlight(b *testing.B, dsn string) {
	for _, wrap := range flightWraps {
		b.Run("wrap="+wrap, func(b *testing.B) {
			one := openFlightBench(b, dsn, wrap)
			b.ReportAllocs()
			for b.Loop() {
				one()
			}
		})
	}
}

// openFlightBench opens wrap's *sql.DB with a table of its own, runs one
// transaction (a connection's first question also asks for the server),
// and returns a function that runs one more.
func openFlightBench(b *testing.B, dsn, wrap string) func() {
	switch wrap {
	case "raw":
		return openFlightBenchDB(b, dsn, nil)
	case "sqlretry":
		return openFlightBenchDB(b, dsn, []sqlretry.Option{})
	case "sqlretry-oneflight":
		return openFlightBenchDB(b, dsn, []sqlretry.Option{pgxsqlretry.CommitInOneFlight()})
	}
	return openFlightBenchDB(b, dsn, []sqlretry.Option{sqlretry.WithCommitResolution(false)})
}

// openFlightBenchDB: opts nil is the plain driver.
func openFlightBenchDB(b *testing.B, dsn string, opts []sqlretry.Option) func() {
	var db *sql.DB
	var err error
	if opts == nil {
		db, err = sql.Open("pgx", dsn)
	} else {
		db, err = sqlretry.Open("pgx", dsn, opts...)
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	db.SetMaxIdleConns(4)
	tbl := fmt.Sprintf("bench_flight_%d", rand.Uint32())
	if _, err := db.Exec("CREATE TABLE " + tbl + " (id bigint NOT NULL, note varchar(32))"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Exec("DROP TABLE " + tbl) })
	insert := "INSERT INTO " + tbl + " VALUES (1, 'x')"
	fn := func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, insert)
		return err
	}
	run := txStrategy(db)
	ctx := context.Background()
	one := func() {
		if err := run(ctx, db, nil, fn); err != nil {
			b.Fatal(err)
		}
	}
	one()
	return one
}

// The four variants of BenchmarkPgSmallTxOneFlight interleaved one
// transaction at a time (the order turns each round), so that a loaded
// machine's bursts hit them alike; each variant's median time per
// transaction is reported as a metric of its own (µs/tx-<wrap>; the median,
// not the mean: a burst on a shared machine stretches single transactions).
func BenchmarkPgSmallTxOneFlightInterleaved(b *testing.B) {
	dsn := needB(b, "pgx")
	ones := make([]func(), len(flightWraps))
	for i, wrap := range flightWraps {
		ones[i] = openFlightBench(b, dsn, wrap)
	}
	interleave(b, ones, flightWraps)
}

// interleave runs one transaction of each of ones per round, the order
// turning each round, and reports each one's median (µs/tx-<label>).
func interleave(b *testing.B, ones []func(), labels []string) {
	spent := make([][]time.Duration, len(ones))
	round := 0
	for b.Loop() {
		for k := range ones {
			i := (round + k) % len(ones)
			t0 := time.Now()
			ones[i]()
			spent[i] = append(spent[i], time.Since(t0))
		}
		round++
	}
	for i, l := range labels {
		slices.Sort(spent[i])
		b.ReportMetric(float64(spent[i][len(spent[i])/2].Nanoseconds())/1000, "µs/tx-"+l)
	}
	b.ReportMetric(0, "ns/op")
}

// questionFlight is pgxsqlretry's flight with another question in place of
// sqlretry's (same columns), to see what each part of it costs.
type questionFlight struct{ q string }

func (f questionFlight) Handles(dc driver.Conn) bool { return pgxsqlretry.Flight{}.Handles(dc) }
func (f questionFlight) Commit(ctx context.Context, dc driver.Conn, q string) ([]driver.Value, error, error) {
	if f.q != "" {
		q = f.q
	}
	return pgxsqlretry.Flight{}.Commit(ctx, dc, q)
}

// What the one-flight COMMIT's local cost is made of, interleaved as in
// BenchmarkPgSmallTxOneFlightInterleaved (medians, µs/tx-<variant>): the
// whole question, only the transaction id, only the WAL message, and a
// question that asks nothing (SELECT 1), against the plain driver and
// sqlretry without the resolution. For the figures only: the parts alone
// resolve nothing correctly.
func BenchmarkPgOneFlightQuestionCost(b *testing.B) {
	dsn := needB(b, "pgx")
	variants := []struct{ name, q string }{
		{"whole", ""},
		{"xid-only", "SELECT pg_catalog.pg_current_xact_id()::text::bigint, NULL::bigint"},
		{"message-only", "SELECT 1::bigint, (pg_catalog.pg_logical_emit_message(true, 'sqlretry', '') - '0/0'::pg_catalog.pg_lsn)::bigint"},
		{"select-1", "SELECT 1::bigint, NULL::bigint"},
	}
	ones := []func(){openFlightBench(b, dsn, "raw"), openFlightBench(b, dsn, "sqlretry-noresolve")}
	labels := []string{"raw", "noresolve"}
	for _, v := range variants {
		ones = append(ones, openFlightBenchDB(b, dsn, []sqlretry.Option{sqlretry.WithCommitFlight(questionFlight{v.q})}))
		labels = append(labels, v.name)
	}
	interleave(b, ones, labels)
}

// preparedPipelineFlight is another way to send the question with the
// COMMIT, kept to measure it: the question as a statement prepared once
// per connection (pgx's statement cache), bound and executed in one
// extended-protocol pipeline with the COMMIT, so that the server neither
// parses nor plans it each time. Measured no faster than the simple
// protocol's flight (README "Not done yet"); not for use: it skips the
// error sorting of pgxsqlretry.
type preparedPipelineFlight struct{}

func (preparedPipelineFlight) Handles(dc driver.Conn) bool { return pgxsqlretry.Flight{}.Handles(dc) }
func (preparedPipelineFlight) Commit(ctx context.Context, dc driver.Conn, q string) ([]driver.Value, error, error) {
	sc := dc.(*stdlib.Conn)
	sd, err := sc.Conn().Prepare(ctx, q, q)
	if err != nil {
		return nil, err, nil
	}
	pc := sc.Conn().PgConn()
	p := pc.StartPipeline(ctx)
	p.SendQueryStatement(sd, nil, nil, nil)
	p.SendQueryParams("COMMIT", nil, nil, nil, nil)
	p.SendPipelineSync()
	if err := p.Flush(); err != nil {
		p.Close()
		return nil, nil, err
	}
	var row []driver.Value
	res, err := p.GetResults()
	if err != nil {
		p.Close()
		return nil, nil, err
	}
	rr := res.(*pgconn.ResultReader)
	for rr.NextRow() {
		for _, v := range rr.Values() {
			if v == nil {
				row = append(row, nil)
				continue
			}
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				row = append(row, string(v))
			} else {
				row = append(row, n)
			}
		}
	}
	if _, err := rr.Close(); err != nil {
		p.Close()
		return nil, nil, err
	}
	res, err = p.GetResults()
	if err != nil {
		p.Close()
		return row, nil, err
	}
	_, err = res.(*pgconn.ResultReader).Close()
	cerr := p.Close()
	if err == nil {
		err = cerr
	}
	return row, nil, err
}

// The prepared-statement pipeline against the simple protocol's flight,
// interleaved (medians, µs/tx-<variant>).
func BenchmarkPgOneFlightPreparedPipeline(b *testing.B) {
	dsn := needB(b, "pgx")
	ones := []func(){
		openFlightBench(b, dsn, "raw"), openFlightBench(b, dsn, "sqlretry-noresolve"),
		openFlightBench(b, dsn, "sqlretry"), openFlightBench(b, dsn, "sqlretry-oneflight"),
		openFlightBenchDB(b, dsn, []sqlretry.Option{sqlretry.WithCommitFlight(preparedPipelineFlight{})}),
	}
	interleave(b, ones, []string{"raw", "noresolve", "sqlretry", "oneflight", "pipeline"})
}
