package promsqlretry_test

import (
	"context"
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/promsqlretry"
)

// Register a collector per database; serve the registry with promhttp as
// usual (promhttp.HandlerFor(reg, promhttp.HandlerOpts{})).
func ExampleNewCollector() {
	// With a real driver: db, err := sqlretry.Open("pgx", dsn)
	db := sqlretry.OpenDB(&fakeDB{errs: []error{serializationFailure{}}}, sqlretry.WithDialect(sqlretry.DialectPostgres))
	defer db.Close()

	c, err := promsqlretry.NewCollector(db, prometheus.Labels{"db": "orders"})
	if err != nil {
		panic(err) // db was not opened through sqlretry
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)

	if _, err := db.ExecContext(context.Background(), "UPDATE accounts SET balance = balance - 1"); err != nil {
		panic(err)
	}
	n, _ := testutil.GatherAndCount(reg, "sqlretry_retries_total")
	fmt.Println("series of sqlretry_retries_total:", n)
	err = testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP sqlretry_retries_total Retries by what was re-run: statement (re-run on the same connection after the server rolled it back), transaction (a RunInTx replay), connection (re-dials, and re-runs after a lost connection or unavailability).
# TYPE sqlretry_retries_total counter
sqlretry_retries_total{db="orders",kind="connection"} 0
sqlretry_retries_total{db="orders",kind="statement"} 1
sqlretry_retries_total{db="orders",kind="transaction"} 0
`), "sqlretry_retries_total")
	fmt.Println("one statement retry:", err == nil)
	// Output:
	// series of sqlretry_retries_total: 3
	// one statement retry: true
}
