package integration

// Hostile tests (attack8) of short lock waits after today's change (a 55P03
// of sqlretry's own bound never reaches the caller; a user's lock_timeout
// stays theirs). Written from the README and the public API only.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

func a8Defects(t *testing.T) {
	t.Helper()
	if os.Getenv("ATTACK8_DEFECTS") != "1" {
		t.Skip("known defect; run with ATTACK8_DEFECTS=1")
	}
}

func a8Code(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// a8Engage makes one RunInTx of db meet a (raised) deadlock and commit on
// its replay: the db then bounds every attempt for 2 s.
func a8Engage(t *testing.T, ctx context.Context, db *sql.DB) {
	t.Helper()
	k := 0
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if k++; k == 1 {
			return a5FakeConflict(ctx, tx, "40P01")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// a8Stuck runs one RunInTx on a fresh db (shortWait on or off) whose first
// attempt meets a serialization failure, and whose closure then runs body
// against row 1 of a table a batch job holds for hold.
func a8Stuck(t *testing.T, on bool, hold, ctxd time.Duration, body func(ctx context.Context, tx *sql.Tx, tbl string) error, opts ...sqlretry.Option) (attempts int, n int, took time.Duration, err error) {
	t.Helper()
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4, append([]sqlretry.Option{sqlretry.WithShortLockWait(on)}, opts...)...)
	released := a5Holder(t, plain, tbl, 1, hold)
	ctx, cancel := context.WithTimeout(context.Background(), ctxd)
	defer cancel()
	var k atomic.Int32
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if k.Add(1) == 1 {
			return a5FakeConflict(ctx, tx, "40001")
		}
		return body(ctx, tx, tbl)
	})
	took = time.Since(start)
	<-released
	n = atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	return int(k.Load()), n, took, err
}

// A user who wants lock timeouts reported, not replayed (their own
// lock_timeout is how they bound waits), says so with WithClassifier:
// 55P03 is Permanent. sqlretry's own bound on a replay then ends in a
// 55P03 that this rule hands to the caller: a lock timeout nobody
// configured, after ~20-50 ms of waiting, where the same call without
// short waits (and the plain driver) waits 500 ms and commits.
func TestAttack8ClassifierPermanentLockTimeoutGetsOwnBound(t *testing.T) {
	perm := sqlretry.WithClassifier(func(err error) (sqlretry.Class, bool) {
		if a8Code(err) == "55P03" {
			return sqlretry.Permanent, true
		}
		return 0, false
	})
	upd := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	a0, n0, _, err0 := a8Stuck(t, false, 500*time.Millisecond, 10*time.Second, upd, perm)
	if err0 != nil || n0 != 1001 {
		t.Fatalf("without short waits: attempts %d n %d err %v", a0, n0, err0)
	}
	a, n, took, err := a8Stuck(t, true, 500*time.Millisecond, 10*time.Second, upd, perm)
	t.Logf("without short waits: committed on attempt %d; with: attempts %d n %d took %v ErrorCode %q err %v", a0, a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
	if err != nil || n != 1001 {
		a8Defects(t)
		t.Errorf("DEFECT: a classifier that makes 55P03 permanent got sqlretry's own short bound's 55P03 (nobody set lock_timeout): attempts %d, row %d (want 1001), after %v: %v", a, n, took.Round(time.Millisecond), err)
	}
}

// The same rule given to the db (WithClassifier on OpenDB) with the user's
// own lock_timeout of 2 s in the DSN: a 500 ms wait is within the user's
// bound, yet the call fails with a lock timeout after sqlretry's ~20 ms.
func TestAttack8ClassifierPermanentUsersHigherLockTimeoutIgnored(t *testing.T) {
	perm := sqlretry.WithClassifier(func(err error) (sqlretry.Class, bool) {
		if a8Code(err) == "55P03" {
			return sqlretry.Permanent, true
		}
		return 0, false
	})
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, a5WithParam(atkPG, "options=-c%20lock_timeout%3D2s"), 4, perm)
	ctx := a5Ctx(t, 15*time.Second)
	a8Engage(t, ctx, db) // another caller met a deadlock: the db bounds attempts for 2 s
	released := a5Holder(t, plain, tbl, 1, 500*time.Millisecond)
	var seen []string
	start := time.Now()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		s, _ := a5Setting(ctx, tx, "lock_timeout")
		seen = append(seen, s)
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	})
	took := time.Since(start)
	<-released
	n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	t.Logf("lock_timeout seen by attempts %v, row %d, took %v, ErrorCode %q, err %v", seen, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
	if err != nil || n != 1001 {
		a8Defects(t)
		t.Errorf("DEFECT: user's lock_timeout 2s (DSN), classifier: 55P03 permanent; a 500 ms row lock: got %v after %v (attempts saw lock_timeout %v), row %d; the plain driver waits and commits", err, took.Round(time.Millisecond), seen, n)
	}
}

// A closure that turns database errors into its own (fmt.Errorf with %v)
// meets sqlretry's own bound: RunInTx must still replay (the transaction's
// first error was the database's), and commit once after the holder lets
// go, as without short waits. Holds.
func TestAttack8ClosureOpaqueErrorOnOwnBound(t *testing.T) {
	opaque := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			return fmt.Errorf("update: %v", err)
		}
		return nil
	}
	for _, on := range []bool{false, true} {
		a, n, took, err := a8Stuck(t, on, 500*time.Millisecond, 10*time.Second, opaque)
		t.Logf("short waits %v: attempts %d row %d took %v err %v", on, a, n, took.Round(time.Millisecond), err)
		if err != nil || n != 1001 {
			t.Errorf("short waits %v: err %v row %d; want success, row 1001", on, err, n)
		}
	}
}

// The closure sets its own lock_timeout (SET LOCAL, 150 ms: above
// sqlretry's first bounds) and waits behind a row held for 3 s; the caller
// gives it 1 s. Every attempt after the first ends in the user's own
// 55P03, which must be what the give-up reports (as it is without short
// waits). It reports the serialization failure of attempt 1 instead: the
// user's lock timeouts were taken for sqlretry's own and dropped.
func TestAttack8ClosureSetLocalLockTimeoutHiddenAtDeadline(t *testing.T) {
	setLocal := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '150ms'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	// The same bound declared on a function (CREATE FUNCTION ... SET
	// lock_timeout), which the closure calls.
	fnSet := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		fn := tbl + "_upd"
		if _, err := tx.ExecContext(ctx, "CREATE OR REPLACE FUNCTION "+fn+"() RETURNS void LANGUAGE sql SET lock_timeout = '150ms' AS 'UPDATE "+tbl+" SET n = n + 1 WHERE id = 1'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "SELECT "+fn+"()")
		return err
	}
	for name, body := range map[string]func(context.Context, *sql.Tx, string) error{"set-local": setLocal, "function-set-clause": fnSet} {
		t.Run(name, func(t *testing.T) {
			a0, _, _, err0 := a8Stuck(t, false, 1500*time.Millisecond, time.Second, body)
			t.Logf("without short waits: attempts %d ErrorCode %q err %v", a0, sqlretry.ErrorCode(err0), err0)
			if a8Code(err0) != "55P03" {
				t.Fatalf("without short waits the user's 55P03 was not reported: %v", err0)
			}
			a, n, took, err := a8Stuck(t, true, 1500*time.Millisecond, time.Second, body)
			t.Logf("with short waits: attempts %d row %d took %v ErrorCode %q err %v", a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
			if n != 1000 {
				t.Errorf("row %d: a write went through a held lock?", n)
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("not the deadline: %v", err)
			}
			if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" {
				a8Defects(t)
				t.Errorf("DEFECT: the user's own lock_timeout=150ms (%s) ended %d attempts in 55P03, but the give-up reports errors.As code %q / ErrorCode %q: %v", name, a-1, a8Code(err), sqlretry.ErrorCode(err), err)
			}
		})
	}
}

// The user's own 55P03 must surface at a give-up in the other shapes too:
// a lower SET LOCAL (10 ms, below every bound), FOR UPDATE NOWAIT, a DSN
// lock_timeout above the first bounds, and stops by MaxAttempts,
// MaxElapsed and the caller's deadline. Holds.
func TestAttack8UsersOwn55P03Reported(t *testing.T) {
	setLocal := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '10ms'"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	nowait := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1 FOR UPDATE NOWAIT"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	upd := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	}
	type stop struct {
		ctxd time.Duration
		opts []sqlretry.Option
	}
	stops := map[string]stop{
		"deadline1s": {time.Second, nil},
		"maxatt3":    {10 * time.Second, []sqlretry.Option{sqlretry.WithMaxAttempts(3)}},
		"maxel300ms": {10 * time.Second, []sqlretry.Option{sqlretry.WithBackoff(sqlretry.Backoff{MaxElapsed: 300 * time.Millisecond})}},
	}
	bodies := map[string]func(context.Context, *sql.Tx, string) error{"setlocal10ms": setLocal, "nowait": nowait}
	for bn, b := range bodies {
		for sn, s := range stops {
			t.Run(bn+"/"+sn, func(t *testing.T) {
				a, n, took, err := a8Stuck(t, true, 1200*time.Millisecond, s.ctxd, b, s.opts...)
				t.Logf("attempts %d row %d took %v ErrorCode %q err %v", a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
				if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" || n != 1000 {
					t.Errorf("the user's own 55P03 not reported: row %d, %v", n, err)
				}
			})
		}
	}
	dsn := a5WithParam(atkPG, "options=-c%20lock_timeout%3D150ms")
	for sn, s := range stops {
		t.Run("dsn150ms/"+sn, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, dsn, 4)
			released := a5Holder(t, plain, tbl, 1, 1200*time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), s.ctxd)
			defer cancel()
			k := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a5FakeConflict(ctx, tx, "40001")
				}
				return upd(ctx, tx, tbl)
			}, s.opts...)
			<-released
			t.Logf("attempts %d ErrorCode %q err %v", k, sqlretry.ErrorCode(err), err)
			if a8Code(err) != "55P03" || sqlretry.ErrorCode(err) != "55P03" {
				t.Errorf("the user's own DSN lock_timeout's 55P03 not reported: %v", err)
			}
		})
	}
}

// A deadlock storm (6 callers of one db moving money between 4 accounts in
// random order) where every call has a tight deadline (50 ms to 2 s) and
// some a small MaxAttempts or MaxElapsed. Nobody set lock_timeout, so a
// 55P03 reaching a caller is sqlretry's own; every acknowledged transfer
// is in the ledger exactly once, nothing unacknowledged is (but an
// ErrAmbiguousCommit), and the money adds up.
func TestAttack8TightDeadlinesInADeadlockStorm(t *testing.T) {
	db := a5Open(t, atkPG, 8)
	plain := a5Plain(t, atkPG)
	acct := table(t, plain, "a8acct")
	ledger := table(t, plain, "a8ledger")
	mustExec(t, plain,
		"CREATE TABLE "+acct+" (id int PRIMARY KEY, bal bigint NOT NULL)",
		"INSERT INTO "+acct+" SELECT g, 0 FROM generate_series(1, 4) g",
		"CREATE TABLE "+ledger+" (tok text, src int)")
	stop := time.Now().Add(6 * time.Second)
	var mu sync.Mutex
	okToks := map[string]bool{}
	ambiguous := map[string]bool{}
	errs := map[string]int{}
	var bad []string
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				a, b := rand.IntN(4)+1, rand.IntN(3)+1
				if b >= a {
					b++
				}
				tok := fmt.Sprintf("g%d-%d", g, i)
				d := time.Duration(50+rand.IntN(1950)) * time.Millisecond
				var opts []sqlretry.Option
				switch rand.IntN(4) {
				case 1:
					opts = append(opts, sqlretry.WithMaxAttempts(2+rand.IntN(3)))
				case 2:
					opts = append(opts, sqlretry.WithBackoff(sqlretry.Backoff{MaxElapsed: time.Duration(20+rand.IntN(300)) * time.Millisecond}))
				}
				cctx, ccancel := context.WithTimeout(context.Background(), d)
				err := sqlretry.RunInTx(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal - 1 WHERE id = $1", a); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.002)"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal + 1 WHERE id = $1", b); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+ledger+" VALUES ($1, $2)", tok, a)
					return err
				}, opts...)
				ccancel()
				mu.Lock()
				switch {
				case err == nil:
					okToks[tok] = true
				case errors.Is(err, sqlretry.ErrAmbiguousCommit):
					ambiguous[tok] = true
					errs["ambiguous"]++
				default:
					k := a8Code(err)
					if k == "" && errors.Is(err, context.DeadlineExceeded) {
						k = "deadline"
					}
					if k == "" {
						k = err.Error()
					}
					if k == "55P03" || sqlretry.ErrorCode(err) == "55P03" {
						bad = append(bad, fmt.Sprintf("deadline %v opts %d: %v", d, len(opts), err))
					}
					errs[k]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	var sum int64
	if err := plain.QueryRow("SELECT COALESCE(SUM(bal), 0)::bigint FROM " + acct).Scan(&sum); err != nil {
		t.Fatal(err)
	}
	inDB := map[string]int{}
	rows, err := plain.Query("SELECT tok FROM " + ledger)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var tok string
		rows.Scan(&tok)
		inDB[tok]++
	}
	rows.Close()
	st, _ := sqlretry.StatsOf(db)
	t.Logf("ok=%d ledger=%d errors=%v stats=%+v", len(okToks), len(inDB), errs, st)
	if sum != 0 {
		t.Errorf("balances sum to %d", sum)
	}
	for tok, n := range inDB {
		if n > 1 {
			t.Errorf("transfer %s in the ledger %d times", tok, n)
		}
		if !okToks[tok] && !ambiguous[tok] {
			t.Errorf("transfer %s committed but its caller got an error", tok)
		}
	}
	for tok := range okToks {
		if inDB[tok] == 0 {
			t.Errorf("acknowledged transfer %s lost", tok)
		}
	}
	if len(bad) > 0 {
		t.Errorf("%d calls got a 55P03 nobody configured: %v", len(bad), bad)
	}
	for k, n := range errs {
		if k != "deadline" && k != "40P01" && k != "57014" && k != "ambiguous" {
			t.Errorf("%d calls got %q", n, k)
		}
	}
}

// a8Role makes a login role (superuser, so it may use the test's tables)
// whose own lock_timeout is lt (ALTER ROLE ... SET), and returns its DSN.
func a8Role(t *testing.T, plain *sql.DB, lt string) string {
	t.Helper()
	role := atkName("a8role")
	atkMust(t, plain, "CREATE ROLE "+role+" LOGIN SUPERUSER", "ALTER ROLE "+role+" SET lock_timeout = '"+lt+"'")
	t.Cleanup(func() { plain.Exec("DROP ROLE IF EXISTS " + role) })
	return "postgres://" + role + "@127.0.0.1:5432/test?sslmode=disable"
}

// The user bounds lock waits with their own lock_timeout of 2 s (the
// role's setting, or the DSN's) and handles its 55P03 in the closure the
// way PostgreSQL's docs suggest for NOWAIT-style work: a savepoint, and on
// a lock timeout "the row is busy, record that instead". A 400 ms row lock
// is well within their 2 s: the plain driver (and sqlretry without short
// waits) waits and updates the row. With short waits the replay's bound
// (20 ms, below the user's 2 s, so it replaces it) ends the wait, the
// closure takes its "busy" branch, and that outcome commits: a result the
// user's own settings never produce. "none-besteffort": nobody set
// lock_timeout and the step is best effort (any error of it is rolled
// back to its savepoint): the plain driver waits and updates; sqlretry's
// bound makes it skip the update and report success.
func TestAttack8UsersHigherLockTimeoutSavepointHandlerCommitsBusy(t *testing.T) {
	plain := atkPlain(t, "pgx")
	dsns := map[string]string{
		"role": a8Role(t, plain, "2s"),
		"dsn":  a5WithParam(atkPG, "options=-c%20lock_timeout%3D2s"),
		// Nobody set lock_timeout; the step is best effort: any error of
		// it is rolled back to the savepoint and the rest commits.
		"none-besteffort": atkPG,
	}
	for name, dsn := range dsns {
		t.Run(name, func(t *testing.T) {
			got := map[bool]string{}
			for _, on := range []bool{false, true} {
				tbl := a5Table(t, plain, 2)
				busy := table(t, plain, "a8busy")
				mustExec(t, plain, "CREATE TABLE "+busy+" (attempt int)")
				db := a5Open(t, dsn, 4, sqlretry.WithShortLockWait(on))
				ctx := a5Ctx(t, 15*time.Second)
				if s, err := a5Setting(ctx, db, "lock_timeout"); err != nil || (s != "2s") != (name == "none-besteffort") {
					t.Fatalf("the user's lock_timeout did not apply: %q %v", s, err)
				}
				released := a5Holder(t, plain, tbl, 1, 400*time.Millisecond)
				k := 0
				var seen []string
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					k++
					s, _ := a5Setting(ctx, tx, "lock_timeout")
					seen = append(seen, s)
					if k == 1 {
						return a5FakeConflict(ctx, tx, "40001")
					}
					if _, err := tx.ExecContext(ctx, "SAVEPOINT upd"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
					if a8Code(err) == "55P03" || (err != nil && name == "none-besteffort") {
						if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT upd"); err != nil {
							return err
						}
						_, err = tx.ExecContext(ctx, "INSERT INTO "+busy+" VALUES ($1)", k)
						return err
					}
					return err
				})
				<-released
				row := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
				nb := atkCount(t, plain, "SELECT COUNT(*) FROM "+busy)
				got[on] = fmt.Sprintf("err=%v row=%d busy=%d attempts=%d lock_timeout seen %v", err, row, nb, k, seen)
				t.Logf("short waits %v: %s", on, got[on])
				if !on && (err != nil || row != 1001 || nb != 0) {
					t.Fatalf("without short waits: %s", got[on])
				}
				if on && (err != nil || row != 1001 || nb != 0) {
					a8Defects(t)
					t.Errorf("DEFECT: the user's own lock_timeout of 2s (%s) was replaced by sqlretry's bound, and the closure's lock-timeout handler committed the 'busy' outcome: %s; without short waits: %s", name, got[on], got[false])
				}
			}
		})
	}
}

// Right after a deadlock (the db bounds every attempt for 2 s), callers
// with tight deadlines (50 ms to 1 s) wait behind a row a batch job holds
// for 2 s. Nobody set lock_timeout: each must end with the deadline, as
// with the plain driver, and no 55P03 anywhere in the error. Holds.
func TestAttack8TightDeadlineBehindHolderAfterDeadlock(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4)
	for _, d := range []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, time.Second} {
		for _, max := range []int{0, 2} {
			t.Run(fmt.Sprintf("%v/max%d", d, max), func(t *testing.T) {
				a8Engage(t, a5Ctx(t, 5*time.Second), db)
				released := a5Holder(t, plain, tbl, 1, 1500*time.Millisecond)
				defer func() { <-released }()
				var opts []sqlretry.Option
				if max > 0 {
					opts = append(opts, sqlretry.WithMaxAttempts(max))
				}
				ctx, cancel := context.WithTimeout(context.Background(), d)
				defer cancel()
				k := 0
				start := time.Now()
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					k++
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
					return err
				}, opts...)
				took := time.Since(start)
				t.Logf("attempts %d took %v ErrorCode %q err %v", k, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
				if !errors.Is(err, context.DeadlineExceeded) || a8Code(err) == "55P03" || sqlretry.ErrorCode(err) == "55P03" {
					t.Errorf("want the deadline and no 55P03: %v", err)
				}
				if took > d+300*time.Millisecond {
					t.Errorf("returned %v after a %v deadline", took, d)
				}
			})
		}
	}
	if n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"); n != 10000 {
		t.Logf("row %d", n)
	}
}

// The same on the server side: a PL/pgSQL function the closure calls
// catches the lock timeout and records "busy" (and the error's text).
// sqlretry sees no error at all: its bound made the function take a
// branch the user's settings never take here. "lock_not_available": the
// user's own lock_timeout is 2 s (DSN). "others": nobody set lock_timeout
// at all, and the function has the common catch-all "EXCEPTION WHEN
// OTHERS THEN log it": it commits a lock timeout in its log.
func TestAttack8PlpgsqlHandlerCommitsBusy(t *testing.T) {
	plain := atkPlain(t, "pgx")
	for _, c := range []struct {
		name, cond, dsn string
		engaged         bool
	}{
		{"lock_not_available", "lock_not_available", a5WithParam(atkPG, "options=-c%20lock_timeout%3D2s"), false},
		{"others", "OTHERS", atkPG, false},
		// No conflict of its own: another caller of the db met a deadlock
		// just before, so this call's first attempt is bounded.
		{"others-engaged", "OTHERS", atkPG, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := map[bool]string{}
			for _, on := range []bool{false, true} {
				tbl := a5Table(t, plain, 2)
				busy := tbl + "_busy"
				fn := tbl + "_f"
				atkMust(t, plain, "CREATE TABLE "+busy+" (id int, msg text)",
					"CREATE FUNCTION "+fn+"(k int) RETURNS text LANGUAGE plpgsql AS $$BEGIN UPDATE "+tbl+" SET n = n + 1 WHERE id = k; RETURN 'done'; EXCEPTION WHEN "+c.cond+" THEN INSERT INTO "+busy+" VALUES (k, SQLSTATE || ' ' || SQLERRM); RETURN 'busy'; END$$")
				t.Cleanup(func() {
					plain.Exec("DROP FUNCTION IF EXISTS " + fn + "(int)")
					plain.Exec("DROP TABLE IF EXISTS " + busy)
				})
				db := a5Open(t, c.dsn, 4, sqlretry.WithShortLockWait(on))
				ctx := a5Ctx(t, 15*time.Second)
				if c.engaged {
					a8Engage(t, ctx, db)
				}
				released := a5Holder(t, plain, tbl, 1, 400*time.Millisecond)
				k := 0
				var res string
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					if k++; k == 1 && !c.engaged {
						return a5FakeConflict(ctx, tx, "40P01")
					}
					return tx.QueryRowContext(ctx, "SELECT "+fn+"(1)").Scan(&res)
				})
				<-released
				row := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
				var msg string
				plain.QueryRow("SELECT COALESCE(string_agg(msg, '; '), '') FROM " + busy).Scan(&msg)
				got[on] = fmt.Sprintf("err=%v function said %q row=%d logged %q attempts=%d", err, res, row, msg, k)
				t.Logf("short waits %v: %s", on, got[on])
				if !on && (err != nil || row != 1001 || msg != "") {
					t.Fatalf("without short waits: %s", got[on])
				}
				if on && (err != nil || row != 1001 || msg != "") {
					a8Defects(t)
					t.Errorf("DEFECT: sqlretry's bound made the function's EXCEPTION WHEN %s handler commit its 'busy' branch: %s; without short waits: %s", c.cond, got[on], got[false])
				}
			}
		})
	}
}

// A nested RunInTx (its own connection) inside an outer attempt that
// nothing would replay (NoRetry, MaxAttempts 1, the last of 2), right
// after another caller's deadlock: the inner must not be bounded, since
// its replay would be the outer's and the outer has none left. It waits
// 400 ms behind a batch job and commits, as with the plain driver. Holds.
func TestAttack8NestedInAnUnreplayableOuterAfterDeadlock(t *testing.T) {
	for _, mode := range []string{"noretry", "maxatt1", "maxatt2last"} {
		t.Run(mode, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, atkPG, 4)
			ctx := a5Ctx(t, 15*time.Second)
			a8Engage(t, ctx, db)
			released := a5Holder(t, plain, tbl, 1, 400*time.Millisecond)
			cctx := ctx
			var opts []sqlretry.Option
			switch mode {
			case "noretry":
				cctx = sqlretry.NoRetry(ctx)
			case "maxatt1":
				opts = append(opts, sqlretry.WithMaxAttempts(1))
			case "maxatt2last":
				opts = append(opts, sqlretry.WithMaxAttempts(2))
			}
			var outer, inner atomic.Int32
			var lt string
			err := sqlretry.RunInTx(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if outer.Add(1) == 1 && mode == "maxatt2last" {
					return a5FakeConflict(ctx, tx, "40001")
				}
				if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 2"); err != nil {
					return err
				}
				return sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
					inner.Add(1)
					lt, _ = a5Setting(ctx, tx2, "lock_timeout")
					_, err := tx2.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
					return err
				})
			}, opts...)
			<-released
			r1 := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
			r2 := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 2")
			t.Logf("outer %d inner %d (lock_timeout %s) rows %d %d err %v", outer.Load(), inner.Load(), lt, r1, r2, err)
			if err != nil || r1 != 1001 || r2 != 1 {
				t.Errorf("err %v rows %d %d; want success, 1001 and 1", err, r1, r2)
			}
		})
	}
}

// The user's statement_timeout (100 ms, DSN) ends a wait behind a 2 s
// batch job: the caller gets 57014 as from the plain driver, never a
// 55P03 of sqlretry's bounds that ran out before it. Holds.
func TestAttack8UsersStatementTimeoutReported(t *testing.T) {
	dsn := a5WithParam(atkPG, "options=-c%20statement_timeout%3D100ms")
	for _, on := range []bool{false, true} {
		plain := atkPlain(t, "pgx")
		tbl := a5Table(t, plain, 2)
		db := a5Open(t, dsn, 4, sqlretry.WithShortLockWait(on))
		ctx := a5Ctx(t, 15*time.Second)
		released := a5Holder(t, plain, tbl, 1, 2*time.Second)
		k := 0
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if k++; k == 1 {
				return a5FakeConflict(ctx, tx, "40001")
			}
			_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
			return err
		})
		<-released
		t.Logf("short waits %v: attempts %d ErrorCode %q err %v", on, k, sqlretry.ErrorCode(err), err)
		if a8Code(err) != "57014" || sqlretry.ErrorCode(err) != "57014" {
			t.Errorf("short waits %v: want the user's statement timeout (57014): %v", on, err)
		}
	}
}

// Within 2 s of a deadlock, work that is not a RunInTx attempt (db.BeginTx,
// an autocommit statement, BEGIN on a *sql.Conn, RunInTx on a plain db)
// waits behind a 400 ms row lock unbounded and commits. Holds.
func TestAttack8NonRunInTxWorkAfterDeadlockUnbounded(t *testing.T) {
	for _, mode := range []string{"begintx", "autocommit", "conn-begin", "runintx-on-plain"} {
		t.Run(mode, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, atkPG, 4)
			ctx := a5Ctx(t, 15*time.Second)
			a8Engage(t, ctx, db)
			released := a5Holder(t, plain, tbl, 1, 400*time.Millisecond)
			upd := "UPDATE " + tbl + " SET n = n + 1 WHERE id = 1"
			var err error
			switch mode {
			case "begintx":
				var tx *sql.Tx
				if tx, err = db.BeginTx(ctx, nil); err == nil {
					if _, err = tx.ExecContext(ctx, upd); err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				}
			case "autocommit":
				_, err = db.ExecContext(ctx, upd)
			case "conn-begin":
				var c *sql.Conn
				if c, err = db.Conn(ctx); err == nil {
					if _, err = c.ExecContext(ctx, "BEGIN"); err == nil {
						if _, err = c.ExecContext(ctx, upd); err == nil {
							_, err = c.ExecContext(ctx, "COMMIT")
						} else {
							c.ExecContext(ctx, "ROLLBACK")
						}
					}
					c.Close()
				}
			case "runintx-on-plain":
				err = sqlretry.RunInTx(ctx, plain, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, upd)
					return err
				})
			}
			<-released
			row := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
			t.Logf("row %d err %v", row, err)
			if err != nil || row != 1001 {
				t.Errorf("err %v row %d; want success, 1001", err, row)
			}
		})
	}
}

// Shadow mode turned on inside a bounded replay (before its statement, or
// when its statement got sqlretry's 55P03): the transaction began
// enforcing, so the 55P03 is sqlretry's to replay; the call commits once.
// Holds.
func TestAttack8ShadowTurnedOnInsideABoundedReplay(t *testing.T) {
	for _, when := range []string{"before-update", "on-error"} {
		t.Run(when, func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, atkPG, 4)
			ctx := a5Ctx(t, 15*time.Second)
			released := a5Holder(t, plain, tbl, 1, 500*time.Millisecond)
			k := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a5FakeConflict(ctx, tx, "40001")
				}
				if when == "before-update" {
					sqlretry.SetShadow(db, true)
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
				if err != nil && when == "on-error" {
					sqlretry.SetShadow(db, true)
				}
				return err
			})
			sqlretry.SetShadow(db, false)
			<-released
			row := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
			t.Logf("attempts %d row %d err %v", k, row, err)
			if err != nil || row != 1001 {
				t.Errorf("err %v row %d; want success, 1001", err, row)
			}
		})
	}
}

// WithContentionQueue(true), a caller behind a 1 s batch job after a
// deadlock: with 300 ms it ends at its deadline without a 55P03; with 3 s
// it commits once. Holds.
func TestAttack8ContentionQueueStuckCaller(t *testing.T) {
	for _, d := range []time.Duration{300 * time.Millisecond, 3 * time.Second} {
		t.Run(d.String(), func(t *testing.T) {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			db := a5Open(t, atkPG, 4, sqlretry.WithContentionQueue(true))
			released := a5Holder(t, plain, tbl, 1, time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), d)
			defer cancel()
			k := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a5FakeConflict(ctx, tx, "40P01")
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
				return err
			})
			<-released
			row := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
			t.Logf("attempts %d row %d ErrorCode %q err %v", k, row, sqlretry.ErrorCode(err), err)
			if a8Code(err) == "55P03" {
				t.Errorf("55P03 reached the caller: %v", err)
			}
			if d > time.Second && (err != nil || row != 1001) {
				t.Errorf("err %v row %d; want success, 1001", err, row)
			}
			if d < time.Second && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("want the deadline: %v", err)
			}
		})
	}
}

// An autocommit SELECT of the user's function that takes a session-level
// advisory lock (not undone by a rollback) and then waits on a
// transaction-level one past the user's own lock_timeout (100 ms, DSN).
// The plain driver returns the 55P03 after one run: the session lock is
// held once. sqlretry retries the statement (the server rolled it back)
// and the session lock ends up held once per run: a caller that unlocks
// once leaves it held on the pooled connection. NotIdempotent(ctx), the
// README's mark for "a SELECT of a function of your own with side
// effects", does not stop it (its go doc says rolled-back statements are
// still retried); only NoRetry(ctx) does.
func TestAttack8AutocommitFunctionSessionLockRetried(t *testing.T) {
	plain := atkPlain(t, "pgx")
	dsn := a5WithParam(atkPG, "options=-c%20lock_timeout%3D100ms")
	fn := atkName("a8fn")
	atkMust(t, plain, "CREATE FUNCTION "+fn+"(a bigint, b bigint) RETURNS int LANGUAGE plpgsql AS $$BEGIN PERFORM pg_advisory_lock(a); PERFORM pg_advisory_xact_lock(b); RETURN 1; END$$")
	t.Cleanup(func() { plain.Exec("DROP FUNCTION IF EXISTS " + fn + "(bigint, bigint)") })
	for _, mode := range []string{"plain", "sqlretry", "notidempotent", "noretry"} {
		t.Run(mode, func(t *testing.T) {
			var db *sql.DB
			if mode == "plain" {
				db = a5Plain(t, dsn)
			} else {
				db = a5Open(t, dsn, 1)
			}
			db.SetMaxOpenConns(1)
			k1 := 880000 + rand.Int64N(100000)
			k2 := k1 + 200000
			released := a5Holder(t, plain, "", int(k2), 600*time.Millisecond)
			ctx := a5Ctx(t, 10*time.Second)
			cctx := ctx
			switch mode {
			case "notidempotent":
				cctx = sqlretry.NotIdempotent(ctx)
			case "noretry":
				cctx = sqlretry.NoRetry(ctx)
			}
			var x int
			err := db.QueryRowContext(cctx, "SELECT "+fn+"($1, $2)", k1, k2).Scan(&x)
			<-released
			held := 0
			for held < 100 {
				var ok bool
				if err := db.QueryRowContext(ctx, "SELECT pg_advisory_unlock($1)", k1).Scan(&ok); err != nil || !ok {
					break
				}
				held++
			}
			t.Logf("%s: err %v; the function's session lock was held %d times", mode, err, held)
			if held != 1 {
				if mode == "plain" || mode == "noretry" {
					t.Fatalf("%s: held %d", mode, held)
				}
				a8Defects(t)
				t.Errorf("DEFECT (%s): the function ran %d times, its session-level advisory lock is held %d times on the pooled connection; the plain driver ran it once and returned the user's 55P03 (err here: %v)", mode, held, held, err)
			}
		})
	}
}

// The everyday Go idiom in the closure: on an error, tx.Rollback() and
// return it. README: after the closure's own Rollback RunInTx returns that
// outcome and never replays. So sqlretry's own bound's 55P03 goes straight
// to the caller: on a replay after a serialization failure ("replay"), and
// on the first attempt of a call with no conflict of its own, made within
// 2 s of another caller's deadlock ("engaged"). Nobody set lock_timeout;
// the plain driver (and sqlretry without short waits) waits 500 ms and
// commits.
func TestAttack8ClosureRollbackIdiomGetsOwnBound(t *testing.T) {
	body := func(ctx context.Context, tx *sql.Tx, tbl string) error {
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			tx.Rollback()
			return err
		}
		return nil
	}
	t.Run("replay", func(t *testing.T) {
		a0, n0, _, err0 := a8Stuck(t, false, 500*time.Millisecond, 10*time.Second, body)
		if err0 != nil || n0 != 1001 {
			t.Fatalf("without short waits: attempts %d row %d err %v", a0, n0, err0)
		}
		a, n, took, err := a8Stuck(t, true, 500*time.Millisecond, 10*time.Second, body)
		t.Logf("attempts %d row %d took %v ErrorCode %q err %v", a, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
		if err != nil || n != 1001 {
			a8Defects(t)
			t.Errorf("DEFECT: closure with the Rollback-and-return idiom: got %v after %v (ErrorCode %q), row %d; without short waits it waited and committed", err, took.Round(time.Millisecond), sqlretry.ErrorCode(err), n)
		}
	})
	t.Run("engaged", func(t *testing.T) {
		plain := atkPlain(t, "pgx")
		tbl := a5Table(t, plain, 2)
		db := a5Open(t, atkPG, 4)
		ctx := a5Ctx(t, 10*time.Second)
		a8Engage(t, ctx, db)
		released := a5Holder(t, plain, tbl, 1, 500*time.Millisecond)
		k := 0
		start := time.Now()
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			k++
			return body(ctx, tx, tbl)
		})
		took := time.Since(start)
		<-released
		n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
		t.Logf("attempts %d row %d took %v ErrorCode %q err %v", k, n, took.Round(time.Millisecond), sqlretry.ErrorCode(err), err)
		if err != nil || n != 1001 {
			a8Defects(t)
			t.Errorf("DEFECT: a call with no conflict of its own, 2 s after another caller's deadlock, Rollback-and-return idiom: got %v after %v, row %d; the plain driver waits 500 ms and commits", err, took.Round(time.Millisecond), n)
		}
	})
}

// MariaDB: short waits do nothing there (README). A replay after a
// deadlock sees the session's innodb_lock_wait_timeout unchanged, and a
// caller behind a 1.5 s row lock (innodb's default wait is 50 s) waits and
// commits. Holds.
func TestAttack8MariaDBNoShortWait(t *testing.T) {
	db := atkOpenMy(t)
	plain := atkPlain(t, "mysql")
	tbl := atkName("a8my")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL) ENGINE=InnoDB", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	hold, err := plain.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hold.Exec("UPDATE " + tbl + " SET n = n + 1000 WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(1500*time.Millisecond, func() { hold.Commit() })
	ctx := a5Ctx(t, 15*time.Second)
	k := 0
	var seen []string
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		k++
		var s string
		if err := tx.QueryRowContext(ctx, "SELECT @@innodb_lock_wait_timeout").Scan(&s); err != nil {
			return err
		}
		seen = append(seen, s)
		if k == 1 {
			_, err := tx.ExecContext(ctx, "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'attack8 fake deadlock'")
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
		return err
	})
	time.Sleep(100 * time.Millisecond)
	n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	t.Logf("attempts %d innodb_lock_wait_timeout seen %v row %d err %v", k, seen, n, err)
	if err != nil || n != 1001 || k != 2 || len(seen) != 2 || seen[0] != seen[1] {
		t.Errorf("err %v row %d attempts %d seen %v; want success on attempt 2, row 1001, the same lock wait timeout", err, n, k, seen)
	}
}

// A closure that sets its transaction's characteristics itself, as its
// first statement (PostgreSQL requires that: "must be called before any
// query"): SET TRANSACTION ISOLATION LEVEL ..., SET TRANSACTION SNAPSHOT
// (an exported snapshot, for consistent parallel reads), SET TRANSACTION
// READ WRITE on a session read-only by default. On a bounded
// attempt sqlretry's own set_config statement ran first, so the closure's
// statement fails with 25001, an error the plain driver never gives, and
// RunInTx returns it as permanent: on a replay after a serialization
// failure ("replay"), and on the first attempt of any call within 2 s of
// another caller's deadlock ("engaged").
func TestAttack8ClosureSetTransactionFirstFailsOnBoundedAttempt(t *testing.T) {
	plain := atkPlain(t, "pgx")
	snapTx, err := plain.BeginTx(context.Background(), &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	defer snapTx.Rollback()
	var snap string
	if err := snapTx.QueryRow("SELECT pg_export_snapshot()").Scan(&snap); err != nil {
		t.Fatal(err)
	}
	type c struct {
		opts *sql.TxOptions
		ss   []string
		dsn  string
	}
	stmts := map[string]c{
		"serializable":               {nil, []string{"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"}, ""},
		"repeatable-read":            {nil, []string{"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"}, ""},
		"serializable-ro-deferrable": {nil, []string{"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"}, ""},
		// The isolation from txOpts; the closure only imports the snapshot.
		"snapshot": {&sql.TxOptions{Isolation: sql.LevelRepeatableRead}, []string{"SET TRANSACTION SNAPSHOT '" + snap + "'"}, ""},
		// Sessions read-only by default (DSN); a writer opts in per
		// transaction, first thing.
		"read-write-on-read-only-session": {nil, []string{"SET TRANSACTION READ WRITE", "CREATE TEMP TABLE IF NOT EXISTS a8rw (x int)"}, a5WithParam(atkPG, "default_transaction_read_only=on")},
	}
	for name, cc := range stmts {
		ss := cc.ss
		for _, mode := range []string{"replay", "engaged"} {
			t.Run(name+"/"+mode, func(t *testing.T) {
				res := map[bool]string{}
				for _, on := range []bool{false, true} {
					dsn := atkPG
					if cc.dsn != "" {
						dsn = cc.dsn
					}
					db := a5Open(t, dsn, 2, sqlretry.WithShortLockWait(on))
					ctx := a5Ctx(t, 10*time.Second)
					if mode == "engaged" {
						a8Engage(t, ctx, db)
					}
					k := 0
					err := sqlretry.RunInTx(ctx, db, cc.opts, func(ctx context.Context, tx *sql.Tx) error {
						k++
						for _, s := range ss {
							if _, err := tx.ExecContext(ctx, s); err != nil {
								return err
							}
						}
						if k == 1 && mode == "replay" {
							return a5FakeConflict(ctx, tx, "40001")
						}
						return nil
					})
					res[on] = fmt.Sprintf("attempts %d ErrorCode %q err %v", k, sqlretry.ErrorCode(err), err)
					t.Logf("short waits %v: %s", on, res[on])
					if !on && err != nil {
						t.Fatalf("without short waits: %s", res[on])
					}
					if on && err != nil {
						a8Defects(t)
						t.Errorf("DEFECT: the closure's first statement %q failed on a bounded attempt: %s; without short waits: %s", ss[len(ss)-1], res[on], res[false])
					}
				}
			})
		}
	}
}

// The way out the go doc gives: WithShortLockWait(false) given to one
// RunInTx call turns short waits off for that call. Within 2 s of another
// caller's deadlock, a closure that starts with SET TRANSACTION ISOLATION
// LEVEL, and one with the Rollback-and-return idiom behind a 400 ms row
// lock, both commit with it. Holds.
func TestAttack8PerCallShortWaitOffIsTheWayOut(t *testing.T) {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 2)
	db := a5Open(t, atkPG, 4)
	ctx := a5Ctx(t, 10*time.Second)
	a8Engage(t, ctx, db)
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
		return err
	}, sqlretry.WithShortLockWait(false))
	if err != nil {
		t.Errorf("SET TRANSACTION with short waits off for the call: %v", err)
	}
	a8Engage(t, ctx, db)
	released := a5Holder(t, plain, tbl, 1, 400*time.Millisecond)
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			tx.Rollback()
			return err
		}
		return nil
	}, sqlretry.WithShortLockWait(false))
	<-released
	n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
	if err != nil || n != 1001 {
		t.Errorf("Rollback idiom with short waits off for the call: err %v row %d", err, n)
	}
}
