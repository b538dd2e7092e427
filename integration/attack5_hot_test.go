package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

type a5HotResult struct {
	commits, attempts, errs int64
	p50, p99                time.Duration
	firstErr                string
	codes                   map[string]int
	delay                   time.Duration
	stats                   sqlretry.Stats
	bounds                  map[string]int
}

func (r a5HotResult) String() string {
	return fmt.Sprintf("%d commits (%d attempts, %d errors %s) p50 %v p99 %v; retries by code %v, backoff total %v; contention waits %d cuts %d letgo %d",
		r.commits, r.attempts, r.errs, r.firstErr, r.p50.Round(time.Millisecond), r.p99.Round(time.Millisecond),
		r.codes, r.delay.Round(time.Millisecond), r.stats.ContentionWaits, r.stats.ContentionCuts, r.stats.ContentionLetGo) + fmt.Sprintf("; lock_timeout of the attempts %v", r.bounds)
}

// record counts a call's outcome: its error, or a commit and its latency.
func (r *a5HotResult) record(mu *sync.Mutex, lat *[]time.Duration, err error, start time.Time) {
	if err != nil {
		if atomic.AddInt64(&r.errs, 1) == 1 {
			r.firstErr = err.Error()
		}
		return
	}
	atomic.AddInt64(&r.commits, 1)
	mu.Lock()
	*lat = append(*lat, time.Since(start))
	mu.Unlock()
}

// percentiles sets p50 and p99 from the commits' latencies.
func (r *a5HotResult) percentiles(lat []time.Duration) {
	slices.Sort(lat)
	if len(lat) > 0 {
		r.p50, r.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
}

// a5Obs counts the SQLSTATEs of retried attempts and their backoff.
type a5Obs struct {
	mu    sync.Mutex
	codes map[string]int
	delay time.Duration
}

func (o *a5Obs) opt() sqlretry.Option {
	o.codes = map[string]int{}
	return sqlretry.WithObserver(sqlretry.ObserverFunc(func(ctx context.Context, e sqlretry.Event) {
		if e.Kind != sqlretry.EventRetry {
			return
		}
		code := "other"
		var pe *pgconn.PgError
		if errors.As(e.Err, &pe) {
			code = pe.Code
		}
		o.mu.Lock()
		o.codes[code]++
		o.delay += e.Delay
		o.mu.Unlock()
	}))
}

// a5Transfers: callers move money between 4 accounts, locking them in
// random order (deadlocks), each with a ledger row; money is conserved,
// every success has its ledger row exactly once, no error surfaces.
func a5Transfers(t *testing.T, on bool, iso sql.IsolationLevel, callers int, d time.Duration, extra ...sqlretry.Option) a5HotResult {
	plain := atkPlain(t, "pgx")
	acc := a5Table(t, plain, 4)
	led := atkName("a5led")
	atkMust(t, plain, "CREATE TABLE "+led+" (caller int, k int, amount int, PRIMARY KEY (caller, k))")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + led) })
	var obs a5Obs
	db := a5Open(t, atkPG, callers, append([]sqlretry.Option{sqlretry.WithShortLockWait(on), obs.opt()}, extra...)...)
	ctx := a5Ctx(t, d+30*time.Second)
	stop := time.Now().Add(d)
	res := a5HotResult{bounds: map[string]int{}}
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; time.Now().Before(stop); k++ {
				from := 1 + rand.IntN(4)
				to := 1 + (from+rand.IntN(3))%4
				amt := 1 + rand.IntN(9)
				start := time.Now()
				err := sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: iso}, func(ctx context.Context, tx *sql.Tx) error {
					atomic.AddInt64(&res.attempts, 1)
					lt, err := a5Setting(ctx, tx, "lock_timeout")
					if err != nil {
						return err
					}
					mu.Lock()
					res.bounds[lt]++
					mu.Unlock()
					if _, err := tx.ExecContext(ctx, "UPDATE "+acc+" SET n = n - $1 WHERE id = $2", amt, from); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.001)"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+acc+" SET n = n + $1 WHERE id = $2", amt, to); err != nil {
						return err
					}
					_, err = tx.ExecContext(ctx, "INSERT INTO "+led+" VALUES ($1, $2, $3)", c, k, amt)
					return err
				})
				res.record(&mu, &lat, err, start)
			}
		}()
	}
	wg.Wait()
	res.stats, _ = sqlretry.StatsOf(db)
	res.codes, res.delay = obs.codes, obs.delay
	if s := atkCount(t, plain, "SELECT sum(n) FROM "+acc); s != 0 {
		t.Errorf("DEFECT (short waits %v): money not conserved: sum %d", on, s)
	}
	if l := atkCount(t, plain, "SELECT count(*) FROM "+led); int64(l) != res.commits {
		t.Errorf("DEFECT (short waits %v): %d ledger rows for %d successes (lost or phantom write)", on, l, res.commits)
	}
	if res.errs != 0 && on { // errors without short waits are the caller's to log
		t.Errorf("DEFECT (short waits on): %d surfaced errors, first: %s", res.errs, res.firstErr)
	}
	res.percentiles(lat)
	return res
}

// SERIALIZABLE hot spot, 16 callers, 4 accounts, 3 s, short waits on and
// off interleaved: correctness (money, ledger, no error), rates logged.
func TestAttack5HotSpotTransfers(t *testing.T) {
	for _, iso := range []sql.IsolationLevel{sql.LevelSerializable} {
		for round := range 1 {
			on := a5Transfers(t, true, iso, 16, 3*time.Second)
			off := a5Transfers(t, false, iso, 16, 3*time.Second)
			t.Logf("%v round %d: with short waits %v; without %v; ratio %.2f", iso, round, on, off, float64(on.commits)/float64(max(off.commits, 1)))
		}
	}
}

// A FIFO queue on one counter row (no deadlock possible: one row), each
// holder ~3 ms, while another caller of the same db meets a "deadlock"
// every second (so every attempt of the db is bounded). Waiting in the
// queue longer than the bound turns into a lock timeout and a replay at
// the back of the queue. No error may surface, the counter must equal the
// commits; the rate is compared with short waits off.
func a5Queue(t *testing.T, on bool, callers int, d time.Duration) a5HotResult {
	plain := atkPlain(t, "pgx")
	tbl := a5Table(t, plain, 1)
	db := a5Open(t, atkPG, callers+2, sqlretry.WithShortLockWait(on))
	ctx := a5Ctx(t, d+30*time.Second)
	stop := time.Now().Add(d)
	var res a5HotResult
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for time.Now().Before(stop) {
			var n int
			sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if n++; n == 1 {
					return a5FakeConflict(ctx, tx, "40P01")
				}
				return nil
			})
			time.Sleep(time.Second)
		}
	}()
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				start := time.Now()
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					atomic.AddInt64(&res.attempts, 1)
					if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.003)")
					return err
				})
				res.record(&mu, &lat, err, start)
			}
		}()
	}
	wg.Wait()
	if n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1"); int64(n) != res.commits {
		t.Errorf("DEFECT (short waits %v): counter %d, commits %d", on, n, res.commits)
	}
	if res.errs != 0 {
		t.Errorf("DEFECT (short waits %v): %d surfaced errors, first: %s", on, res.errs, res.firstErr)
	}
	res.percentiles(lat)
	return res
}

func TestAttack5QueueUnderBoundedMode(t *testing.T) {
	for round := range 1 {
		on := a5Queue(t, true, 12, 4*time.Second)
		off := a5Queue(t, false, 12, 4*time.Second)
		t.Logf("round %d: with short waits %v; without %v; ratio %.2f", round, on, off, float64(on.commits)/float64(max(off.commits, 1)))
	}
}

// The same hot spot in READ COMMITTED (PostgreSQL's default): 16 callers
// lock 2 of 4 accounts in random order, 5 s per side. In READ COMMITTED a
// waiter goes on when the holder commits: deadlocks are the only
// conflicts, each found after deadlock_timeout (1 s). Contention control
// must engage on them and queue the callers; correctness is checked by
// a5Transfers (no surfaced error, money, ledger), and the rate must not
// collapse: it committed 1.5-4 tx/s (p50 5-18 s) while the SERIALIZABLE
// hot spot committed hundreds, because the limiter engaged late or never
// (it waited for two rounds of the 16 callers, 3-8 s there), let go on a
// probation judged on one or two commits, and could not cut (a replay's
// conflict did not count, and calls replayed for seconds). The
// SERIALIZABLE side runs in the same test for the ratio.
//
// Gated (SQLRETRY_ATTACK5_GAPS=1): with the fixes it passed 2 of 5 runs
// in a row, twice (3.8-215.8 tx/s; 9 of 14 runs of the READ COMMITTED side
// alone at 60-216 tx/s); the runs that fail spend the whole 5 s
// draining the tangle of the 16 first attempts, which started unbounded
// before any conflict was seen and wait on each other (pg_stat_activity:
// 11-16 sessions in lock waits for 1-3 s), one deadlock victim a second.
func TestAttack5HotSpotReadCommitted(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK5_GAPS") == "" {
		t.Skip("a gap the README names (the READ COMMITTED deadlock hot spot on PostgreSQL: the cold start of 16 unbounded first attempts); set SQLRETRY_ATTACK5_GAPS=1 to run")
	}
	const d = 5 * time.Second
	on := a5Transfers(t, true, sql.LevelReadCommitted, 16, d)
	off := a5Transfers(t, false, sql.LevelReadCommitted, 16, d)
	ser := a5Transfers(t, true, sql.LevelSerializable, 16, d)
	rate := func(r a5HotResult) float64 { return float64(r.commits) / d.Seconds() }
	t.Logf("READ COMMITTED, %v:\n with short waits %.1f tx/s: %v\n without %.1f tx/s: %v\nSERIALIZABLE with short waits %.1f tx/s: %v\nREAD COMMITTED / SERIALIZABLE: %.2f",
		d, rate(on), on, rate(off), off, rate(ser), ser, rate(on)/max(rate(ser), 1))
	if rate(on) < 50 {
		t.Errorf("DEFECT: READ COMMITTED 4-account hot spot with short waits committed %.1f tx/s (without: %.1f tx/s; SERIALIZABLE %.1f), p50 %v p99 %v; %d of %d attempts ran with no bound (lock_timeout 0)",
			rate(on), rate(off), rate(ser), on.p50.Round(time.Millisecond), on.p99.Round(time.Millisecond), on.bounds["0"], on.attempts)
	}
}
