package chaos

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// RunReplicas runs one scenario as sc.Replicas replicas of an application
// on one set of fresh tables: each replica opens its own *sql.DB (its own
// connector, pool and, through sqlretry, its own policy, breaker, budget
// and contention control, as separate processes would have) and runs
// sc.Workers/sc.Replicas workers. Nothing is shared between the replicas
// but the database. The report sums them; ReplicaCommitted has each one's
// commits. With sc.Processes each replica is a process of the running
// program (it must be the chaos command, which has RunReplicaChild).
func RunReplicas(ctx context.Context, tg Target, sc Scenario, st Strategy, progress func(elapsed time.Duration, committed, failed int64)) (*Report, error) {
	n := max(1, sc.Replicas)
	if sc.Workers%n != 0 {
		return nil, fmt.Errorf("%d workers do not split evenly into %d replicas", sc.Workers, n)
	}
	admin, err := sql.Open(tg.Driver, tg.DSN)
	if err != nil {
		return nil, err
	}
	defer admin.Close()
	run := fmt.Sprintf("chaos%d", rand.Uint32())
	bank, err := workload.NewBank(ctx, admin, tg.Driver, run, sc.Accounts)
	if err != nil {
		return nil, err
	}
	defer bank.Drop(context.Background(), admin)

	var results []*workload.Result
	var stats []sqlretry.Stats
	dials := 0
	if sc.Processes {
		results, stats, err = runProcesses(ctx, tg, sc, st, run, n)
	} else {
		results, stats, dials, err = runInProcess(ctx, tg, sc, st, admin, bank, run, n, progress)
	}
	if err != nil {
		return nil, err
	}
	res := mergeResults(results)
	inv, err := bank.Check(context.Background(), admin, res)
	if err != nil {
		return nil, fmt.Errorf("checking the invariants: %w", err)
	}
	r := &Report{
		Driver: tg.Driver, Scenario: sc.Name, Strategy: st.Name, Replicas: n, Processes: sc.Processes,
		Committed: res.Committed, Failed: res.Failed, Unknown: res.Unknown,
		TxPerSec: float64(res.Committed) / res.Elapsed.Seconds(),
		Errors:   res.Errors, Attempts: res.Attempts,
		P50ms: ms(res.Percentile(50)), P99ms: ms(res.Percentile(99)), P999ms: ms(res.Percentile(99.9)),
		Invariants: inv, TickMs: 100, Timeline: res.Timeline, RecoveryMs: -1,
	}
	r.Dials, r.ReplicaStats = dials, stats
	for i := range n {
		r.ReplicaCommitted = append(r.ReplicaCommitted, results[i].Committed)
	}
	if len(res.Latencies) > 0 {
		var sum time.Duration
		for _, l := range res.Latencies {
			sum += l
		}
		r.MeanMs = ms(sum / time.Duration(len(res.Latencies)))
	}
	if res.Committed > 0 {
		r.AttemptsPerCommit = float64(res.Attempts) / float64(res.Committed)
	}
	return r, nil
}

// runInProcess runs the replicas as *sql.DBs of this process.
func runInProcess(ctx context.Context, tg Target, sc Scenario, st Strategy, admin *sql.DB, bank *workload.Bank, run string, n int,
	progress func(elapsed time.Duration, committed, failed int64)) ([]*workload.Result, []sqlretry.Stats, int, error) {
	dbs := make([]*sql.DB, n)
	dials := make([]*workload.DialLog, n)
	for i := range n {
		connector, dl, _, stop, err := workConnector(ctx, tg, sc, admin, fmt.Sprintf("%s_r%d", run, i))
		if err != nil {
			return nil, nil, 0, err
		}
		defer stop()
		if st.Wrapped {
			// CHAOS_TRACE: one log per replica (<prefix>-<strategy>-replicas-<n>x-r<i>.log).
			tr := newTracer(fmt.Sprintf("%s-%s-%dx-r%d", st.Name, sc.Name, n, i))
			defer tr.dump()
			dbs[i] = sqlretry.OpenDB(connector, append(append([]sqlretry.Option(nil), st.Options...), tr.options()...)...)
			if tr != nil {
				stopWatch := make(chan struct{})
				defer close(stopWatch)
				go tr.watch(dbs[i], stopWatch)
			}
		} else {
			dbs[i] = sql.OpenDB(connector)
		}
		defer dbs[i].Close()
		dbs[i].SetMaxOpenConns(sc.Workers / n)
		dbs[i].SetMaxIdleConns(sc.Workers / n)
		dials[i] = dl
	}

	// Progress sums the replicas' own counts.
	committed, failed := make([]atomic.Int64, n), make([]atomic.Int64, n)
	results := make([]*workload.Result, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cfg := workload.Config{Workers: sc.Workers / n, Duration: sc.Duration, OpTimeout: sc.OpTimeout, OpPrefix: fmt.Sprintf("r%d", i)}
			cfg.Progress = func(_ time.Duration, c, f int64) { committed[i].Store(c); failed[i].Store(f) }
			results[i] = workload.Run(ctx, cfg, bank, dbs[i], st.Run)
		}()
	}
	if progress != nil {
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		t := time.NewTicker(time.Second)
	loop:
		for {
			select {
			case <-t.C:
				var c, f int64
				for i := range n {
					c += committed[i].Load()
					f += failed[i].Load()
				}
				progress(time.Since(start), c, f)
			case <-done:
				break loop
			}
		}
		t.Stop()
	}
	wg.Wait()

	var stats []sqlretry.Stats
	total := 0
	for i := range n {
		total += dials[i].Between(time.Time{}, time.Now())
		if s, ok := sqlretry.StatsOf(dbs[i]); ok {
			stats = append(stats, s)
		}
	}
	return results, stats, total, nil
}

// mergeResults sums the replicas' results into one, as if one caller had
// run them all.
func mergeResults(rs []*workload.Result) *workload.Result {
	m := &workload.Result{Errors: map[string]int{}, Acked: map[string]bool{}, FailedOps: map[string]bool{}, UnknownOps: map[string]bool{}}
	for _, r := range rs {
		m.Committed += r.Committed
		m.Failed += r.Failed
		m.Unknown += r.Unknown
		m.Attempts += r.Attempts
		m.Elapsed = max(m.Elapsed, r.Elapsed)
		m.MaxOvershoot = max(m.MaxOvershoot, r.MaxOvershoot)
		for k, v := range r.Errors {
			m.Errors[k] += v
		}
		m.Latencies = append(m.Latencies, r.Latencies...)
		for i, c := range r.Timeline {
			if i >= len(m.Timeline) {
				m.Timeline = append(m.Timeline, 0)
			}
			m.Timeline[i] += c
		}
		for k := range r.Acked {
			m.Acked[k] = true
		}
		for k := range r.FailedOps {
			m.FailedOps[k] = true
		}
		for k := range r.UnknownOps {
			m.UnknownOps[k] = true
		}
	}
	sort.Slice(m.Latencies, func(i, j int) bool { return m.Latencies[i] < m.Latencies[j] })
	return m
}

// Fairness is the smallest replica's commits over the mean replica's: 1
// when every replica committed its share, 0 when one starved.
func (r *Report) Fairness() float64 {
	if len(r.ReplicaCommitted) == 0 || r.Committed == 0 {
		return 0
	}
	least := r.ReplicaCommitted[0]
	for _, c := range r.ReplicaCommitted {
		least = min(least, c)
	}
	return float64(least) * float64(len(r.ReplicaCommitted)) / float64(r.Committed)
}
