package integration

// Hot-spot workloads for attack24: transfers between a few rows from
// several *sql.DB (replicas) and goroutines, through sqlretry or through
// the plain driver with a hand-written backoff loop.

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

type a24Result struct {
	perDB     []int
	perWorker []int
	ambiguous []int            // per worker: errors matching ErrAmbiguousCommit
	errsOf    map[int][]string // per worker: the other errors
	errs      int
	commitAt  []time.Time
	stats     []sqlretry.Stats // per db, at the end (sqlretry only)
	lat       []time.Duration
	attempts  int
	logRows   map[int]int // worker -> rows in the log table
	sum       int
	firstErr  error
	dur       time.Duration
}

func (r *a24Result) total() int {
	n := 0
	for _, c := range r.perDB {
		n += c
	}
	return n
}

func (r *a24Result) fairness() float64 {
	mn, mx := r.perDB[0], r.perDB[0]
	for _, c := range r.perDB {
		mn, mx = min(mn, c), max(mx, c)
	}
	if mx == 0 {
		return 0
	}
	return float64(mn) / float64(mx)
}

func (r *a24Result) workerFairness() float64 {
	mn, mx := r.perWorker[0], r.perWorker[0]
	for _, c := range r.perWorker {
		mn, mx = min(mn, c), max(mx, c)
	}
	if mx == 0 {
		return 0
	}
	return float64(mn) / float64(mx)
}

func (r *a24Result) pct(q float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), r.lat...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(q*float64(len(s)-1))]
}

// a24Transfer moves 1 from a to b and logs the worker.
func a24Transfer(ctx context.Context, tx *sql.Tx, tbl, logTbl string, a, b, w int, hold time.Duration) error {
	if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v - 1 WHERE id = ?", a); err != nil {
		return err
	}
	if hold > 0 {
		time.Sleep(hold)
	}
	if _, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET v = v + 1 WHERE id = ?", b); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, "INSERT INTO "+logTbl+" (w) VALUES (?)", w)
	return err
}

// a24MaxOpen, when set, caps each db's pool (SetMaxOpenConns).
var a24MaxOpen int

type a24Strategy string

const (
	a24Spread   a24Strategy = "sqlretry"
	a24NoSpread a24Strategy = "sqlretry-no-spread"
	a24Loop     a24Strategy = "backoff-loop"
)

// a24HotRun runs dbs x per workers for d on rows hot rows. Each
// transfer holds its first row for hold; a negative hold: only worker 0
// holds it (-hold), a long transaction among short ones.
func a24HotRun(t *testing.T, strat a24Strategy, dbs, per, rows int, d, callTimeout, hold time.Duration) *a24Result {
	t.Helper()
	plain := atkPlain(t, "mysql")
	tbl := a24Hot(t, plain, rows)
	logTbl := atkName("a24log")
	atkMust(t, plain, "CREATE TABLE "+logTbl+" (id bigint auto_increment primary key, w int not null) ENGINE=InnoDB")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + logTbl) })
	res := &a24Result{perDB: make([]int, dbs), perWorker: make([]int, dbs*per), logRows: map[int]int{},
		ambiguous: make([]int, dbs*per), errsOf: map[int][]string{}}
	var handles []*sql.DB
	for i := 0; i < dbs; i++ {
		switch strat {
		case a24Spread:
			handles = append(handles, a24Open(t))
		case a24NoSpread:
			handles = append(handles, a24Open(t, sqlretry.WithReplaySpread(false)))
		case a24Loop:
			cfg, _ := mysql.ParseDSN(atkMySQL)
			c, _ := mysql.NewConnector(cfg)
			db := sql.OpenDB(c)
			t.Cleanup(func() { db.Close() })
			handles = append(handles, db)
		}
		handles[i].SetMaxIdleConns(per + 2)
		if a24MaxOpen > 0 {
			handles[i].SetMaxOpenConns(a24MaxOpen)
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	start := time.Now()
	for i := 0; i < dbs; i++ {
		for j := 0; j < per; j++ {
			w := i*per + j
			wg.Add(1)
			go func(db *sql.DB, i, w int) {
				defer wg.Done()
				hold := hold
				if hold < 0 { // only worker 0 holds its first row lock, -hold long
					if w == 0 {
						hold = -hold
					} else {
						hold = 0
					}
				}
				for time.Now().Before(end) {
					a := rand.IntN(rows) + 1
					b := rand.IntN(rows-1) + 1
					if b >= a {
						b++
					}
					ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
					s := time.Now()
					attempts := 0
					var err error
					if strat == a24Loop {
						// hand-written loop: exponential backoff with full jitter, 5 ms .. 1 s
						back := 5 * time.Millisecond
						for {
							attempts++
							err = a24PlainTx(ctx, db, func(tx *sql.Tx) error { return a24Transfer(ctx, tx, tbl, logTbl, a, b, w, hold) })
							var me *mysql.MySQLError
							if err == nil || !errors.As(err, &me) || (me.Number != 1213 && me.Number != 1205) || attempts >= 30 {
								break
							}
							slp := time.Duration(rand.Int64N(int64(back)) + 1)
							select {
							case <-time.After(slp):
							case <-ctx.Done():
							}
							if ctx.Err() != nil {
								err = ctx.Err()
								break
							}
							back = min(2*back, time.Second)
						}
					} else {
						err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
							attempts++
							return a24Transfer(ctx, tx, tbl, logTbl, a, b, w, hold)
						})
					}
					cancel()
					mu.Lock()
					res.attempts += attempts
					if err == nil {
						res.perDB[i]++
						res.perWorker[w]++
						res.lat = append(res.lat, time.Since(s))
						res.commitAt = append(res.commitAt, time.Now())
					} else {
						if errors.Is(err, sqlretry.ErrAmbiguousCommit) {
							res.ambiguous[w]++
						} else {
							res.errsOf[w] = append(res.errsOf[w], err.Error())
						}
						res.errs++
						if res.firstErr == nil {
							res.firstErr = err
						}
					}
					mu.Unlock()
				}
			}(handles[i], i, w)
		}
	}
	wg.Wait()
	res.dur = time.Since(start)
	for _, h := range handles {
		if st, ok := sqlretry.StatsOf(h); ok {
			res.stats = append(res.stats, st)
		}
	}
	rs, err := plain.Query("SELECT w, COUNT(*) FROM " + logTbl + " GROUP BY w")
	if err != nil {
		t.Fatal(err)
	}
	for rs.Next() {
		var w, n int
		rs.Scan(&w, &n)
		res.logRows[w] = n
	}
	rs.Close()
	res.sum = atkCount(t, plain, "SELECT COALESCE(SUM(v),0) FROM "+tbl)
	return res
}

func a24PlainTx(ctx context.Context, db *sql.DB, fn func(*sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

func (r *a24Result) String() string {
	return sprintf("commits %d (%.0f/s) perDB %v fairness %.2f worker-fairness %.2f (min %d) errs %d att/commit %.2f p50 %v p99 %v max %v",
		r.total(), float64(r.total())/r.dur.Seconds(), r.perDB, r.fairness(), r.workerFairness(), minInt(r.perWorker), r.errs,
		float64(r.attempts)/float64(max(1, r.total())), r.pct(0.5).Round(time.Millisecond), r.pct(0.99).Round(time.Millisecond), r.pct(1).Round(time.Millisecond))
}

func minInt(s []int) int {
	m := s[0]
	for _, v := range s {
		m = min(m, v)
	}
	return m
}

// check: no commit lost or doubled, money conserved.
func (r *a24Result) check(t *testing.T) {
	t.Helper()
	if r.sum != 0 {
		t.Errorf("sum of balances %d, want 0", r.sum)
	}
	for w, n := range r.perWorker {
		// an ErrAmbiguousCommit may have committed
		if r.logRows[w] < n || r.logRows[w] > n+r.ambiguous[w] {
			t.Errorf("worker %d: %d commits reported (and %d ErrAmbiguousCommit), %d in the log; its other errors: %q", w, n, r.ambiguous[w], r.logRows[w], r.errsOf[w])
		}
	}
}
