// Command ceiling measures the hot spot's rate at fixed concurrencies: the
// chaos benchmark's transfer workload (16 workers, 8 hot accounts:
// SERIALIZABLE on PostgreSQL, locking reads in random order on MariaDB)
// with the workers sharing a pool of 1, 2, 4, ... connections
// (SetMaxOpenConns), for each strategy. The pool is the simplest fixed
// limit on how many transactions run at once; the best pool size is what
// a contention control that admits transactions without knowing their
// rows can hope for, and the reference for contention control's goals
// (issues 13 and 14).
//
//	cd cmd && go run ./ceiling -driver mysql
//	cd cmd && go run ./ceiling -driver pgx
//
// It uses the local servers (tables named ceiling<n>, dropped after each
// cell); nothing is killed or restarted.
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/cmd/internal/chaos"
	"github.com/sqlretry/sqlretry/internal/workload"
)

func main() {
	driver := flag.String("driver", "mysql", "pgx or mysql")
	dsn := flag.String("dsn", "", "server (default: the local PostgreSQL or MariaDB of the test set-up)")
	pools := flag.String("pools", "1,2,3,4,6,8,16", "pool sizes (transactions at once)")
	workers := flag.Int("workers", 16, "callers")
	accounts := flag.Int("accounts", 8, "hot accounts")
	dur := flag.Duration("d", 3*time.Second, "run time per cell")
	strategies := flag.String("strategies", "cenkalti-backoff,sqlretry,sqlretry-no-cc", "strategies, by the chaos benchmark's names")
	flag.Parse()
	if err := run(*driver, *dsn, *pools, *strategies, *workers, *accounts, *dur); err != nil {
		fmt.Fprintln(os.Stderr, "ceiling:", err)
		os.Exit(1)
	}
}

func run(driver, dsn, pools, strategies string, workers, accounts int, dur time.Duration) error {
	chaos.QuietDriverLogs()
	if dsn == "" {
		switch driver {
		case "pgx":
			dsn = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
		case "mysql":
			dsn = "root@tcp(127.0.0.1:3306)/test"
		default:
			return fmt.Errorf("unknown driver %q (pgx or mysql)", driver)
		}
	}
	var sizes []int
	for _, s := range strings.Split(pools, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return fmt.Errorf("bad pool size %q", s)
		}
		sizes = append(sizes, n)
	}
	all := append(slices.Clone(chaos.Strategies), chaos.Extra...)
	var sts []chaos.Strategy
	for _, name := range strings.Split(strategies, ",") {
		i := slices.IndexFunc(all, func(s chaos.Strategy) bool { return s.Name == name })
		if i < 0 {
			return fmt.Errorf("unknown strategy %q", name)
		}
		sts = append(sts, all[i])
	}
	ctx := context.Background()
	admin, err := sql.Open(driver, dsn)
	if err != nil {
		return err
	}
	defer admin.Close()
	tw := tabwriter.NewWriter(os.Stdout, 2, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "pool\tstrategy\ttx/s\tattempts/commit\tp99 ms\tsurfaced\tcuts\t\n")
	best := map[string][2]float64{} // strategy → pool, tx/s
	for _, n := range sizes {
		for _, st := range sts {
			bank, err := workload.NewBank(ctx, admin, driver, fmt.Sprintf("ceiling%d", time.Now().UnixNano()%1e9), accounts)
			if err != nil {
				return err
			}
			var db *sql.DB
			if st.Wrapped {
				db, err = sqlretry.Open(driver, dsn, st.Options...)
			} else {
				db, err = sql.Open(driver, dsn)
			}
			if err != nil {
				return err
			}
			db.SetMaxOpenConns(n)
			db.SetMaxIdleConns(n)
			res := workload.Run(ctx, workload.Config{Workers: workers, Duration: dur, OpTimeout: 10 * time.Second}, bank, db, st.Run)
			var cuts int64
			if st.Wrapped {
				s, _ := sqlretry.StatsOf(db)
				cuts = s.ContentionCuts
			}
			db.Close()
			inv, err := bank.Check(ctx, admin, res)
			bank.Drop(ctx, admin)
			if err != nil {
				return err
			}
			if !inv.OK() {
				return fmt.Errorf("pool %d, %s: %v", n, st.Name, inv)
			}
			rate := float64(res.Committed) / res.Elapsed.Seconds()
			if b, ok := best[st.Name]; !ok || rate > b[1] {
				best[st.Name] = [2]float64{float64(n), rate}
			}
			fmt.Fprintf(tw, "%d\t%s\t%.0f\t%.2f\t%.0f\t%d\t%d\t\n", n, st.Name, rate,
				float64(res.Attempts)/float64(max(res.Committed, 1)), float64(res.Percentile(99))/1e6, res.Failed, cuts)
			fmt.Fprintf(os.Stderr, "  pool %d, %s: %.0f tx/s\n", n, st.Name, rate)
		}
	}
	tw.Flush()
	fmt.Println()
	for _, st := range sts {
		b := best[st.Name]
		fmt.Printf("%s: best %.0f tx/s with a pool of %.0f\n", st.Name, b[1], b[0])
	}
	return nil
}
