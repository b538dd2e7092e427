package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sqlretry/sqlretry/cmd/internal/chaos"
)

// runReplicas runs the replicas scenario: for each deployment (how many
// replicas share the workers), every strategy, side by side.
func runReplicas(ctx context.Context, out *output, tg chaos.Target, sc chaos.Scenario, strategies []chaos.Strategy) error {
	var reports []*chaos.Report
	for _, ns := range split(*deployments) {
		n, err := strconv.Atoi(ns)
		if err != nil || n < 1 {
			return fmt.Errorf("-replicas: %q is not a number of replicas", ns)
		}
		sc.Replicas, sc.Processes = n, *processes
		for _, st := range strategies {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Printf("  %s/%s/%s %d×%d (%v)\n", tg.Driver, sc.Name, st.Name, n, sc.Workers/n, sc.Duration)
			r, err := chaos.RunReplicas(ctx, tg, sc, st, func(el time.Duration, c, f int64) {
				fmt.Printf("\r    %3.0fs committed %7d  failed %7d", el.Seconds(), c, f)
			})
			fmt.Print("\r\033[K")
			if err != nil {
				return fmt.Errorf("%s/%s/%s %d replicas: %w", tg.Driver, sc.Name, st.Name, n, err)
			}
			reports = append(reports, r)
		}
	}
	out.Reports = append(out.Reports, reports...)
	replicasTable(os.Stdout, reports)
	if err := os.MkdirAll(*outDir, 0o755); err != nil {
		return err
	}
	file := filepath.Join(*outDir, "replicas-"+tg.Driver+".svg")
	if err := plotReplicas(file, tg.Driver, reports); err != nil {
		return err
	}
	fmt.Println("  plot:", file)
	return nil
}

// deployment names a replicas report: replicas × workers each.
func deployment(r *chaos.Report) string {
	n := max(1, r.Replicas)
	if r.Processes {
		return fmt.Sprintf("%d×%d procs", n, 16/n)
	}
	return fmt.Sprintf("%d×%d", n, 16/n)
}

func replicasTable(w io.Writer, reports []*chaos.Report) {
	if len(reports) == 0 {
		return
	}
	fmt.Fprintf(w, "\n%s / replicas\n", reports[0].Driver)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "deployment\tstrategy\ttx/s\tsurfaced\tattempts/commit\tp50 ms\tp99 ms\tp99.9 ms\tfairness\tper replica\tmoney ok\tlost\tphantom\t")
	for _, r := range reports {
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%d\t%.2f\t%.1f\t%.0f\t%.0f\t%.2f\t%s\t%v\t%d\t%d\t\n", deployment(r), r.Strategy, r.TxPerSec, r.Failed,
			r.AttemptsPerCommit, r.P50ms, r.P99ms, r.P999ms, r.Fairness(), perReplica(r), r.MoneyConserved && r.LedgerMatches, r.Lost, r.Phantom)
	}
	tw.Flush()
	for _, r := range reports {
		for _, e := range topErrors(r, 3) {
			fmt.Fprintf(w, "    %s %s: %s\n", deployment(r), r.Strategy, e)
		}
	}
	fmt.Fprintln(w)
}

func perReplica(r *chaos.Report) string {
	var s []string
	for _, c := range r.ReplicaCommitted {
		s = append(s, strconv.FormatInt(c, 10))
	}
	return strings.Join(s, "/")
}
