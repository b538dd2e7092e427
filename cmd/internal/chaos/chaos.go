// Package chaos runs the transfer workload of internal/workload under one
// fault scenario with one retry strategy, and reports what the callers saw,
// what the database holds and what the database endured (dial attempts).
// The demo and the chaos benchmark are built on it.
package chaos

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/cenkalti/backoff/v5"
	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// Target is the database a run uses.
type Target struct {
	Driver string           // "pgx" or "mysql"
	DSN    string           // an administrator's DSN
	Server *dbserver.Server // a private server (restarts and MySQL kills need one); nil for an existing one
	// Cluster is a Patroni cluster (the failover scenario needs one); DSN
	// is then its multi-host DSN.
	Cluster *dbserver.Patroni
}

// Strategy is how the application retries.
type Strategy struct {
	Name    string
	Wrapped bool              // the *sql.DB is opened through sqlretry
	Options []sqlretry.Option // for sqlretry.OpenDB
	Run     workload.Strategy
}

// ImmediateTries is how often the immediate loop runs a transaction.
const ImmediateTries = 10

var (
	// Plain is database/sql with no retries.
	Plain = Strategy{Name: "plain", Run: workload.Plain}
	// Immediate retries any error at once, up to ImmediateTries runs.
	Immediate = Strategy{Name: "immediate-loop", Run: func(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error {
		var err error
		for range ImmediateTries {
			if err = workload.Plain(ctx, db, opts, body); err == nil || ctx.Err() != nil {
				return err
			}
		}
		return err
	}}
	// Backoff is a hand-written loop around the whole transaction with
	// github.com/cenkalti/backoff/v5 and its defaults (exponential, 500 ms
	// initial interval, x1.5, jitter 0.5), retrying every error.
	Backoff = Strategy{Name: "cenkalti-backoff", Run: func(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error {
		_, err := backoff.Retry(ctx, func() (struct{}, error) {
			return struct{}{}, workload.Plain(ctx, db, opts, body)
		})
		return err
	}}
	// Sqlretry is sqlretry.Open with its defaults and sqlretry.RunInTx.
	Sqlretry = Strategy{Name: "sqlretry", Wrapped: true, Run: workload.RunInTx}

	// SqlretryNoCC is sqlretry without contention control, to measure it.
	SqlretryNoCC = Strategy{Name: "sqlretry-no-cc", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithContentionControl(false)}}

	// SqlretryQueue is sqlretry with contention control's database-side
	// queue (WithContentionQueue), for applications running as replicas.
	SqlretryQueue = Strategy{Name: "sqlretry-queue", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithContentionQueue(true)}}

	// SqlretryNoShortWait is sqlretry without short lock waits for replays
	// (WithShortLockWait(false)), to measure them. Since they are off by
	// default it is the same as Sqlretry; kept for the commands the README
	// quotes from when they were on.
	SqlretryNoShortWait = Strategy{Name: "sqlretry-no-shortwait", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithShortLockWait(false)}}

	// SqlretryShortWait is sqlretry with short lock waits for replays
	// (WithShortLockWait(true), off by default).
	SqlretryShortWait = Strategy{Name: "sqlretry-shortwait", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithShortLockWait(true)}}

	// SqlretryNoShortDeadlock is sqlretry without short deadlock checks for
	// replays (WithShortDeadlockCheck(false); on by default), to measure
	// them.
	SqlretryNoShortDeadlock = Strategy{Name: "sqlretry-no-shortdeadlock", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithShortDeadlockCheck(false)}}

	// SqlretryNoResolution is sqlretry without lost-COMMIT resolution
	// (WithCommitResolution(false): no transaction-id question on
	// PostgreSQL, no commit marker on MySQL/MariaDB), to measure its share
	// of a workload's cost.
	SqlretryNoResolution = Strategy{Name: "sqlretry-no-resolution", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithCommitResolution(false)}}

	// SqlretryNoSpread is sqlretry without the replay spread
	// (WithReplaySpread(false); on by default), to measure it.
	SqlretryNoSpread = Strategy{Name: "sqlretry-no-spread", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithReplaySpread(false)}}

	// SqlretrySpread is sqlretry with the replay spread on
	// (WithReplaySpread(true); on by default for MySQL/MariaDB only), to
	// measure it on PostgreSQL.
	SqlretrySpread = Strategy{Name: "sqlretry-spread", Wrapped: true, Run: workload.RunInTx,
		Options: []sqlretry.Option{sqlretry.WithReplaySpread(true)}}

	// Strategies are the strategies the chaos benchmark runs by default.
	Strategies = []Strategy{Plain, Immediate, Backoff, Sqlretry}
	// Extra are strategies to run by name only.
	Extra = []Strategy{SqlretryNoSpread, SqlretrySpread, SqlretryNoCC, SqlretryQueue, SqlretryNoShortWait, SqlretryShortWait, SqlretryNoShortDeadlock, SqlretryNoResolution}
)

// Scenario is a workload and the faults injected while it runs.
type Scenario struct {
	Name      string
	Accounts  int           // few accounts: more conflicts
	Workers   int           // concurrent callers
	Duration  time.Duration // of the run
	OpTimeout time.Duration // each logical operation's deadline
	KillEvery time.Duration // kill one of the workload's sessions this often (0: never)
	RestartAt time.Duration // crash the server this far into the run (0: never) ...
	Outage    time.Duration // ... and start it again after this long
	Latency   time.Duration // added each way by a proxy (0: no proxy)
	Replicas  int           // RunReplicas: independent *sql.DBs sharing Workers (0: one) ...
	Processes bool          // ... each in a process of its own (the chaos command only)
	// FailoverAt kills the Patroni cluster's leader node (Patroni and
	// PostgreSQL) this far into the run (0: never): the cluster takes
	// writes again on the sync standby after the DCS TTL. The killed node
	// rejoins after the run.
	FailoverAt time.Duration
	// NoContention, when not 0, runs the same workload again on this
	// many accounts (no contention), right after each strategy's run on
	// Accounts, and reports the ratio of the two (RunPair): how close a
	// strategy comes to the rate the hot spot would have without its
	// conflicts.
	NoContention int
}

// Report is one run's figures.
type Report struct {
	Driver, Scenario, Strategy string
	Committed, Failed, Unknown int64
	TxPerSec                   float64
	Errors                     map[string]int // surfaced errors by kind
	Attempts                   int64          // transaction bodies run
	AttemptsPerCommit          float64
	P50ms, P99ms, P999ms       float64 // latency of a logical operation
	MeanMs                     float64 // workers / throughput, by Little's law
	MaxMs                      float64 // the slowest logical operation (a starved caller shows here)
	Dials                      int     // connection attempts in the whole run
	DialsInOutage              int     // connection attempts while the server was down
	DialsPerSecInOutage        float64
	RecoveryMs                 float64 // first commit after the server was back; -1: none
	Kills                      int
	workload.Invariants
	TickMs                 float64
	Timeline               []int            // commits per tick
	OutageFromS, OutageToS float64          // seconds into the run; 0, 0: no outage
	Sqlretry               *sqlretry.Stats  `json:",omitempty"`
	Replicas               int              `json:",omitempty"` // RunReplicas: how many ...
	Processes              bool             `json:",omitempty"` // ... as processes
	ReplicaCommitted       []int64          `json:",omitempty"` // ... and each one's commits
	ReplicaStats           []sqlretry.Stats `json:",omitempty"`
	// RunPair: the same strategy's run on Scenario.NoContention accounts,
	// and TxPerSec's ratio to it.
	NoContention        *Report `json:",omitempty"`
	RatioToNoContention float64 `json:",omitempty"`
}

// RunPair runs sc with st on sc.Accounts and then on sc.NoContention
// accounts, and returns the first run's report with the second's as its
// reference.
func RunPair(ctx context.Context, tg Target, sc Scenario, st Strategy, progress func(elapsed time.Duration, committed, failed int64)) (*Report, error) {
	hot, err := Run(ctx, tg, sc, st, progress)
	if err != nil || sc.NoContention == 0 {
		return hot, err
	}
	cold := sc
	cold.Name, cold.Accounts, cold.NoContention = sc.Name+"-nocontention", sc.NoContention, 0
	ref, err := Run(ctx, tg, cold, st, progress)
	if err != nil {
		return nil, err
	}
	hot.NoContention = ref
	if ref.TxPerSec > 0 {
		hot.RatioToNoContention = hot.TxPerSec / ref.TxPerSec
	}
	return hot, nil
}

// Run runs one scenario with one strategy on fresh tables; progress, when
// not nil, is called about once a second.
func Run(ctx context.Context, tg Target, sc Scenario, st Strategy, progress func(elapsed time.Duration, committed, failed int64)) (*Report, error) {
	if sc.FailoverAt > 0 {
		if tg.Cluster == nil {
			return nil, fmt.Errorf("scenario %s kills a cluster's leader: it needs a Patroni cluster", sc.Name)
		}
		// Every node back (the one killed by the last run rejoins), one
		// of them the sync standby the failover needs.
		if err := tg.Cluster.WaitHealthy(3 * time.Minute); err != nil {
			return nil, fmt.Errorf("the cluster is not healthy: %w", err)
		}
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
	defer func() {
		drop := admin
		if sc.FailoverAt > 0 {
			// The admin's sessions were on the old leader.
			var err error
			if drop, err = sql.Open(tg.Driver, tg.DSN); err != nil {
				return
			}
			defer drop.Close()
		}
		bank.Drop(context.Background(), drop)
	}()

	connector, dials, victims, stop, err := workConnector(ctx, tg, sc, admin, run)
	if err != nil {
		return nil, err
	}
	defer stop()
	var db *sql.DB
	tr := newTracer(st.Name + "-" + sc.Name) // nil unless CHAOS_TRACE is set
	defer tr.dump()
	if st.Wrapped {
		opts := append([]sqlretry.Option(nil), st.Options...)
		if os.Getenv("CHAOS_LOG_RESOLUTIONS") != "" {
			// Each lost COMMIT's resolution and the rule that decided
			// (CHAOS_TRACE's observer replaces this one when both are set).
			opts = append(opts, sqlretry.WithObserver(sqlretry.ObserverFunc(func(_ context.Context, e sqlretry.Event) {
				if e.Kind == sqlretry.EventCommitResolved {
					log.Printf("%s/%s/%s: COMMIT resolution: outcome=%v reason=%q err=%v", tg.Driver, sc.Name, st.Name, e.Outcome, e.Reason, e.Err)
				}
			})))
		}
		db = sqlretry.OpenDB(connector, append(opts, tr.options()...)...)
		stopWatch := make(chan struct{})
		defer close(stopWatch)
		go tr.watch(db, stopWatch)
	} else {
		db = sql.OpenDB(connector)
	}
	defer db.Close()
	db.SetMaxOpenConns(sc.Workers)
	db.SetMaxIdleConns(sc.Workers)

	chaosCtx, stopChaos := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var kills atomic.Int64
	var down, up time.Time
	var chaosErr error
	start := time.Now()
	if sc.KillEvery > 0 && victims != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kills.Store(int64(killSessions(chaosCtx, admin, tg.Driver, victims, sc.KillEvery)))
		}()
	}
	if sc.RestartAt > 0 {
		if tg.Server == nil {
			stopChaos()
			return nil, fmt.Errorf("scenario %s restarts the server: it needs a private server", sc.Name)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-chaosCtx.Done():
				return
			case <-time.After(sc.RestartAt):
			}
			down = time.Now()
			tr.logf("CRASH")
			if chaosErr = tg.Server.Crash(); chaosErr != nil {
				return
			}
			time.Sleep(sc.Outage) // even when the run is interrupted: the server must come back
			tr.logf("RESUME")
			chaosErr = tg.Server.Resume()
			up = time.Now()
			tr.logf("UP")
		}()
	}
	var killed *dbserver.PatroniNode
	if sc.FailoverAt > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-chaosCtx.Done():
				return
			case <-time.After(sc.FailoverAt):
			}
			down = time.Now()
			if killed, chaosErr = tg.Cluster.KillLeaderNode(); chaosErr != nil {
				return
			}
			// When the cluster takes writes again, by writing to each
			// node directly.
			_, chaosErr = tg.Cluster.WaitWritableExcept(2*time.Minute, killed)
			up = time.Now()
		}()
	}
	res := workload.Run(ctx, workload.Config{Workers: sc.Workers, Duration: sc.Duration, OpTimeout: sc.OpTimeout, Progress: progress}, bank, db, st.Run)
	stopChaos()
	if tg.Driver == "pgx" && os.Getenv("CHAOS_TABLESTATS") != "" {
		var upd, hot int64
		var an sql.NullTime
		err := admin.QueryRowContext(ctx, "SELECT n_tup_upd, n_tup_hot_upd, last_autoanalyze FROM pg_stat_user_tables WHERE relname = $1", run+"_accounts").Scan(&upd, &hot, &an)
		log.Printf("TABLESTATS %s/%s: updates %d, HOT %d, autoanalyzed %v %v (err %v)", sc.Name, st.Name, upd, hot, an.Valid, an.Time.Format("15:04:05.000"), err)
	}
	wg.Wait()
	if killed != nil {
		if err := tg.Cluster.StartNode(killed); err != nil {
			return nil, fmt.Errorf("starting the killed node again: %w", err)
		}
	}
	if chaosErr != nil {
		return nil, fmt.Errorf("restarting the server: %w", chaosErr)
	}
	check := admin
	if sc.FailoverAt > 0 {
		// The admin's sessions were on the old leader.
		if check, err = sql.Open(tg.Driver, tg.DSN); err != nil {
			return nil, err
		}
		defer check.Close()
	}
	inv, err := bank.Check(context.Background(), check, res)
	if err != nil {
		return nil, fmt.Errorf("checking the invariants: %w", err)
	}
	r := &Report{
		Driver: tg.Driver, Scenario: sc.Name, Strategy: st.Name,
		Committed: res.Committed, Failed: res.Failed, Unknown: res.Unknown,
		TxPerSec: float64(res.Committed) / res.Elapsed.Seconds(),
		Errors:   res.Errors, Attempts: res.Attempts,
		P50ms: ms(res.Percentile(50)), P99ms: ms(res.Percentile(99)), P999ms: ms(res.Percentile(99.9)),
		Dials: dials.Between(time.Time{}, time.Now()), Kills: int(kills.Load()),
		Invariants: inv, TickMs: 100, Timeline: res.Timeline, RecoveryMs: -1,
	}
	if n := len(res.Latencies); n > 0 {
		r.MaxMs = ms(res.Latencies[n-1])
		var sum time.Duration
		for _, l := range res.Latencies {
			sum += l
		}
		r.MeanMs = ms(sum / time.Duration(n))
	}
	if res.Committed > 0 {
		r.AttemptsPerCommit = float64(res.Attempts) / float64(res.Committed)
	}
	if !down.IsZero() {
		r.DialsInOutage = dials.Between(down, up)
		r.DialsPerSecInOutage = float64(r.DialsInOutage) / up.Sub(down).Seconds()
		r.OutageFromS, r.OutageToS = down.Sub(start).Seconds(), up.Sub(start).Seconds()
		for i, n := range res.Timeline {
			at := start.Add(time.Duration(i) * 100 * time.Millisecond)
			if !at.Before(up) && n > 0 {
				r.RecoveryMs = ms(at.Sub(up))
				break
			}
		}
	}
	if s, ok := sqlretry.StatsOf(db); ok {
		r.Sqlretry = &s
	}
	return r, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// workConnector builds the workload's connector: through a latency proxy
// when the scenario asks for one, with every dial logged, and named so that
// the killer finds the workload's sessions (victims is the query that picks
// one; empty when the sessions cannot be told apart safely).
func workConnector(ctx context.Context, tg Target, sc Scenario, admin *sql.DB, run string) (driver.Connector, *workload.DialLog, string, func(), error) {
	dials := &workload.DialLog{}
	stop := func() {}
	proxied := func(addr string) (string, error) {
		if sc.Latency <= 0 {
			return addr, nil
		}
		srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
		p := toxiproxy.NewProxy(srv, "db", "127.0.0.1:0", addr)
		if err := p.Start(); err != nil {
			return "", err
		}
		stop = p.Stop
		for _, stream := range []string{"upstream", "downstream"} {
			js := fmt.Sprintf(`{"name":"lat-%s","type":"latency","stream":%q,"toxicity":1,"attributes":{"latency":%d,"jitter":%d}}`,
				stream, stream, sc.Latency.Milliseconds(), sc.Latency.Milliseconds()/4)
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
				p.Stop()
				return "", err
			}
		}
		return p.Listen, nil
	}
	switch tg.Driver {
	case "pgx":
		cfg, err := pgx.ParseConfig(tg.DSN)
		if err != nil {
			return nil, nil, "", nil, err
		}
		cfg.RuntimeParams["application_name"] = run
		cfg.ConnectTimeout = 2 * time.Second
		addr, err := proxied(net.JoinHostPort(cfg.Host, fmt.Sprint(cfg.Port)))
		if err != nil {
			return nil, nil, "", nil, err
		}
		host, port, _ := net.SplitHostPort(addr)
		cfg.Host = host
		fmt.Sscan(port, &cfg.Port)
		cfg.DialFunc = dials.Dial
		victims := fmt.Sprintf(`SELECT pid FROM pg_stat_activity WHERE application_name = '%s' AND state <> 'idle' ORDER BY random() LIMIT 1`, run)
		return stdlib.GetConnector(*cfg), dials, victims, stop, nil
	case "mysql":
		cfg, err := mysql.ParseDSN(tg.DSN)
		if err != nil {
			return nil, nil, "", nil, err
		}
		victims := ""
		if tg.Server != nil {
			// On a private server the workload runs as its own user, so that
			// the killer finds its sessions.
			user := "w" + run[len(run)-8:]
			for _, q := range []string{"CREATE USER IF NOT EXISTS '" + user + "'@'127.0.0.1'", "GRANT ALL PRIVILEGES ON *.* TO '" + user + "'@'127.0.0.1'"} {
				if _, err := admin.ExecContext(ctx, q); err != nil {
					return nil, nil, "", nil, err
				}
			}
			cfg.User, cfg.Passwd = user, ""
			victims = "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '" + user + "' AND COMMAND <> 'Sleep' ORDER BY RAND() LIMIT 1"
		}
		cfg.Timeout = 2 * time.Second
		cfg.ParseTime = true
		addr, err := proxied(cfg.Addr)
		if err != nil {
			return nil, nil, "", nil, err
		}
		cfg.Addr = addr
		cfg.DialFunc = dials.Dial
		c, err := mysql.NewConnector(cfg)
		if err != nil {
			stop()
			return nil, nil, "", nil, err
		}
		return c, dials, victims, stop, nil
	}
	return nil, nil, "", nil, fmt.Errorf("unknown driver %q (pgx or mysql)", tg.Driver)
}

// killSessions kills one busy session of the workload every period and
// returns how many it killed.
func killSessions(ctx context.Context, admin *sql.DB, driverName, victims string, every time.Duration) int {
	kills := 0
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return kills
		case <-t.C:
		}
		var id int64
		if admin.QueryRowContext(ctx, victims).Scan(&id) != nil {
			continue
		}
		var err error
		if driverName == "pgx" {
			_, err = admin.ExecContext(ctx, "SELECT pg_terminate_backend($1)", id)
		} else {
			_, err = admin.ExecContext(ctx, fmt.Sprintf("KILL CONNECTION %d", id))
		}
		if err == nil {
			kills++
		}
	}
}

// QuietDriverLogs stops go-sql-driver/mysql from logging every broken
// connection to stderr: the faults are deliberate, and the callers' errors
// are counted in the report.
func QuietDriverLogs() {
	mysql.SetLogger(log.New(io.Discard, "", 0))
}
