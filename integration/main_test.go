// Package integration tests sqlretry against real PostgreSQL and MariaDB.
//
// Where the databases come from, in this order: SQLRETRY_PG_DSN and
// SQLRETRY_MYSQL_DSN; else private throwaway servers the tests start
// themselves from the locally installed server binaries; else, where a
// Docker engine answers, testcontainers-go (package dbserver). When none
// works the tests that need a database skip with one line, except with
// CI=true, where they fail. Tests that kill, crash or starve a server always
// use a private one, never a server named by the environment.
// The benchmarks measure the local servers on their standard ports.
package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"
)

const (
	defaultPG    = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	defaultMySQL = "root@tcp(127.0.0.1:3306)/test?parseTime=true&multiStatements=true"
	// mysqlParams are what the suite's MySQL code expects of a DSN.
	mysqlParams = "parseTime=true&multiStatements=true"
)

func dsn(env, def string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	return def
}

// need returns the DSN of a database for tests that do not harm it: the
// environment's, else a private server's; it skips (fails under CI=true)
// when there is none.
func need(t *testing.T, driverName string) string {
	t.Helper()
	env := map[string]string{"pgx": "SQLRETRY_PG_DSN", "mysql": "SQLRETRY_MYSQL_DSN"}[driverName]
	if d := os.Getenv(env); d != "" {
		if err := ping(driverName, d); err != nil {
			unavailable(t, fmt.Sprintf("%s=%s: %v", env, d, err))
		}
		return d
	}
	d := needPrivate(t, driverName)
	if driverName == "mysql" {
		d += "?" + mysqlParams
	}
	return d
}

func ping(driverName, d string) error {
	db, err := sql.Open(driverName, d)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}

// unavailable skips with one loud line, or fails under CI=true.
func unavailable(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("DATABASE UNAVAILABLE under CI=true: %s", why)
	}
	t.Skipf("DATABASE UNAVAILABLE, skipping: %s", why)
}

// table returns a unique table name for one test and drops it afterwards.
func table(t *testing.T, db *sql.DB, prefix string) string {
	t.Helper()
	name := fmt.Sprintf("%s_%d", prefix, rand.Uint32())
	t.Cleanup(func() { db.Exec("DROP TABLE IF EXISTS " + name) })
	return name
}

func mustExec(t *testing.T, db *sql.DB, queries ...string) {
	t.Helper()
	for _, q := range queries {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", strings.SplitN(q, "\n", 2)[0], err)
		}
	}
}
