// Command demo runs a concurrent money-transfer workload twice, through the
// plain driver and through sqlretry, while it provokes the failures real
// databases throw: serialization failures and deadlocks on a few hot
// accounts, and (on PostgreSQL) its own sessions killed under load. It
// ends with a table of what the caller saw and what the database holds.
//
//	go run ./cmd/demo                       # local PostgreSQL
//	go run ./cmd/demo -driver mysql         # local MariaDB/MySQL
//	go run ./cmd/demo -dsn postgres://...   # any server you own
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

var (
	driverName = flag.String("driver", "pgx", "pgx or mysql")
	dsnFlag    = flag.String("dsn", "", "data source name (default: the local test database)")
	workers    = flag.Int("workers", 8, "concurrent clients")
	accounts   = flag.Int("accounts", 4, "accounts (few accounts: more conflicts)")
	duration   = flag.Duration("duration", 6*time.Second, "run time per strategy")
	killEvery  = flag.Duration("kill-every", 300*time.Millisecond, "kill one of the demo's own sessions this often (PostgreSQL; 0: never)")
)

const initialBalance = 1000

type result struct {
	name                  string
	committed, failed     int64
	retries               int64
	elapsed               time.Duration
	lost, phantom         int
	conserved, consistent bool
	errs                  map[string]int
}

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
	if *driverName == "pgx" && *killEvery > 0 {
		fmt.Printf("chaos: serialization failures (SERIALIZABLE), deadlocks, and one of the demo's own sessions killed every %v\n", *killEvery)
	} else {
		fmt.Println("chaos: deadlocks and lock conflicts (locking reads in random order)")
	}
	var results []result
	for _, strategy := range []string{"plain driver", "sqlretry"} {
		if ctx.Err() != nil {
			break
		}
		r, err := runStrategy(ctx, admin, dsn, run, strategy)
		if err != nil {
			fmt.Fprintf(os.Stderr, "demo: %s: %v\n", strategy, err)
			os.Exit(1)
		}
		results = append(results, r)
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "strategy\tcommitted\ttx/s\tfailed (caller saw)\tretries\tlost acks\tphantom writes\tmoney conserved\tledger = balances\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%d\t%d\t%d\t%d\t%v\t%v\t\n", r.name, r.committed,
			float64(r.committed)/r.elapsed.Seconds(), r.failed, r.retries, r.lost, r.phantom, r.conserved, r.consistent)
	}
	tw.Flush()
	for _, r := range results {
		if len(r.errs) > 0 {
			fmt.Printf("\nerrors the caller saw with the %s:\n", r.name)
			for e, n := range r.errs {
				fmt.Printf("  %6d  %s\n", n, e)
			}
		}
	}
}

func runStrategy(ctx context.Context, admin *sql.DB, dsn, run, strategy string) (result, error) {
	r := result{name: strategy, errs: map[string]int{}}
	acct, ledger := run+"_accounts", run+"_ledger"
	defer admin.Exec("DROP TABLE IF EXISTS " + ledger)
	defer admin.Exec("DROP TABLE IF EXISTS " + acct)
	for _, q := range []string{
		"DROP TABLE IF EXISTS " + acct, "DROP TABLE IF EXISTS " + ledger,
		"CREATE TABLE " + acct + " (id int PRIMARY KEY, balance int NOT NULL)",
		"CREATE TABLE " + ledger + " (op varchar(64) PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL)",
	} {
		if _, err := admin.ExecContext(ctx, q); err != nil {
			return r, err
		}
	}
	for i := 1; i <= *accounts; i++ {
		if _, err := admin.ExecContext(ctx, ph("INSERT INTO "+acct+" VALUES (?, ?)"), i, initialBalance); err != nil {
			return r, err
		}
	}
	var db *sql.DB
	var err error
	if strategy == "sqlretry" {
		db, err = sqlretry.Open(*driverName, dsn)
	} else {
		db, err = sql.Open(*driverName, dsn)
	}
	if err != nil {
		return r, err
	}
	defer db.Close()
	db.SetMaxOpenConns(*workers)

	var mu sync.Mutex
	acked, failed := map[string]bool{}, map[string]bool{}
	var committed, nfailed atomic.Int64
	runCtx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	var wg sync.WaitGroup
	if *driverName == "pgx" && *killEvery > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); chaos(runCtx, admin, run) }()
	}
	start := time.Now()
	for w := range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; runCtx.Err() == nil; n++ {
				op := fmt.Sprintf("w%d-%d", w, n)
				src := 1 + rand.IntN(*accounts)
				dst := 1 + (src+rand.IntN(*accounts-1))%*accounts
				opCtx, opCancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := transfer(opCtx, db, strategy, acct, ledger, op, src, dst, 1+rand.IntN(10))
				opCancel()
				mu.Lock()
				if err == nil {
					acked[op] = true
					committed.Add(1)
				} else {
					failed[op] = true
					nfailed.Add(1)
					r.errs[summarize(err)]++
				}
				mu.Unlock()
			}
		}()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-tick.C:
			fmt.Printf("  %-12s %5.0fs  committed %6d  failed %5d\n", strategy, time.Since(start).Seconds(), committed.Load(), nfailed.Load())
		case <-runCtx.Done():
			done = true
		}
	}
	wg.Wait()
	r.elapsed = time.Since(start)
	r.committed, r.failed = committed.Load(), nfailed.Load()
	if s, ok := sqlretry.StatsOf(db); ok {
		r.retries = s.RetriesStatement + s.RetriesTransaction + s.RetriesConnection + s.HandOffs
	}
	return r, check(ctx, admin, &r, acct, ledger, acked, failed)
}

// transfer moves amount from src to dst and records the operation once.
func transfer(ctx context.Context, db *sql.DB, strategy, acct, ledger, op string, src, dst, amount int) error {
	opts := &sql.TxOptions{}
	if *driverName == "pgx" {
		opts.Isolation = sql.LevelSerializable
	}
	body := func(ctx context.Context, tx *sql.Tx) error {
		var balance int
		lock := ""
		if *driverName == "mysql" {
			lock = " FOR UPDATE"
		}
		if err := tx.QueryRowContext(ctx, ph("SELECT balance FROM "+acct+" WHERE id = ?"+lock), src).Scan(&balance); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, ph("UPDATE "+acct+" SET balance = balance - ? WHERE id = ?"), amount, src); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, ph("UPDATE "+acct+" SET balance = balance + ? WHERE id = ?"), amount, dst); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, ph("INSERT INTO "+ledger+" VALUES (?, ?, ?, ?)"), op, src, dst, amount)
		return err
	}
	if strategy == "sqlretry" {
		return sqlretry.RunInTx(ctx, db, opts, body)
	}
	tx, err := db.BeginTx(ctx, opts)
	if err != nil {
		return err
	}
	if err := body(ctx, tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// chaos kills one of the demo's own sessions now and then.
func chaos(ctx context.Context, admin *sql.DB, run string) {
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

// check verifies the invariants: money is conserved, the ledger explains
// every balance, every acknowledged operation is in the ledger once (no
// lost acks), and no failed operation is in it (no phantom writes).
func check(ctx context.Context, admin *sql.DB, r *result, acct, ledger string, acked, failed map[string]bool) error {
	var total int
	if err := admin.QueryRowContext(ctx, "SELECT COALESCE(SUM(balance), 0) FROM "+acct).Scan(&total); err != nil {
		return err
	}
	r.conserved = total == *accounts*initialBalance
	rows, err := admin.QueryContext(ctx, "SELECT op, src, dst, amount FROM "+ledger)
	if err != nil {
		return err
	}
	defer rows.Close()
	inLedger := map[string]bool{}
	want := map[int]int{}
	for i := 1; i <= *accounts; i++ {
		want[i] = initialBalance
	}
	for rows.Next() {
		var op string
		var src, dst, amount int
		if err := rows.Scan(&op, &src, &dst, &amount); err != nil {
			return err
		}
		inLedger[op] = true
		want[src] -= amount
		want[dst] += amount
		if failed[op] {
			r.phantom++
		}
	}
	for op := range acked {
		if !inLedger[op] {
			r.lost++
		}
	}
	r.consistent = true
	for id, w := range want {
		var got int
		if err := admin.QueryRowContext(ctx, ph("SELECT balance FROM "+acct+" WHERE id = ?"), id).Scan(&got); err != nil {
			return err
		}
		r.consistent = r.consistent && got == w
	}
	return rows.Err()
}

func summarize(err error) string {
	var e *sqlretry.Error
	switch {
	case errors.Is(err, sqlretry.ErrAmbiguousCommit):
		return "commit outcome unknown (ErrAmbiguousCommit)"
	case errors.As(err, &e):
		return "gave up: " + trim(e.Err.Error())
	}
	return trim(err.Error())
}

func trim(s string) string {
	if len(s) > 90 {
		return s[:90] + "..."
	}
	return s
}

// ph turns ? placeholders into $n for PostgreSQL.
func ph(q string) string {
	if *driverName != "pgx" {
		return q
	}
	var b strings.Builder
	n := 0
	for _, c := range q {
		if c == '?' {
			n++
			fmt.Fprintf(&b, "$%d", n)
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}
