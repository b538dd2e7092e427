// Command demo is sqlretry's main job in one run: a concurrent
// money-transfer workload on a few hot accounts, first through the plain
// driver and then through sqlretry, while it provokes the failures real
// databases throw: serialization failures and deadlocks, its own sessions
// killed under load, and a server crash and restart. It ends with a table
// of what the callers saw and what the database holds.
//
// It starts a private throwaway server by itself (the locally installed
// server binaries, else a Docker engine through testcontainers-go) and
// removes it at the end, also on Ctrl-C.
//
//	go run ./demo                          # private PostgreSQL
//	go run ./demo -driver mysql            # private MariaDB
//	go run ./demo -dsn postgres://...      # a server of yours (no restart; PostgreSQL: kills only the demo's sessions)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"text/tabwriter"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry/cmd/internal/chaos"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

var (
	driverName = flag.String("driver", "pgx", "pgx (PostgreSQL) or mysql (MariaDB/MySQL)")
	dsnFlag    = flag.String("dsn", "", "an existing server's DSN (default: a private throwaway server)")
	workers    = flag.Int("workers", 8, "concurrent clients")
	accounts   = flag.Int("accounts", 4, "accounts (few accounts: more conflicts)")
	duration   = flag.Duration("duration", 10*time.Second, "run time per strategy")
	killEvery  = flag.Duration("kill-every", 300*time.Millisecond, "kill one of the demo's own sessions this often (0: never)")
	outage     = flag.Duration("outage", 2*time.Second, "crash the private server a third into the run for this long (0: never)")
	showStats  = flag.Bool("stats", false, "also print sqlretry's statistics (sqlretry.StatsOf)")
)

func main() {
	flag.Parse()
	chaos.QuietDriverLogs()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx)
	if errors.Is(err, context.Canceled) {
		fmt.Println("\ninterrupted; the private server is removed")
		os.Exit(130)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	kind, ok := dbserver.KindFor(*driverName)
	if !ok {
		return fmt.Errorf("unknown -driver %q (pgx or mysql)", *driverName)
	}
	if *workers < 1 || *accounts < 2 || *duration <= 0 || *killEvery < 0 || *outage < 0 {
		return errors.New("want -workers >= 1, -accounts >= 2, -duration > 0, -kill-every >= 0, -outage >= 0")
	}
	tg := chaos.Target{Driver: *driverName, DSN: *dsnFlag}
	if tg.DSN == "" {
		fmt.Printf("starting a private %s server... ", kind)
		srv, err := dbserver.Start(ctx, kind)
		if err != nil {
			return fmt.Errorf("%w\n(the demo starts its own %s server from the installed server binaries, or with a Docker engine; "+
				"where the binaries are missing, `make databases` installs them from Debian's packages, and also sets up "+
				"and starts the shared test servers; or pass -dsn to use a server you have)", err, kind)
		}
		defer srv.Stop()
		fmt.Printf("up (%s)\n", srv.Source)
		tg.DSN, tg.Server = srv.DSN, srv
	}
	sc := chaos.Scenario{Name: "demo", Accounts: *accounts, Workers: *workers, Duration: *duration,
		OpTimeout: 10 * time.Second, KillEvery: *killEvery}
	if tg.Server != nil && *outage > 0 {
		sc.RestartAt, sc.Outage = (*duration / 3).Round(100*time.Millisecond), *outage
	}
	fmt.Printf("\nsqlretry demo: %d workers move money between %d hot accounts for %v per strategy\n", *workers, *accounts, *duration)
	// MariaDB and MySQL raise no serialization failure under their
	// default settings: their conflicts are deadlocks (1213).
	if *driverName == "mysql" {
		fmt.Printf("faults: deadlocks on the hot accounts")
	} else {
		fmt.Printf("faults: serialization failures and deadlocks on the hot accounts")
	}
	if *killEvery > 0 {
		fmt.Printf(", one of the demo's own sessions killed every %v", *killEvery)
	}
	if sc.RestartAt > 0 {
		fmt.Printf(", the server crashed at %v and back %v later", sc.RestartAt, sc.Outage)
	}
	fmt.Print("\n\n")

	var reports []*chaos.Report
	for _, st := range []chaos.Strategy{chaos.Plain, chaos.Sqlretry} {
		name := map[string]string{"plain": "plain driver"}[st.Name]
		if name == "" {
			name = st.Name
		}
		r, err := chaos.Run(ctx, tg, sc, st, func(el time.Duration, c, f int64) {
			fmt.Printf("  %-12s %3.0fs  committed %6d  failed %6d\n", name, el.Seconds(), c, f)
		})
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.Strategy = name
		reports = append(reports, r)
	}

	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\tcommitted\ttx/s\tfailed (caller saw)\tretries\tp99\tlost writes\tphantom writes\tmoney conserved\t")
	for _, r := range reports {
		retries := "-"
		if s := r.Sqlretry; s != nil {
			retries = fmt.Sprint(s.RetriesStatement + s.RetriesTransaction + s.HandOffs)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%d\t%s\t%.0f ms\t%d\t%d\t%v\t\n", r.Strategy, r.Committed, r.TxPerSec, r.Failed, retries,
			r.P99ms, r.Lost, r.Phantom, r.MoneyConserved && r.LedgerMatches)
	}
	tw.Flush()
	for _, r := range reports {
		if s := r.Sqlretry; s != nil && *showStats {
			fmt.Printf("\nsqlretry's statistics: %+v\n", *s)
		}
	}
	for _, r := range reports {
		if len(r.Errors) == 0 {
			continue
		}
		fmt.Printf("\nerrors the callers saw with the %s, by cause (ports shown as <port>):\n", r.Strategy)
		type kv struct {
			k string
			v int
		}
		var errs []kv
		for k, v := range r.Errors {
			errs = append(errs, kv{k, v})
		}
		sort.Slice(errs, func(i, j int) bool {
			if errs[i].v != errs[j].v {
				return errs[i].v > errs[j].v
			}
			return errs[i].k < errs[j].k
		})
		for _, e := range errs {
			fmt.Printf("  %6d  %s\n", e.v, e.k)
		}
	}
	return nil
}
