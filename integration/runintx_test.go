package integration

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// placeholder returns the driver's n-th bind parameter.
func placeholder(driverName string, n int) string {
	if driverName == "pgx" {
		return fmt.Sprintf("$%d", n)
	}
	return "?"
}

// One RunInTx stuck behind a lock that a session outside sqlretry holds
// keeps replaying on its lock timeout (PostgreSQL 55P03, MariaDB 1205).
// That is one caller's trouble, not transactions colliding with each
// other: the other workers, who update only their own rows, keep at least
// 70% of the commits they make without the stuck caller, measured in the
// same test on the same db (issue 9 item 8: 721 fell to 72).
func TestPostgresStuckCallerDoesNotThrottleOthers(t *testing.T) { stuckCaller(t, "pgx") }
func TestMariaDBStuckCallerDoesNotThrottleOthers(t *testing.T)  { stuckCaller(t, "mysql") }

func stuckCaller(t *testing.T, driverName string) {
	d := need(t, driverName)
	outside, err := sql.Open(driverName, d)
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()
	tbl := table(t, outside, "stuck")
	mustExec(t, outside, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)")
	for i := range 9 {
		mustExec(t, outside, fmt.Sprintf("INSERT INTO %s VALUES (%d, 0)", tbl, i))
	}
	const workers = 8
	phase := 3 * time.Second
	lockTimeout := "SET LOCAL lock_timeout = '500ms'"
	if driverName == "mysql" {
		phase = 3 * time.Second // the lock wait timeout is at least a second
		lockTimeout = "SET SESSION innodb_lock_wait_timeout = 1"
	}
	// Each worker thinks between its transactions, as a request handler
	// does: the stuck caller's lost time then outweighs their work.
	think := func(ctx context.Context) {
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	update := "UPDATE " + tbl + " SET n = n + 1 WHERE id = " + placeholder(driverName, 1)

	// Each phase runs on a *sql.DB of its own: the same start for both.
	run := func(stuck bool) (commits, stuckRuns int64, s sqlretry.Stats, stuckErr error) {
		db, err := sqlretry.Open(driverName, d)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), phase)
		defer cancel()
		var wg sync.WaitGroup
		if stuck {
			// The batch session holds row 0 for longer than the phase.
			batch, err := outside.BeginTx(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer batch.Rollback()
			if _, err := batch.Exec(update, 0); err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				stuckErr = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					atomic.AddInt64(&stuckRuns, 1)
					if _, err := tx.ExecContext(ctx, lockTimeout); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, update, 0)
					return err
				})
			}()
		}
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						_, err := tx.ExecContext(ctx, update, 1+w)
						return err
					})
					if err == nil {
						atomic.AddInt64(&commits, 1)
					} else if dl, _ := ctx.Deadline(); ctx.Err() == nil && time.Now().Before(dl) {
						// A dial at the phase's end fails at its deadline
						// ("i/o timeout") a little before the context's
						// timer marks it done: that is the phase ending.
						t.Errorf("worker %d: %v", w, err)
						return
					}
					think(ctx)
				}
			}()
		}
		wg.Wait()
		s, _ = sqlretry.StatsOf(db)
		return commits, stuckRuns, s, stuckErr
	}
	// The machine is shared: a round whose baseline was lucky proves
	// nothing. Throttling by contention control is systematic (22% and
	// 35% of the rate before the fix) and fails every round.
	for round := 1; ; round++ {
		base, _, _, _ := run(false)
		withStuck, stuckRuns, s, stuckErr := run(true)
		ratio := float64(withStuck) / float64(base)
		t.Logf("round %d: commits in %v: %d alone, %d beside the stuck caller (%.0f%%); the stuck caller ran %d times and got %v; stats %+v",
			round, phase, base, withStuck, 100*ratio, stuckRuns, stuckErr, s)
		if stuckRuns < 2 {
			t.Fatalf("the stuck caller ran %d times: its lock timeout was not provoked", stuckRuns)
		}
		if stuckErr == nil {
			t.Fatal("the stuck caller committed: the batch session's lock did not hold")
		}
		if s.ContentionCuts != 0 {
			t.Fatalf("contention control cut the concurrency %d times for one stuck caller", s.ContentionCuts)
		}
		if ratio >= 0.7 {
			return
		}
		if round == 3 {
			t.Fatalf("the others made %d commits beside the stuck caller, %.0f%% of the %d they make alone; want at least 70%%",
				withStuck, 100*ratio, base)
		}
	}
}

// On PostgreSQL any error aborts the transaction: after a swallowed
// error the closure meets 25P02, or COMMIT turns into a rollback. The
// first error decides: a permanent one is returned after one run (it was
// 30 replays over 9-12 s, issue 9 item 10).
func TestPostgresFirstErrorDecides(t *testing.T) {
	db, err := sqlretry.Open("pgx", need(t, "pgx"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, db, "firsterr")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL CHECK (n < 100))", "INSERT INTO "+tbl+" VALUES (1, 0)")
	for _, tc := range []struct{ name, failing, code string }{
		{"unique violation", "INSERT INTO " + tbl + " VALUES (1, 0)", "23505"},
		{"check violation", "UPDATE " + tbl + " SET n = 1000 WHERE id = 1", "23514"},
		{"division by zero", "SELECT 1/0", "22012"},
		{"undefined column", "SELECT nope FROM " + tbl, "42703"},
	} {
		for _, then := range []string{"goes on and returns the 25P02", "commits"} {
			t.Run(tc.name+", "+then, func(t *testing.T) {
				runs := 0
				start := time.Now()
				err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					runs++
					tx.ExecContext(ctx, tc.failing) // swallowed
					if then == "commits" {
						return nil
					}
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
					if pgCode(err) != "25P02" {
						t.Errorf("the statement after the error got %v, want 25P02", err)
					}
					return err
				})
				if runs != 1 || pgCode(err) != tc.code {
					t.Errorf("runs = %d in %v, err = %v; want one run and SQLSTATE %s", runs, time.Since(start), err, tc.code)
				}
			})
		}
	}
}

// Only errors the database raised in the attempt are replay causes: a
// closure's own error (a truncated JSON input, a failed HTTP call) comes
// back unchanged after one run (it was 30 runs, issue 9 item 11); the
// database's error wrapped by the closure is still replayed.
func TestPostgresClosureErrorsAreNotReplayed(t *testing.T) { closureErrors(t, "pgx") }
func TestMariaDBClosureErrorsAreNotReplayed(t *testing.T)  { closureErrors(t, "mysql") }

func closureErrors(t *testing.T, driverName string) {
	db, err := sqlretry.Open(driverName, need(t, driverName))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, db, "ownerr")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	// A real HTTP call to a port nothing listens on.
	_, httpErr := (&http.Client{Timeout: time.Second}).Get("http://127.0.0.1:1/")
	if httpErr == nil {
		t.Fatal("the HTTP call succeeded")
	}
	var jsonErr error
	var v map[string]any
	if jsonErr = json.NewDecoder(strings.NewReader(`{"order": 1`)).Decode(&v); jsonErr == nil {
		t.Fatal("truncated JSON decoded")
	}
	for name, own := range map[string]error{"truncated JSON": jsonErr, "HTTP call": httpErr, "wrapped": fmt.Errorf("order 7: %w", jsonErr)} {
		t.Run(name, func(t *testing.T) {
			runs := 0
			err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
					return err
				}
				return own
			})
			if runs != 1 || err != own {
				t.Errorf("runs = %d, err = %v; want one run and the closure's error unchanged", runs, err)
			}
		})
	}
	t.Run("the database's deadlock, wrapped", func(t *testing.T) {
		q := "UPDATE " + tbl + " SET n = n + " + placeholder(driverName, 1) + " WHERE id = " + placeholder(driverName, 2)
		mustExec(t, db, "INSERT INTO "+tbl+" VALUES (2, 0)")
		errs := twoWay(t, db, nil,
			func(ctx context.Context, tx *sql.Tx, who int) error {
				_, err := tx.ExecContext(ctx, q, 1, 1+who)
				return err
			},
			func(ctx context.Context, tx *sql.Tx, who int) error {
				if _, err := tx.ExecContext(ctx, q, 1, 2-who); err != nil {
					return fmt.Errorf("transfer %d: %w", who, err)
				}
				return nil
			})
		if errs[0] != nil || errs[1] != nil {
			t.Fatalf("RunInTx surfaced errors: %v", errs)
		}
		if s, _ := sqlretry.StatsOf(db); s.RetriesTransaction < 1 {
			t.Error("no transaction was replayed: the deadlock was not provoked")
		}
	})
}

// A closure that always outlives idle_in_transaction_session_timeout (or
// a statement timeout the caller's rules make retryable) fails the same
// way every time: it is replayed once at most, not 30 times over ~20 s
// (issue 9 item 13).
func TestPostgresRepeatedTimeoutStops(t *testing.T) {
	d := need(t, "pgx")
	for _, tc := range []struct {
		name, set, then, code string
		opts                  []sqlretry.Option
	}{
		{"idle in transaction", "SET LOCAL idle_in_transaction_session_timeout = '100ms'", "SELECT 1", "25P03", nil},
		{"statement timeout made retryable", "SET LOCAL statement_timeout = '50ms'", "SELECT pg_sleep(0.3)", "57014",
			[]sqlretry.Option{sqlretry.WithClassifier(func(err error) (sqlretry.Class, bool) {
				return sqlretry.RetryStatement, pgCode(err) == "57014"
			})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, err := sqlretry.Open("pgx", d, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			runs := 0
			start := time.Now()
			err = sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs++
				if _, err := tx.ExecContext(ctx, tc.set); err != nil {
					return err
				}
				time.Sleep(300 * time.Millisecond) // the closure's slow work
				_, err := tx.ExecContext(ctx, tc.then)
				return err
			})
			t.Logf("runs = %d in %v, err = %v", runs, time.Since(start), err)
			if pgCode(err) != tc.code {
				t.Errorf("err = %v, want SQLSTATE %s", err, tc.code)
			}
			if runs > 2 {
				t.Errorf("the same timeout was replayed %d times", runs-1)
			}
		})
	}
}
