package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// Short lock waits (shortwait.go in the root package), on a real
// PostgreSQL: what the replays' lock_timeout is, that the user's settings
// win, that nothing outlives the transaction, that cycles between replicas
// break well before deadlock_timeout, and that a caller behind a session
// holding its row for seconds still commits.

// replayOnce runs a RunInTx whose first attempt meets a lock held by
// another session (FOR UPDATE NOWAIT: 55P03, a conflict sqlretry replays);
// then() runs in the replay, in the transaction, after before().
func replayOnce(t *testing.T, db *sql.DB, tbl string, before string, then func(ctx context.Context, tx *sql.Tx) error) error {
	t.Helper()
	return replayOnceOn(t, need(t, "pgx"), db, tbl, before, then)
}

// replayOnceOn is replayOnce with the holder's session on the server at
// dsn.
func replayOnceOn(t *testing.T, dsn string, db *sql.DB, tbl string, before string, then func(ctx context.Context, tx *sql.Tx) error) error {
	t.Helper()
	holder, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	hold, err := holder.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback()
	if _, err := hold.Exec("SELECT 1 FROM " + tbl + " WHERE id = 1 FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	runs := 0
	err = sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if runs == 1 {
			_, err := tx.ExecContext(ctx, "SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE NOWAIT")
			hold.Rollback() // the replay finds the row free
			return err
		}
		if before != "" {
			if _, err := tx.ExecContext(ctx, before); err != nil {
				return err
			}
		}
		return then(ctx, tx)
	})
	want := 2
	if strings.Contains(before, "lock_timeout") {
		want = 3 // a bounded attempt that touched the setting runs again unbounded
	}
	if runs != want {
		t.Fatalf("closure ran %d times, want %d (err %v)", runs, want, err)
	}
	return err
}

func TestPostgresShortLockWaitKeepsTheUsersSettings(t *testing.T) {
	d := need(t, "pgx")
	setup, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer setup.Close()
	tbl := table(t, setup, "shortwait")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	view := settingsView(t, setup)
	for _, tc := range []struct {
		name, session, local, want string
	}{
		{"no setting", "0", "", "20ms"},
		{"a lower one of the session's is kept", "5ms", "", "5ms"},
		{"a higher one of the session's is lowered for the transaction", "10s", "", "20ms"},
		{"the closure's SET LOCAL wins", "0", "SET LOCAL lock_timeout = '3s'", "3s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, err := sqlretry.Open("pgx", d, sqlretry.WithShortLockWait(true)) // a new db: no commit measured yet, the bound is the floor
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			db.SetMaxOpenConns(1) // one session: its setting is the session's
			mustExec(t, db, "SET lock_timeout = '"+tc.session+"'")
			var inTx string
			err = replayOnce(t, db, tbl, tc.local, func(ctx context.Context, tx *sql.Tx) error {
				return tx.QueryRowContext(ctx, "SELECT lt FROM "+view).Scan(&inTx)
			})
			if err != nil {
				t.Fatal(err)
			}
			if inTx != tc.want {
				t.Errorf("lock_timeout in the replay %q, want %q", inTx, tc.want)
			}
			var after string
			if err := db.QueryRow("SHOW lock_timeout").Scan(&after); err != nil {
				t.Fatal(err)
			}
			if after != tc.session {
				t.Errorf("lock_timeout after the transaction %q, want the session's %q", after, tc.session)
			}
		})
	}
}

// Short deadlock checks (the default): the replay's deadlock_timeout is
// the bound where the role may set it (a superuser, or one granted SET ON
// PARAMETER deadlock_timeout), its lock_timeout untouched, nothing
// outlives the transaction; a role that may not set it gets the server's,
// and no error.
func TestPostgresShortDeadlockCheckSetting(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	admin := openPlain(t, srv.DSN)
	mustExec(t, admin,
		"CREATE TABLE dl (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO dl VALUES (1, 0)",
		"CREATE ROLE plainrole LOGIN", "CREATE ROLE granted LOGIN",
		"GRANT SELECT, UPDATE ON dl TO plainrole, granted",
		"GRANT SET ON PARAMETER deadlock_timeout TO granted")
	view := settingsView(t, admin)
	cfg, err := pgx.ParseConfig(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		user, want string
	}{
		{"", "20ms"}, // the server's superuser
		{"granted", "20ms"},
		{"plainrole", "1s"},
	} {
		t.Run("role "+tc.user, func(t *testing.T) {
			c := cfg.Copy()
			if tc.user != "" {
				c.User = tc.user
			}
			db := sqlretry.OpenDB(stdlib.GetConnector(*c))
			defer db.Close()
			db.SetMaxOpenConns(1)
			for round := range 2 { // the second: a db that learned the role may not
				var dt, lt string
				err := replayOnceOn(t, srv.DSN, db, "dl", "", func(ctx context.Context, tx *sql.Tx) error {
					if err := tx.QueryRowContext(ctx, "SELECT dt, lt FROM "+view).Scan(&dt, &lt); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "UPDATE dl SET n = n + 1 WHERE id = 1")
					return err
				})
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				// The bound is 4x a recent commit, at least 20 ms, on the
				// 20/40/80... ms grid: a commit over 5 ms on a loaded
				// machine makes it 40 ms (a CI rehearsal). Any bound under
				// the server's 1s is the feature at work.
				ok := dt == tc.want
				if tc.want == "20ms" {
					switch dt {
					case "20ms", "40ms", "80ms", "160ms", "320ms", "640ms":
						ok = true
					}
				}
				if !ok || lt != "0" {
					t.Errorf("round %d: the replay's deadlock_timeout %q, lock_timeout %q; want %q (or another bound under 1s) and \"0\"", round, dt, lt, tc.want)
				}
				var after string
				if err := db.QueryRow("SHOW deadlock_timeout").Scan(&after); err != nil {
					t.Fatal(err)
				}
				if after != "1s" {
					t.Errorf("deadlock_timeout after the transaction %q, want the session's 1s", after)
				}
			}
		})
	}
	var n int
	if err := admin.QueryRow("SELECT n FROM dl WHERE id = 1").Scan(&n); err != nil || n != 6 {
		t.Fatalf("n = %d (%v), want 6: one update per replay", n, err)
	}
}

// Two replicas (two *sql.DB) transfer in opposite directions so that each
// round deadlocks. PostgreSQL finds each deadlock after deadlock_timeout
// (1 s); with short lock waits, or with short deadlock checks (the
// default; the test's role may set deadlock_timeout), only the first round
// costs that, and the rounds after it (the db that met the deadlock bounds
// its waits) break within a fraction of it.
func TestPostgresShortLockWaitBreaksReplicaDeadlocks(t *testing.T) {
	d := need(t, "pgx")
	setup, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer setup.Close()
	tbl := table(t, setup, "shortwait_cycle")
	mustExec(t, setup, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
	const rounds = 6
	run := func(t *testing.T, opts ...sqlretry.Option) (median time.Duration) {
		var dbs [2]*sql.DB
		for i := range dbs {
			db, err := sqlretry.Open("pgx", d, append([]sqlretry.Option{sqlretry.WithShortLockWait(true)}, opts...)...)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			dbs[i] = db
		}
		var took []time.Duration
		for range rounds {
			locked := [2]chan struct{}{make(chan struct{}), make(chan struct{})}
			var wg sync.WaitGroup
			var errs [2]error
			start := time.Now()
			for i := range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					first, second := 1+i, 2-i
					runs := 0
					errs[i] = sqlretry.RunInTx(context.Background(), dbs[i], nil, func(ctx context.Context, tx *sql.Tx) error {
						runs++
						if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = $1", first); err != nil {
							return err
						}
						if runs == 1 {
							close(locked[i])
							select { // both hold their first row: the second UPDATEs close a cycle
							case <-locked[1-i]:
							case <-time.After(2 * time.Second):
							}
						}
						_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = $1", second)
						return err
					})
				}()
			}
			wg.Wait()
			took = append(took, time.Since(start))
			for i, err := range errs {
				if err != nil {
					t.Fatalf("replica %d: %v", i, err)
				}
			}
		}
		t.Logf("rounds took %v", took)
		later := append([]time.Duration(nil), took[1:]...)
		sort.Slice(later, func(i, j int) bool { return later[i] < later[j] })
		return later[len(later)/2]
	}
	var on, checks, off time.Duration
	t.Run("short waits", func(t *testing.T) { on = run(t) })
	t.Run("short deadlock checks (the default)", func(t *testing.T) { checks = run(t, sqlretry.WithShortLockWait(false)) })
	t.Run("without", func(t *testing.T) {
		off = run(t, sqlretry.WithShortLockWait(false), sqlretry.WithShortDeadlockCheck(false))
	})
	var a, b int
	if err := setup.QueryRow("SELECT (SELECT n FROM "+tbl+" WHERE id = 1), (SELECT n FROM "+tbl+" WHERE id = 2)").Scan(&a, &b); err != nil {
		t.Fatal(err)
	}
	if want := 3 * 2 * rounds; a != want || b != want {
		t.Errorf("rows %d and %d, want %d each: a lost or doubled update", a, b, want)
	}
	t.Logf("median of rounds 2-%d: %v with short waits, %v with short deadlock checks, %v without", rounds, on, checks, off)
	if off < 800*time.Millisecond {
		t.Errorf("without short waits the rounds took %v: the test did not make deadlocks", off)
	}
	if on > 400*time.Millisecond {
		t.Errorf("with short waits the rounds took %v, want well under deadlock_timeout", on)
	}
	if checks > 400*time.Millisecond {
		t.Errorf("with short deadlock checks the rounds took %v, want well under deadlock_timeout", checks)
	}
}

// A caller waiting behind a session that holds its row for seconds (a
// batch job) while its db bounds lock waits (it just met a deadlock)
// makes a few short attempts, then waits without a bound and commits when
// the holder lets go; the db's other callers go on meanwhile.
func TestPostgresShortLockWaitStuckCallerCommits(t *testing.T) {
	d := need(t, "pgx")
	outside, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()
	tbl := table(t, outside, "shortwait_stuck")
	mustExec(t, outside, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)")
	for i := range 12 {
		mustExec(t, outside, fmt.Sprintf("INSERT INTO %s VALUES (%d, 0)", tbl, i))
	}
	db, err := sqlretry.Open("pgx", d, sqlretry.WithShortLockWait(true))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	// A deadlock with an outside session: the db's transaction waits
	// first, so its deadlock check runs first and it is the victim.
	other, err := outside.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec("UPDATE " + tbl + " SET n = n + 1 WHERE id = 10"); err != nil {
		t.Fatal(err)
	}
	var victimRuns atomic.Int64
	var otherErr error
	var owg sync.WaitGroup
	owg.Add(1)
	go func() {
		defer owg.Done()
		time.Sleep(300 * time.Millisecond) // the db's transaction waits for row 10 by now
		_, otherErr = other.Exec("UPDATE " + tbl + " SET n = n + 1 WHERE id = 11")
		if otherErr == nil {
			otherErr = other.Commit()
		} else {
			other.Rollback()
		}
	}()
	err = sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		victimRuns.Add(1)
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 11"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 10")
		return err
	})
	owg.Wait()
	if err != nil {
		t.Fatalf("the deadlocked transaction: %v", err)
	}
	if otherErr != nil {
		t.Fatalf("the outside session was the deadlock's victim (%v): the db met no deadlock", otherErr)
	}
	if victimRuns.Load() < 2 {
		t.Fatalf("the db's transaction ran %d times: no deadlock", victimRuns.Load())
	}

	// Now the batch job holds row 0 for 3 s.
	const holdFor = 3 * time.Second
	batch, err := outside.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := batch.Exec("UPDATE " + tbl + " SET n = n + 1 WHERE id = 0"); err != nil {
		t.Fatal(err)
	}
	released := time.Now().Add(holdFor)
	time.AfterFunc(holdFor, func() { batch.Commit() })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var stop atomic.Bool
	var commits atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = $1", 1+w)
					return err
				})
				if err != nil {
					t.Errorf("worker %d: %v", w, err)
					return
				}
				commits.Add(1)
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	var runs int
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 0")
		return err
	})
	done := time.Now()
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatalf("the caller behind the batch job: %v", err)
	}
	t.Logf("the caller committed %v after the batch job let go (%v after it started), in %d attempts; the others committed %d transactions meanwhile",
		done.Sub(released).Round(time.Millisecond), done.Sub(start).Round(time.Millisecond), runs, commits.Load())
	if runs > 8 {
		t.Errorf("%d attempts behind the batch job, want a handful", runs)
	}
	if done.Sub(released) > 500*time.Millisecond {
		t.Errorf("committed %v after the batch job let go", done.Sub(released))
	}
	if commits.Load() < 50 {
		t.Errorf("the other callers committed %d transactions in %v", commits.Load(), holdFor)
	}
	var n int
	if err := outside.QueryRow("SELECT n FROM " + tbl + " WHERE id = 0").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("row 0 is %d, want 2 (the batch's and the caller's)", n)
	}
}

// settingsView creates a view that reads deadlock_timeout (dt) and
// lock_timeout (lt), for a closure to see the bound in force: a statement
// that names them (SHOW, current_setting) is the closure touching them,
// and sqlretry runs that attempt again unbounded (touchedRedo); a view's
// reads are out of its sight.
func settingsView(t *testing.T, admin *sql.DB) string {
	t.Helper()
	name := fmt.Sprintf("probe_%d", rand.Uint32())
	mustExec(t, admin, "CREATE VIEW "+name+" AS SELECT pg_catalog.current_setting('deadlock_timeout') AS dt, pg_catalog.current_setting('lock_timeout') AS lt",
		"GRANT SELECT ON "+name+" TO PUBLIC")
	t.Cleanup(func() { admin.Exec("DROP VIEW IF EXISTS " + name) })
	return name
}
