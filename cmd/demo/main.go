// Command demo runs a concurrent money-transfer workload twice, through the
// plain driver and through sqlretry, while it provokes the failures real
// databases throw: serialization failures and deadlocks on a few hot
// accounts, and (on PostgreSQL) its own sessions killed under load. It
// ends with a table of what the callers saw and what the database holds.
//
//	go run ./cmd/demo                       # local PostgreSQL
//	go run ./cmd/demo -driver mysql         # local MariaDB/MySQL
//	go run ./cmd/demo -dsn postgres://...   # any server you own
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"text/tabwriter"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
)

var (
	driverName = flag.String("driver", "pgx", "pgx or mysql")
	dsnFlag    = flag.String("dsn", "", "data source name (default: the local test database)")
	workers    = flag.Int("workers", 8, "concurrent clients")
	accounts   = flag.Int("accounts", 4, "accounts (few accounts: more conflicts)")
	duration   = flag.Duration("duration", 5*time.Second, "run time per strategy")
	killEvery  = flag.Duration("kill-every", 300*time.Millisecond, "kill one of the demo's own sessions this often (PostgreSQL; 0: never)")
)

func main() {
	flag.Parse()
	dsn := *dsnFlag
	if dsn == "" {
		dsn = map[string]string{
			"pgx":   "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
			"mysql": "root@tcp(127.0.0.1:3306)/test",
		}[*driverName]
	}
	if dsn == "" {
		fmt.Fprintf(os.Stderr, "demo: unknown -driver %q (pgx or mysql)\n", *driverName)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	run := fmt.Sprintf("sqlretry_demo_%d", rand.Uint32())
	if *driverName == "pgx" {
		sep := "?"
		if strings.Contains(dsn, "?") {
			sep = "&"
		}
		dsn += sep + "application_name=" + run // how the chaos finds the demo's own sessions
	}
	admin, err := sql.Open(*driverName, dsn)
	if err == nil {
		err = admin.PingContext(ctx)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: cannot reach the database (%v); start it with `make databases` or pass -dsn\n", err)
		os.Exit(1)
	}
	defer admin.Close()

	fmt.Printf("sqlretry demo: %d workers moving money between %d hot accounts for %v per strategy on %s\n",
		*workers, *accounts, *duration, *driverName)
	chaos := *driverName == "pgx" && *killEvery > 0
	if chaos {
		fmt.Printf("chaos: serialization failures (SERIALIZABLE), deadlocks, and one of the demo's own sessions killed every %v\n", *killEvery)
	} else {
		fmt.Println("chaos: deadlocks and lock conflicts (locking reads in random order)")
	}
	type row struct {
		name string
		res  *workload.Result
		inv  workload.Invariants
		s    sqlretry.Stats
	}
	var rows []row
	for _, name := range []string{"plain driver", "sqlretry"} {
		if ctx.Err() != nil {
			break
		}
		bank, err := workload.NewBank(ctx, admin, *driverName, run, *accounts)
		if err != nil {
			fmt.Fprintln(os.Stderr, "demo:", err)
			os.Exit(1)
		}
		var db *sql.DB
		strategy := workload.Plain
		if name == "sqlretry" {
			db, err = sqlretry.Open(*driverName, dsn)
			strategy = workload.RunInTx
		} else {
			db, err = sql.Open(*driverName, dsn)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "demo:", err)
			os.Exit(1)
		}
		db.SetMaxOpenConns(*workers)
		runCtx, cancelChaos := context.WithCancel(ctx)
		if chaos {
			go killSessions(runCtx, admin, run)
		}
		res := workload.Run(ctx, workload.Config{Workers: *workers, Duration: *duration,
			Progress: func(el time.Duration, c, f int64) {
				fmt.Printf("  %-12s %3.0fs  committed %6d  failed %5d\n", name, el.Seconds(), c, f)
			}}, bank, db, strategy)
		cancelChaos()
		inv, err := bank.Check(ctx, admin, res)
		if err != nil {
			fmt.Fprintln(os.Stderr, "demo: checking:", err)
		}
		s, _ := sqlretry.StatsOf(db)
		rows = append(rows, row{name, res, inv, s})
		db.Close()
		bank.Drop(context.Background(), admin)
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "strategy\tcommitted\ttx/s\tfailed (caller saw)\tretries\tp99\tlost acks\tphantom writes\tmoney conserved\tledger = balances\t")
	for _, r := range rows {
		retries := r.s.RetriesStatement + r.s.RetriesTransaction + r.s.HandOffs
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%d\t%d\t%v\t%d\t%d\t%v\t%v\t\n", r.name, r.res.Committed,
			float64(r.res.Committed)/r.res.Elapsed.Seconds(), r.res.Failed, retries, r.res.Percentile(99).Round(time.Millisecond),
			r.inv.Lost, r.inv.Phantom, r.inv.MoneyConserved, r.inv.LedgerMatches)
	}
	tw.Flush()
	for _, r := range rows {
		if len(r.res.Errors) > 0 {
			fmt.Printf("\nerrors the callers saw with the %s:\n", r.name)
			for e, n := range r.res.Errors {
				fmt.Printf("  %6d  %s\n", n, e)
			}
		}
	}
}

// killSessions ends one of the demo's own busy sessions now and then.
func killSessions(ctx context.Context, admin *sql.DB, run string) {
	t := time.NewTicker(*killEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			admin.ExecContext(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
				WHERE application_name = $1 AND pid <> pg_backend_pid() AND state <> 'idle'
				ORDER BY random() LIMIT 1`, run)
		}
	}
}
