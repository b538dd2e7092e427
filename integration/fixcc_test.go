package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// Contention control must never be the reason no transaction of the db
// makes progress. A RunInTx nested in another's closure with a context of
// its own (not the closure's) cannot be seen as nested: under a hot row the
// limiter engaged, the outer held a slot (and the row lock) while the inner
// waited for one, and every caller waited for its deadline (a hostile
// tester's probe: 13-25 commits in 3 s with contention control, about 660
// without it, 12 plain callers failed). The same workload runs with and
// without contention control; with it, it must commit at least half as
// much, and no caller may fail at its deadline. (A caller the hot row
// starves may give up without contention control as well: that is the
// workload's, not a stall.)
func TestPostgresNestedFreshContextDoesNotStallContentionControl(t *testing.T) {
	var ok [2]int
	for i, cc := range []bool{false, true} {
		r := nestedFreshRun(t, cc, false)
		t.Logf("contention control %v: nesting ok=%d failed=%d, plain ok=%d failed=%d (%d at their deadline); errors %v; waits=%d cuts=%d letgo=%d",
			cc, r.okOuter, r.errOuter, r.okPlain, r.errPlain, r.deadline, r.errs, r.stats.ContentionWaits, r.stats.ContentionCuts, r.stats.ContentionLetGo)
		ok[i] = r.okOuter + r.okPlain
		if cc && r.deadline > 0 {
			t.Errorf("%d callers failed at their deadline", r.deadline)
		}
		if cc && r.stats.ContentionCuts == 0 {
			t.Log("contention control never engaged: this run tests nothing")
		}
	}
	if 2*ok[1] < ok[0] {
		t.Errorf("%d commits with contention control, %d without: want at least half", ok[1], ok[0])
	}
}

// The same with the nested RunInTx on another goroutine that the closure
// waits for: nothing on the waiting caller's stack shows that it is nested,
// and the limiter must let go once nothing completes (after 1.2 s at
// least: a PostgreSQL deadlock among the slot holders stalls them for
// deadlock_timeout). No caller may fail at its deadline.
func TestPostgresNestedOnAnotherGoroutineDoesNotStallContentionControl(t *testing.T) {
	r := nestedFreshRun(t, true, true)
	t.Logf("nesting ok=%d failed=%d, plain ok=%d failed=%d (%d at their deadline); errors %v; waits=%d cuts=%d letgo=%d",
		r.okOuter, r.errOuter, r.okPlain, r.errPlain, r.deadline, r.errs, r.stats.ContentionWaits, r.stats.ContentionCuts, r.stats.ContentionLetGo)
	if r.deadline > 0 {
		t.Errorf("%d callers failed at their deadline", r.deadline)
	}
	if r.stats.ContentionCuts == 0 {
		t.Log("contention control never engaged: this run tests nothing")
	}
}

type nestedFreshResult struct {
	okOuter, okPlain, errOuter, errPlain int
	deadline                             int // failed at their deadline
	errs                                 map[string]int
	stats                                sqlretry.Stats
}

// nestedFreshRun runs 8 workers for 2 s on a hot row, SERIALIZABLE; two of
// them run a nested RunInTx on a fresh context inside their closure (on
// another goroutine that the closure waits for, if elsewhere).
func nestedFreshRun(t *testing.T, cc, elsewhere bool) nestedFreshResult {
	db, err := sqlretry.Open("pgx", sharedDSN(t, "pgx"), sqlretry.WithContentionControl(cc))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(20)
	tbl := table(t, db, "fixcc")
	mustExec(t, db, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0), (2, 0)")
	hot := func(ctx context.Context, tx *sql.Tx, id int) error {
		var n int
		if err := tx.QueryRowContext(ctx, fmt.Sprintf("SELECT n FROM %s WHERE id = %d", tbl, id)).Scan(&n); err != nil {
			return err
		}
		time.Sleep(3 * time.Millisecond)
		_, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE %s SET n = %d WHERE id = %d", tbl, n+1, id))
		return err
	}
	ser := &sql.TxOptions{Isolation: sql.LevelSerializable}
	stop := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	var mu sync.Mutex
	r := nestedFreshResult{errs: map[string]int{}}
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
				nests := w%4 == 0
				var err error
				if nests {
					err = sqlretry.RunInTx(ctx, db, ser, func(ctx context.Context, tx *sql.Tx) error {
						if err := hot(ctx, tx, 1); err != nil {
							return err
						}
						inner := func() error {
							ictx, icancel := context.WithTimeout(context.Background(), 2*time.Second)
							defer icancel()
							return sqlretry.RunInTx(ictx, db, ser, func(ctx context.Context, tx *sql.Tx) error { return hot(ctx, tx, 2) })
						}
						if !elsewhere {
							return inner()
						}
						ch := make(chan error, 1)
						go func() { ch <- inner() }()
						return <-ch
					})
				} else {
					err = sqlretry.RunInTx(ctx, db, ser, func(ctx context.Context, tx *sql.Tx) error { return hot(ctx, tx, 1) })
				}
				cancel()
				mu.Lock()
				switch {
				case err != nil:
					s := err.Error()
					r.errs[s[:min(60, len(s))]]++
					if errors.Is(err, context.DeadlineExceeded) {
						r.deadline++
					}
					if nests {
						r.errOuter++
					} else {
						r.errPlain++
					}
				case nests:
					r.okOuter++
				default:
					r.okPlain++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	r.stats, _ = sqlretry.StatsOf(db)
	return r
}
