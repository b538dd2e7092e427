package promsqlretry_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/promsqlretry"
)

func openFake(t *testing.T, f *fakeDB, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	all := append([]sqlretry.Option{sqlretry.WithDialect(sqlretry.DialectPostgres), sqlretry.WithClock(instantClock{})}, opts...)
	db := sqlretry.OpenDB(f, all...)
	t.Cleanup(func() { db.Close() })
	return db
}

func TestCollectorRefusesAPlainDB(t *testing.T) {
	db := sql.OpenDB(&fakeDB{})
	defer db.Close()
	if _, err := promsqlretry.NewCollector(db, nil); !errors.Is(err, promsqlretry.ErrNotSqlretry) {
		t.Fatalf("NewCollector(plain db) = %v, want ErrNotSqlretry", err)
	}
}

// Every metric has a help text and a name Prometheus' linter accepts.
func TestCollectorLint(t *testing.T) {
	c, err := promsqlretry.NewCollector(openFake(t, &fakeDB{}), prometheus.Labels{"db": "orders"})
	if err != nil {
		t.Fatal(err)
	}
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	if n := testutil.CollectAndCount(c); n != 24 {
		t.Errorf("%d series, want 24", n)
	}
}

// A statement retried after a serialization failure shows as one
// statement retry and one success; the breaker is closed.
func TestCollectorCountsARetry(t *testing.T) {
	f := &fakeDB{errs: []error{serializationFailure{}}}
	db := openFake(t, f)
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err != nil {
		t.Fatal(err)
	}
	c, err := promsqlretry.NewCollector(db, prometheus.Labels{"db": "orders"})
	if err != nil {
		t.Fatal(err)
	}
	want := `
# HELP sqlretry_retries_total Retries by what was re-run: statement (re-run on the same connection after the server rolled it back), transaction (a RunInTx replay), connection (re-dials, and re-runs after a lost connection or unavailability).
# TYPE sqlretry_retries_total counter
sqlretry_retries_total{db="orders",kind="connection"} 0
sqlretry_retries_total{db="orders",kind="statement"} 1
sqlretry_retries_total{db="orders",kind="transaction"} 0
# HELP sqlretry_breaker_state 1 for the circuit breaker's current state (closed, open, half-open), 0 for the others; closed when the breaker is off.
# TYPE sqlretry_breaker_state gauge
sqlretry_breaker_state{db="orders",state="closed"} 1
sqlretry_breaker_state{db="orders",state="half-open"} 0
sqlretry_breaker_state{db="orders",state="open"} 0
# HELP sqlretry_dials_total Connections opened.
# TYPE sqlretry_dials_total counter
sqlretry_dials_total{db="orders"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "sqlretry_retries_total", "sqlretry_breaker_state", "sqlretry_dials_total"); err != nil {
		t.Error(err)
	}
	// The statement and the dial succeeded.
	if got := testutil.ToFloat64(successes(t, c)); got != 2 {
		t.Errorf("successes = %v, want 2", got)
	}
}

// Dials refused until the breaker opens: the state gauge says open, one
// transition, the failed dials counted, the call after it refused.
func TestCollectorShowsTheBreakerOpen(t *testing.T) {
	f := &fakeDB{refuse: true}
	db := openFake(t, f, sqlretry.WithMaxAttempts(3), sqlretry.WithBreaker(sqlretry.Breaker{ConsecutiveDialFailures: 3}))
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err == nil {
		t.Fatal("no error with every dial refused")
	}
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); !errors.Is(err, sqlretry.ErrCircuitOpen) {
		t.Fatalf("second call: %v, want ErrCircuitOpen", err)
	}
	c, err := promsqlretry.NewCollector(db, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := `
# HELP sqlretry_breaker_state 1 for the circuit breaker's current state (closed, open, half-open), 0 for the others; closed when the breaker is off.
# TYPE sqlretry_breaker_state gauge
sqlretry_breaker_state{state="closed"} 0
sqlretry_breaker_state{state="half-open"} 0
sqlretry_breaker_state{state="open"} 1
# HELP sqlretry_breaker_transitions_total Changes of the circuit breaker's state.
# TYPE sqlretry_breaker_transitions_total counter
sqlretry_breaker_transitions_total 1
# HELP sqlretry_dial_failures_total Dial attempts that failed: each is a dial made during an outage.
# TYPE sqlretry_dial_failures_total counter
sqlretry_dial_failures_total 3
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "sqlretry_breaker_state", "sqlretry_breaker_transitions_total", "sqlretry_dial_failures_total"); err != nil {
		t.Error(err)
	}
	if got := testutil.ToFloat64(only(t, c, "sqlretry_circuit_rejections_total")); got < 1 {
		t.Errorf("circuit rejections = %v, want at least 1", got)
	}
}

func successes(t *testing.T, c prometheus.Collector) prometheus.Collector {
	return only(t, c, "sqlretry_successes_total")
}

// only is c reduced to the metric named name.
func only(t *testing.T, c prometheus.Collector, name string) prometheus.Collector {
	t.Helper()
	return filtered{c, name}
}

type filtered struct {
	c    prometheus.Collector
	name string
}

func (f filtered) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(f, ch) }
func (f filtered) Collect(ch chan<- prometheus.Metric) {
	all := make(chan prometheus.Metric, 64)
	go func() { f.c.Collect(all); close(all) }()
	for m := range all {
		if strings.Contains(m.Desc().String(), `"`+f.name+`"`) {
			ch <- m
		}
	}
}
