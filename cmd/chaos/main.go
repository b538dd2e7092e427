// Command chaos is the chaos benchmark: the transfer workload under fault
// scenarios (hot-spot contention, killed connections, a server restart,
// added network latency), each run with four strategies one after the other
// on fresh tables of private throwaway servers: the plain driver, an
// immediate retry loop, a hand-written loop with cenkalti/backoff/v5, and
// sqlretry. It prints a table, writes the figures as JSON and a Markdown
// table, and plots committed transactions over time in the restart scenario.
//
//	go run ./chaos                                    # both engines, every scenario (about 6 minutes)
//	go run ./chaos -drivers pgx -scenarios hotspot    # one engine, one scenario
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry/cmd/internal/chaos"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

var (
	driversFlag    = flag.String("drivers", "pgx,mysql", "engines: pgx (PostgreSQL), mysql (MariaDB)")
	scenariosFlag  = flag.String("scenarios", "hotspot,kills,restart,latency,replicas,failover", "scenarios to run (failover: PostgreSQL only, on a Patroni cluster; also: hotratio, 8 hot accounts against 100,000)")
	strategiesFlag = flag.String("strategies", "plain,immediate-loop,cenkalti-backoff,sqlretry", "strategies to run (also: sqlretry-no-cc, sqlretry without contention control; sqlretry-queue, with WithContentionQueue; sqlretry-shortwait, with WithShortLockWait(true); sqlretry-no-shortdeadlock, with WithShortDeadlockCheck(false); sqlretry-no-resolution, with WithCommitResolution(false); sqlretry-no-spread, with WithReplaySpread(false); sqlretry-spread, with WithReplaySpread(true))")
	duration       = flag.Duration("duration", 5*time.Second, "run time per strategy (the restart scenario adds the outage and the breaker's open timeout)")
	outDir         = flag.String("out", "docs/chaos", "directory for chaos.json, chaos.md and the restart plots")
	replot         = flag.Bool("replot", false, "only draw the plots and chaos.md again from the chaos.json in -out")
	deployments    = flag.String("replicas", "1,2,4,8", "replicas scenario: how many replicas share the 16 workers, one deployment after the other")
	pgDSN          = flag.String("pg-dsn", "", "use this PostgreSQL server instead of a private one (scenarios that restart the server or kill MySQL sessions need a private one)")
	mysqlDSN       = flag.String("mysql-dsn", "", "use this MariaDB server instead of a private one")
	processes      = flag.Bool("processes", false, "replicas scenario: run each replica as a process of its own instead of a *sql.DB of this one")
	replicaChild   = flag.String(chaos.ReplicaChildFlag, "", "(internal) run one replica process")
)

func scenarios(d time.Duration) []chaos.Scenario {
	const outage, restartAt = 5 * time.Second, 2 * time.Second
	return []chaos.Scenario{
		// Few accounts, many workers: SERIALIZABLE on PostgreSQL, locking
		// reads in random order on MariaDB.
		{Name: "hotspot", Accounts: 4, Workers: 16, Duration: d, OpTimeout: 10 * time.Second},
		// The hot spot of 8 accounts and, right after each strategy's
		// run, the same workload on 100,000 accounts (no contention): the
		// ratio says how much of the hot spot's rate conflicts cost.
		{Name: "hotratio", Accounts: 8, Workers: 16, Duration: d, OpTimeout: 10 * time.Second, NoContention: 100000},
		{Name: "kills", Accounts: 100, Workers: 8, Duration: d, OpTimeout: 10 * time.Second, KillEvery: 200 * time.Millisecond},
		// The server crashes 2 s in and is back 5 s later; the run goes on
		// 7 s after that, so that the recovery shows (the default breaker
		// probes once a second).
		{Name: "restart", Accounts: 100, Workers: 8, Duration: restartAt + outage + 7*time.Second, OpTimeout: 10 * time.Second,
			RestartAt: restartAt, Outage: outage},
		{Name: "latency", Accounts: 100, Workers: 8, Duration: d, OpTimeout: 10 * time.Second, Latency: 20 * time.Millisecond},
		// A deployment of several replicas of the application, each with
		// its own *sql.DB, on one hot spot: 16 workers in all, split
		// evenly (-replicas), 8 hot accounts, 20 s deadlines.
		{Name: "replicas", Accounts: 8, Workers: 16, Duration: d, OpTimeout: 20 * time.Second},
		// A Patroni cluster of 3 (synchronous mode, TTL 8 s) loses its
		// leader node 2 s in; the sync standby takes writes about a TTL
		// later; the run goes on 8 s after that. 30 s deadlines: longer
		// than the election.
		{Name: "failover", Accounts: 100, Workers: 8, Duration: restartAt + (dbserver.PatroniTTL+10)*time.Second, OpTimeout: 30 * time.Second,
			FailoverAt: restartAt},
	}
}

func main() {
	flag.Parse()
	chaos.QuietDriverLogs()
	if *replicaChild != "" {
		if err := chaos.RunReplicaChild(*replicaChild); err != nil {
			fmt.Fprintln(os.Stderr, "chaos replica:", err)
			os.Exit(1)
		}
		return
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
}

type output struct {
	Command string
	Machine string
	Servers map[string]string
	Started time.Time
	Reports []*chaos.Report
}

func run(ctx context.Context) error {
	if *replot {
		return redraw()
	}
	drivers := split(*driversFlag)
	var strategies []chaos.Strategy
	for _, name := range split(*strategiesFlag) {
		all := append(slices.Clone(chaos.Strategies), chaos.Extra...)
		i := slices.IndexFunc(all, func(s chaos.Strategy) bool { return s.Name == name })
		if i < 0 {
			return fmt.Errorf("unknown strategy %q", name)
		}
		strategies = append(strategies, all[i])
	}
	var scs []chaos.Scenario
	for _, name := range split(*scenariosFlag) {
		all := scenarios(*duration)
		i := slices.IndexFunc(all, func(s chaos.Scenario) bool { return s.Name == name })
		if i < 0 {
			return fmt.Errorf("unknown scenario %q", name)
		}
		scs = append(scs, all[i])
	}
	out := output{Command: "make chaos  # go run ./chaos " + strings.Join(os.Args[1:], " "), Machine: machine(), Servers: map[string]string{}, Started: time.Now().UTC()}
	for _, d := range drivers {
		kind, ok := dbserver.KindFor(d)
		if !ok {
			return fmt.Errorf("unknown driver %q (pgx or mysql)", d)
		}
		var own, failover []chaos.Scenario
		for _, sc := range scs {
			if sc.FailoverAt == 0 {
				own = append(own, sc)
			} else if d == "pgx" {
				failover = append(failover, sc)
			} else {
				fmt.Printf("%s: no %s scenario (PostgreSQL on Patroni only)\n", d, sc.Name)
			}
		}
		if dsn := map[string]string{"pgx": *pgDSN, "mysql": *mysqlDSN}[d]; dsn != "" && len(own) > 0 {
			// An existing server: no Server to restart or kill sessions on.
			if err := runDriver(ctx, &out, d, chaos.Target{Driver: d, DSN: dsn}, "existing server", own, strategies); err != nil {
				return err
			}
			own = nil
		}
		if len(own) > 0 {
			fmt.Printf("starting a private %s server...\n", kind)
			srv, err := dbserver.Start(ctx, kind)
			if err != nil {
				return err
			}
			err = runDriver(ctx, &out, d, chaos.Target{Driver: d, DSN: srv.DSN, Server: srv}, srv.Source, own, strategies)
			srv.Stop()
			if err != nil {
				return err
			}
		}
		if len(failover) > 0 {
			fmt.Printf("starting a Patroni cluster of 3 PostgreSQL nodes...\n")
			cluster, err := dbserver.StartPatroni(3)
			if err != nil {
				return err
			}
			fmt.Printf("  up in %v: %s\n", cluster.Startup.Round(time.Millisecond), cluster.Members())
			err = runDriver(ctx, &out, d+"-patroni", chaos.Target{Driver: d, DSN: cluster.DSN, Cluster: cluster}, "Patroni 3 nodes, local binaries", failover, strategies)
			cluster.Stop()
			if err != nil {
				return err
			}
		}
	}
	return write(&out)
}

func runDriver(ctx context.Context, out *output, name string, tg chaos.Target, source string, scs []chaos.Scenario, strategies []chaos.Strategy) error {
	d := tg.Driver
	out.Servers[name] = version(d, tg.DSN) + " (" + source + ")"
	fmt.Printf("%s: %s\n", name, out.Servers[name])
	for _, sc := range scs {
		if sc.Name == "replicas" {
			if err := runReplicas(ctx, out, tg, sc, strategies); err != nil {
				return err
			}
			continue
		}
		var reports []*chaos.Report
		for _, st := range strategies {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Printf("  %s/%s/%s (%v)\n", d, sc.Name, st.Name, sc.Duration)
			r, err := chaos.RunPair(ctx, tg, sc, st, func(el time.Duration, c, f int64) {
				fmt.Printf("\r    %3.0fs committed %7d  failed %7d", el.Seconds(), c, f)
			})
			fmt.Print("\r\033[K")
			if err != nil {
				return fmt.Errorf("%s/%s/%s: %w", d, sc.Name, st.Name, err)
			}
			reports = append(reports, r)
		}
		out.Reports = append(out.Reports, reports...)
		table(os.Stdout, reports)
		if sc.RestartAt > 0 || sc.FailoverAt > 0 {
			if err := os.MkdirAll(*outDir, 0o755); err != nil {
				return err
			}
			file := filepath.Join(*outDir, sc.Name+"-"+d+".svg")
			if err := plotRestart(file, d, sc.Name, reports); err != nil {
				return err
			}
			fmt.Println("  plot:", file)
		}
	}
	return nil
}

// redraw draws the plots and chaos.md from the figures of an earlier run.
func redraw() error {
	js, err := os.ReadFile(filepath.Join(*outDir, "chaos.json"))
	if err != nil {
		return err
	}
	var out output
	if err := json.Unmarshal(js, &out); err != nil {
		return err
	}
	for _, d := range []string{"pgx", "mysql"} {
		for _, sc := range []string{"restart", "failover"} {
			var reports []*chaos.Report
			for _, r := range out.Reports {
				if r.Driver == d && r.Scenario == sc && r.OutageToS > 0 {
					reports = append(reports, r)
				}
			}
			if len(reports) == 0 {
				continue
			}
			file := filepath.Join(*outDir, sc+"-"+d+".svg")
			if err := plotRestart(file, d, sc, reports); err != nil {
				return err
			}
			fmt.Println("plot:", file)
		}
	}
	for _, d := range []string{"pgx", "mysql"} {
		var reports []*chaos.Report
		for _, r := range out.Reports {
			if r.Driver == d && r.Replicas > 0 {
				reports = append(reports, r)
			}
		}
		if len(reports) == 0 {
			continue
		}
		file := filepath.Join(*outDir, "replicas-"+d+".svg")
		if err := plotReplicas(file, d, reports); err != nil {
			return err
		}
		fmt.Println("plot:", file)
	}
	return writeMarkdown(&out)
}

func table(w io.Writer, reports []*chaos.Report) {
	if len(reports) == 0 {
		return
	}
	fmt.Fprintf(w, "\n%s / %s\n", reports[0].Driver, reports[0].Scenario)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "strategy\ttx/s\tcommitted\tsurfaced\tattempts/commit\tp50 ms\tp99 ms\tp99.9 ms\tmean ms\tdials/s in outage\trecovery ms\tmoney ok\tlost\tphantom\t")
	for _, r := range reports {
		fmt.Fprintf(tw, "%s\t%.0f\t%d\t%d\t%.2f\t%.1f\t%.0f\t%.0f\t%.1f\t%s\t%s\t%v\t%d\t%d\t\n", r.Strategy, r.TxPerSec, r.Committed, r.Failed,
			r.AttemptsPerCommit, r.P50ms, r.P99ms, r.P999ms, r.MeanMs, outageDials(r), recovery(r), r.MoneyConserved && r.LedgerMatches, r.Lost, r.Phantom)
	}
	tw.Flush()
	for _, r := range reports {
		for _, e := range topErrors(r, 3) {
			fmt.Fprintf(w, "    %s: %s\n", r.Strategy, e)
		}
	}
	fmt.Fprintln(w)
	ratioTable(w, reports)
}

// ratioTable prints, for a scenario run against its no-contention
// reference (hotratio), each strategy's two rates and their ratio.
func ratioTable(w io.Writer, reports []*chaos.Report) {
	if len(reports) == 0 || reports[0].NoContention == nil {
		return
	}
	fmt.Fprintf(w, "%s / %s against %s\n", reports[0].Driver, reports[0].Scenario, reports[0].NoContention.Scenario)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "strategy\thot tx/s\tno-contention tx/s\tratio\thot surfaced\thot p99.9 ms\thot max ms\tno-contention surfaced\t")
	for _, r := range reports {
		if ref := r.NoContention; ref != nil {
			fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.2f\t%d\t%.0f\t%.0f\t%d\t\n", r.Strategy, r.TxPerSec, ref.TxPerSec, r.RatioToNoContention, r.Failed, r.P999ms, r.MaxMs, ref.Failed)
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
}

func outageDials(r *chaos.Report) string {
	if r.OutageToS == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", r.DialsPerSecInOutage)
}

func recovery(r *chaos.Report) string {
	switch {
	case r.OutageToS == 0:
		return "-"
	case r.RecoveryMs < 0:
		return "never"
	}
	return fmt.Sprintf("%.0f", r.RecoveryMs)
}

// topErrors lists the most frequent surfaced errors.
func topErrors(r *chaos.Report, n int) []string {
	type kv struct {
		k string
		v int
	}
	var all []kv
	for k, v := range r.Errors {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v || all[i].v == all[j].v && all[i].k < all[j].k })
	var s []string
	for i, e := range all {
		if i == n {
			s = append(s, fmt.Sprintf("... %d more kinds", len(all)-n))
			break
		}
		s = append(s, fmt.Sprintf("%d × %s", e.v, e.k))
	}
	return s
}

func write(out *output) error {
	if err := os.MkdirAll(*outDir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*outDir, "chaos.json"), js, 0o644); err != nil {
		return err
	}
	return writeMarkdown(out)
}

// writeMarkdown writes chaos.md, the table of every report.
func writeMarkdown(out *output) error {
	var md strings.Builder
	fmt.Fprintf(&md, "Made by `%s` on %s, %s; %s.\n\n", out.Command, out.Started.Format("2006-01-02"), out.Machine, serversLine(out.Servers))
	fmt.Fprintln(&md, "| engine | scenario | strategy | tx/s | surfaced errors | attempts/commit | p50 ms | p99 ms | p99.9 ms | mean ms | dials/s in outage | recovery ms | money, lost, phantom |")
	fmt.Fprintln(&md, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
	var rows []*chaos.Report
	for _, r := range out.Reports {
		rows = append(rows, r)
		if r.NoContention != nil {
			rows = append(rows, r.NoContention)
		}
	}
	for _, r := range rows {
		inv := "ok, 0, 0"
		if !(r.MoneyConserved && r.LedgerMatches) || r.Lost != 0 || r.Phantom != 0 {
			inv = fmt.Sprintf("**%v, %d, %d**", r.MoneyConserved && r.LedgerMatches, r.Lost, r.Phantom)
		}
		scenario := r.Scenario
		if r.Replicas > 0 {
			scenario += " " + deployment(r)
		}
		fmt.Fprintf(&md, "| %s | %s | %s | %.0f | %d | %.2f | %.1f | %.0f | %.0f | %.1f | %s | %s | %s |\n", r.Driver, scenario, r.Strategy, r.TxPerSec,
			r.Failed, r.AttemptsPerCommit, r.P50ms, r.P99ms, r.P999ms, r.MeanMs, outageDials(r), recovery(r), inv)
	}
	for _, r := range out.Reports {
		if r.NoContention != nil {
			fmt.Fprintf(&md, "\n%s/%s/%s: %.0f tx/s against %.0f on %s, ratio %.2f\n", r.Driver, r.Scenario, r.Strategy, r.TxPerSec, r.NoContention.TxPerSec, r.NoContention.Scenario, r.RatioToNoContention)
		}
	}
	fmt.Fprintln(&md, "\nSurfaced errors by kind:")
	fmt.Fprintln(&md)
	for _, r := range out.Reports {
		if errs := topErrors(r, 3); len(errs) > 0 {
			fmt.Fprintf(&md, "- %s/%s/%s: %s\n", r.Driver, r.Scenario, r.Strategy, strings.ReplaceAll(strings.Join(errs, "; "), "|", "/"))
		}
	}
	if err := os.WriteFile(filepath.Join(*outDir, "chaos.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s\n", filepath.Join(*outDir, "chaos.md"))
	return nil
}

func serversLine(s map[string]string) string {
	var parts []string
	for _, d := range []string{"pgx", "mysql"} {
		if v, ok := s[d]; ok {
			parts = append(parts, v)
		}
	}
	return strings.Join(parts, ", ")
}

func machine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				model = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	return fmt.Sprintf("%d CPUs (%s), %s/%s, %s", runtime.NumCPU(), model, runtime.GOOS, runtime.GOARCH, runtime.Version())
}

func version(d, dsn string) string {
	db, err := sql.Open(d, dsn)
	if err != nil {
		return "?"
	}
	defer db.Close()
	var v string
	if err := db.QueryRow("SELECT version()").Scan(&v); err != nil {
		return "?"
	}
	if i := strings.Index(v, " on "); i > 0 {
		v = v[:i]
	}
	if d == "mysql" {
		v = "MariaDB " + strings.SplitN(v, "-", 2)[0]
	}
	return v
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
