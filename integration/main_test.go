// Package integration tests sqlretry against real PostgreSQL and MariaDB.
//
// Where the databases come from: SQLRETRY_PG_DSN and SQLRETRY_MYSQL_DSN,
// else the local servers on their standard ports. When a database cannot be
// reached the tests that need it skip with one line, except with CI=true,
// where they fail.
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
)

func dsn(env, def string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	return def
}

// need returns the DSN of a reachable database or skips (fails under CI).
func need(t *testing.T, driverName string) string {
	t.Helper()
	var d string
	switch driverName {
	case "pgx":
		d = dsn("SQLRETRY_PG_DSN", defaultPG)
	case "mysql":
		d = dsn("SQLRETRY_MYSQL_DSN", defaultMySQL)
	}
	db, err := sql.Open(driverName, d)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = db.PingContext(ctx)
		cancel()
		db.Close()
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s database unreachable under CI=true: %v", driverName, err)
		}
		t.Skipf("%s database unreachable (set SQLRETRY_PG_DSN / SQLRETRY_MYSQL_DSN): %v", driverName, err)
	}
	return d
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
