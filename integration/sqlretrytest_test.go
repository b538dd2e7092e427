package integration

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/sqlretrytest"
)

// The test kit (package sqlretrytest, issue 12) on real servers through
// both drivers: the replay checker finds a closure that mails from inside
// the transaction and passes one that writes an outbox row; the injector's
// faults, lost COMMIT replies included, are met as the real ones (no write
// lost or doubled); sqlretry's own queries (the transaction id before
// COMMIT, the commit marker) are neither counted nor failed.

// ph is the driver's placeholder for the nth argument.
func ph(driverName string, n int) string {
	if driverName == "pgx" {
		return fmt.Sprintf("$%d", n)
	}
	return "?"
}

// kitOptions: the commit marker on MySQL, so that lost COMMITs resolve
// there too.
func kitOptions(t *testing.T, driverName string, plain *sql.DB) []sqlretry.Option {
	if driverName != "mysql" {
		return nil
	}
	return []sqlretry.Option{sqlretry.WithMySQLCommitMarker(table(t, plain, "kit_marker"))}
}

func TestSqlretrytestReplayCheck(t *testing.T) {
	for _, driverName := range []string{"pgx", "mysql"} {
		t.Run(driverName, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			dsn := need(t, driverName)
			connector, err := sqlretrytest.OpenConnector(driverName, dsn)
			if err != nil {
				t.Fatal(err)
			}
			plain := sql.OpenDB(connector)
			defer plain.Close()
			orders, outbox := table(t, plain, "kit_orders"), table(t, plain, "kit_outbox")
			mustExec(t, plain,
				"CREATE TABLE "+orders+" (id INT PRIMARY KEY, state VARCHAR(20) NOT NULL)",
				"CREATE TABLE "+outbox+" (id INT PRIMARY KEY, msg VARCHAR(60) NOT NULL)")
			var mailed []string
			check := sqlretrytest.ReplayCheck{
				Connector: connector,
				Options:   kitOptions(t, driverName, plain),
				Reset: func(ctx context.Context, db *sql.DB) error {
					mailed = nil
					for _, q := range []string{"DELETE FROM " + orders, "DELETE FROM " + outbox} {
						if _, err := db.ExecContext(ctx, q); err != nil {
							return err
						}
					}
					return nil
				},
				Rows: []string{"SELECT id, state FROM " + orders + " ORDER BY id", "SELECT id, msg FROM " + outbox + " ORDER BY id"},
			}
			check.SideEffect("mail", func() any { return append([]string(nil), mailed...) })
			insert := "INSERT INTO " + orders + " (id, state) VALUES (1, " + ph(driverName, 1) + ")"
			update := "UPDATE " + orders + " SET state = " + ph(driverName, 1) + " WHERE id = 1"

			unsafe := func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, insert, "paid"); err != nil {
					return err
				}
				mailed = append(mailed, "receipt 1")
				_, err := tx.ExecContext(ctx, update, "shipped")
				return err
			}
			began := time.Now()
			report, err := check.Run(ctx, unsafe)
			t.Logf("unsafe closure: %v", time.Since(began).Round(time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			t.Log(report)
			// Three points (two statements and the COMMIT): sqlretry's own
			// queries before COMMIT are not among them.
			if report.Points != 3 || len(report.Differences) != 2 ||
				report.Differences[0].Point != 2 || report.Differences[1].Statement != "COMMIT" ||
				report.Differences[0].What != "side effect mail" {
				t.Errorf("unsafe closure: %v", report)
			}

			safe := func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, insert, "paid"); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+outbox+" (id, msg) VALUES (1, "+ph(driverName, 1)+")", "receipt 1"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, update, "shipped")
				return err
			}
			for _, f := range []sqlretrytest.Fault{sqlretrytest.Deadlock, sqlretrytest.SerializationFailure, sqlretrytest.ConnectionLost} {
				check.Fault = f
				began := time.Now()
				report, err := check.Run(ctx, safe)
				t.Logf("safe closure, %v: %v", f, time.Since(began).Round(time.Millisecond))
				if err != nil {
					t.Fatal(err)
				}
				if !report.OK() || report.Points != 4 {
					t.Errorf("safe closure, %v: %v", f, report)
				}
			}
		})
	}
}

// TestSqlretrytestInjectorFaults: a random share of statements and
// COMMITs meets every fault, lost COMMIT replies included; each of the
// transactions adds one to a counter, and the counter ends exactly at
// their number: nothing lost, nothing doubled.
func TestSqlretrytestInjectorFaults(t *testing.T) {
	for _, driverName := range []string{"pgx", "mysql"} {
		t.Run(driverName, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			connector, err := sqlretrytest.OpenConnector(driverName, need(t, driverName))
			if err != nil {
				t.Fatal(err)
			}
			plain := sql.OpenDB(connector)
			defer plain.Close()
			counter := table(t, plain, "kit_counter")
			mustExec(t, plain, "CREATE TABLE "+counter+" (id INT PRIMARY KEY, n INT NOT NULL)",
				"INSERT INTO "+counter+" VALUES (1, 0)")

			clock := sqlretrytest.NewClock(time.Time{})
			clock.SetAutoAdvance(true) // backoffs take no real time
			inj := sqlretrytest.NewInjector(connector, sqlretrytest.FailRandom(0.25, 12))
			opts := append(kitOptions(t, driverName, plain), sqlretry.WithClock(clock), sqlretry.WithoutBreaker(), sqlretry.WithoutBudget(),
				sqlretry.WithMaxAttempts(20))
			db := sqlretry.OpenDB(inj, opts...)
			defer db.Close()

			const txs = 40
			for i := 0; i < txs; i++ {
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					var n int
					if err := tx.QueryRowContext(ctx, "SELECT n FROM "+counter+" WHERE id = 1").Scan(&n); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "UPDATE "+counter+" SET n = "+ph(driverName, 1)+" WHERE id = 1", n+1)
					return err
				})
				if err != nil {
					t.Fatalf("transaction %d: %v", i, err)
				}
			}
			var n int
			if err := plain.QueryRowContext(ctx, "SELECT n FROM "+counter+" WHERE id = 1").Scan(&n); err != nil {
				t.Fatal(err)
			}
			kinds := map[sqlretrytest.Fault]int{}
			for _, f := range inj.Injected() {
				kinds[f.Fault]++
				if strings.Contains(f.Statement.Query, "pg_is_in_recovery") || strings.Contains(f.Statement.Query, "kit_marker") {
					t.Errorf("sqlretry's own query was failed: %q", f.Statement.Query)
				}
			}
			st, _ := sqlretry.StatsOf(db)
			t.Logf("%d faults %v; %d replays, %d lost COMMITs resolved", len(inj.Injected()), kinds, st.RetriesTransaction, st.CommitsResolved)
			if n != txs {
				t.Fatalf("counter %d after %d transactions", n, txs)
			}
			if kinds[sqlretrytest.CommitReplyLost] == 0 || kinds[sqlretrytest.ConnectionLost] == 0 || kinds[sqlretrytest.Deadlock] == 0 {
				t.Errorf("not every fault was met: %v (change the seed)", kinds)
			}
			if st.CommitsResolved == 0 {
				t.Error("no lost COMMIT was resolved")
			}
		})
	}
}
