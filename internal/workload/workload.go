// Package workload is the money-transfer workload that the demo, the fault
// suite and the chaos benchmark drive: a few hot accounts and a ledger
// keyed by a unique operation id, so that after any scenario one can check
// that money is conserved, that every operation the caller was told
// succeeded is in the ledger once (no lost acknowledgements), and that no
// operation the caller was told failed is in it (no phantom writes).
package workload

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sqlretry/sqlretry"
)

// InitialBalance is every account's balance at the start.
const InitialBalance = 1000

// Bank is the schema of one run.
type Bank struct {
	Driver   string // "pgx" or "mysql"
	Accounts int
	acct     string
	ledger   string
}

// NewBank creates fresh tables named after prefix.
func NewBank(ctx context.Context, admin *sql.DB, driver, prefix string, accounts int) (*Bank, error) {
	if accounts < 2 {
		return nil, errors.New("workload: at least 2 accounts")
	}
	b := &Bank{Driver: driver, Accounts: accounts, acct: prefix + "_accounts", ledger: prefix + "_ledger"}
	b.Drop(ctx, admin)
	for _, q := range []string{
		"CREATE TABLE " + b.acct + " (id int PRIMARY KEY, balance int NOT NULL)",
		"CREATE TABLE " + b.ledger + " (op varchar(64) PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL)",
	} {
		if _, err := admin.ExecContext(ctx, q); err != nil {
			return nil, err
		}
	}
	// Many rows at a time: the no-contention reference of the chaos
	// benchmark has 100,000 accounts.
	const batch = 500
	for i := 1; i <= accounts; i += batch {
		var q strings.Builder
		var args []any
		q.WriteString("INSERT INTO " + b.acct + " VALUES ")
		for j := i; j < i+batch && j <= accounts; j++ {
			if j > i {
				q.WriteString(", ")
			}
			q.WriteString("(?, ?)")
			args = append(args, j, InitialBalance)
		}
		if _, err := admin.ExecContext(ctx, b.ph(q.String()), args...); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// OpenBank is the Bank NewBank made with the same prefix, for another
// process to run on.
func OpenBank(driver, prefix string, accounts int) *Bank {
	return &Bank{Driver: driver, Accounts: accounts, acct: prefix + "_accounts", ledger: prefix + "_ledger"}
}

// Drop removes the tables.
func (b *Bank) Drop(ctx context.Context, admin *sql.DB) {
	admin.ExecContext(ctx, "DROP TABLE IF EXISTS "+b.ledger)
	admin.ExecContext(ctx, "DROP TABLE IF EXISTS "+b.acct)
}

// TxOptions: SERIALIZABLE on PostgreSQL (serialization failures), the
// default on MySQL, where the body takes locks in random order (deadlocks).
func (b *Bank) TxOptions() *sql.TxOptions {
	if b.Driver == "pgx" {
		return &sql.TxOptions{Isolation: sql.LevelSerializable}
	}
	return &sql.TxOptions{}
}

// Transfer is the body of one transfer transaction.
func (b *Bank) Transfer(op string, src, dst, amount int) func(context.Context, *sql.Tx) error {
	lock := ""
	if b.Driver == "mysql" {
		lock = " FOR UPDATE"
	}
	return func(ctx context.Context, tx *sql.Tx) error {
		var balance int
		if err := tx.QueryRowContext(ctx, b.ph("SELECT balance FROM "+b.acct+" WHERE id = ?"+lock), src).Scan(&balance); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, b.ph("UPDATE "+b.acct+" SET balance = balance - ? WHERE id = ?"), amount, src); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, b.ph("UPDATE "+b.acct+" SET balance = balance + ? WHERE id = ?"), amount, dst); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, b.ph("INSERT INTO "+b.ledger+" VALUES (?, ?, ?, ?)"), op, src, dst, amount)
		return err
	}
}

// ph turns ? placeholders into $n for PostgreSQL.
func (b *Bank) ph(q string) string {
	if b.Driver != "pgx" {
		return q
	}
	var sb strings.Builder
	n := 0
	for _, c := range q {
		if c == '?' {
			n++
			fmt.Fprintf(&sb, "$%d", n)
			continue
		}
		sb.WriteRune(c)
	}
	return sb.String()
}

// Strategy runs one transaction body the way some application would.
type Strategy func(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error

// Plain is database/sql with no retries: what an application without a
// retry loop does.
func Plain(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error {
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

// RunInTx is sqlretry.RunInTx.
func RunInTx(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error {
	return sqlretry.RunInTx(ctx, db, opts, body)
}

// Config shapes one run.
type Config struct {
	Workers   int
	Duration  time.Duration
	OpTimeout time.Duration                                        // each logical operation's deadline
	Progress  func(elapsed time.Duration, committed, failed int64) // called about once a second; may be nil
	Tick      time.Duration                                        // timeline resolution; default 100ms
	OpPrefix  string                                               // prefixes operation ids: runs sharing one bank need distinct ones
}

// Result is what the callers saw.
type Result struct {
	Committed, Failed int64
	Unknown           int64 // ErrAmbiguousCommit: the caller was told the outcome is unknown
	Attempts          int64 // transaction bodies run, first attempts and replays
	Elapsed           time.Duration
	Errors            map[string]int  // failures by summary
	Latencies         []time.Duration // of every operation, sorted
	MaxOvershoot      time.Duration   // the most an operation returned after its deadline
	Timeline          []int           // commits per Tick
	Acked, FailedOps  map[string]bool
	UnknownOps        map[string]bool
	AckedAt           map[string]time.Time // when each acknowledged operation returned
}

// Percentile returns the p-th percentile latency (0 < p <= 100).
func (r *Result) Percentile(p float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	i := int(float64(len(r.Latencies))*p/100+0.5) - 1
	return r.Latencies[max(0, min(i, len(r.Latencies)-1))]
}

// Run drives transfers between random accounts until cfg.Duration ends or
// ctx is done, and records what every caller was told.
func Run(ctx context.Context, cfg Config, bank *Bank, db *sql.DB, strategy Strategy) *Result {
	if cfg.Tick == 0 {
		cfg.Tick = 100 * time.Millisecond
	}
	if cfg.OpTimeout == 0 {
		cfg.OpTimeout = 10 * time.Second
	}
	res := &Result{Errors: map[string]int{}, Acked: map[string]bool{}, FailedOps: map[string]bool{}, UnknownOps: map[string]bool{},
		AckedAt: map[string]time.Time{}}
	var mu sync.Mutex
	var committed, failed atomic.Int64
	var overshoot, attempts atomic.Int64
	runCtx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	start := time.Now()
	timeline := make([]atomic.Int64, int(cfg.Duration/cfg.Tick)+2)
	var wg sync.WaitGroup
	for w := range cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			defer func() { mu.Lock(); res.Latencies = append(res.Latencies, lat...); mu.Unlock() }()
			for n := 0; runCtx.Err() == nil; n++ {
				op := fmt.Sprintf("%sw%d-%d", cfg.OpPrefix, w, n)
				src := 1 + rand.IntN(bank.Accounts)
				dst := 1 + (src+rand.IntN(bank.Accounts-1))%bank.Accounts
				t0 := time.Now()
				opCtx, opCancel := context.WithTimeout(ctx, cfg.OpTimeout)
				body := bank.Transfer(op, src, dst, 1+rand.IntN(10))
				err := strategy(opCtx, db, bank.TxOptions(), func(ctx context.Context, tx *sql.Tx) error {
					attempts.Add(1)
					return body(ctx, tx)
				})
				opCancel()
				t1 := time.Now()
				lat = append(lat, t1.Sub(t0))
				if over := t1.Sub(t0) - cfg.OpTimeout; over > 0 {
					for old := overshoot.Load(); int64(over) > old && !overshoot.CompareAndSwap(old, int64(over)); old = overshoot.Load() {
					}
				}
				mu.Lock()
				if err == nil {
					res.Acked[op] = true
					res.AckedAt[op] = t1
					committed.Add(1)
					if i := int(t1.Sub(start) / cfg.Tick); i < len(timeline) {
						timeline[i].Add(1)
					}
				} else {
					if errors.Is(err, sqlretry.ErrAmbiguousCommit) {
						res.UnknownOps[op] = true
						res.Unknown++
					} else {
						res.FailedOps[op] = true
					}
					failed.Add(1)
					res.Errors[Summarize(err)]++
				}
				mu.Unlock()
			}
		}()
	}
	if cfg.Progress != nil {
		t := time.NewTicker(time.Second)
	loop:
		for {
			select {
			case <-t.C:
				cfg.Progress(time.Since(start), committed.Load(), failed.Load())
			case <-runCtx.Done():
				break loop
			}
		}
		t.Stop()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	res.Committed, res.Failed = committed.Load(), failed.Load()
	res.MaxOvershoot = time.Duration(overshoot.Load())
	res.Attempts = attempts.Load()
	sort.Slice(res.Latencies, func(i, j int) bool { return res.Latencies[i] < res.Latencies[j] })
	for i := range timeline {
		res.Timeline = append(res.Timeline, int(timeline[i].Load()))
	}
	return res
}

// Summarize names an error for a table: its kind, without the details that
// differ from one occurrence to the next.
func Summarize(err error) string {
	var e *sqlretry.Error
	switch {
	case errors.Is(err, sqlretry.ErrAmbiguousCommit):
		return "commit outcome unknown (ErrAmbiguousCommit)"
	case errors.Is(err, sqlretry.ErrCircuitOpen):
		return "breaker open (ErrCircuitOpen)"
	case errors.Is(err, sqlretry.ErrBudgetExhausted):
		return "retry budget spent (ErrBudgetExhausted)"
	case errors.Is(err, context.DeadlineExceeded):
		return "deadline exceeded"
	case errors.As(err, &e):
		return "gave up: " + trim(e.Err.Error())
	}
	return trim(err.Error())
}

// loopbackPort matches a loopback address with its port: ports differ
// per connection, the rest of the cause does not.
var loopbackPort = regexp.MustCompile(`(127\.0\.0\.1|\[::1\]):[0-9]+`)

// trim keeps the whole cause (issue 12: a cut one read "dial tcp
// 127.0.0.1") and only replaces the ports, so that the same cause groups.
func trim(s string) string {
	return loopbackPort.ReplaceAllString(s, "$1:<port>")
}

// Invariants are the checks after a run. An operation whose caller was
// told the outcome is unknown (ErrAmbiguousCommit) is neither lost nor a
// phantom; UnknownCommitted says how many of those did commit.
type Invariants struct {
	MoneyConserved   bool     // the balances add up to what they started with
	LedgerMatches    bool     // every balance is explained by the ledger
	Lost             int      // acknowledged operations missing from the ledger
	Phantom          int      // failed operations present in the ledger
	UnknownCommitted int      // operations with an unknown outcome that are in the ledger
	LostOps          []string // the lost ones, with when they were acknowledged
}

// OK reports whether every invariant holds.
func (i Invariants) OK() bool {
	return i.MoneyConserved && i.LedgerMatches && i.Lost == 0 && i.Phantom == 0
}

func (i Invariants) String() string {
	s := fmt.Sprintf("money conserved=%v ledger=balances=%v lost acks=%d phantom writes=%d unknown-but-committed=%d",
		i.MoneyConserved, i.LedgerMatches, i.Lost, i.Phantom, i.UnknownCommitted)
	if len(i.LostOps) > 0 {
		s += fmt.Sprintf(" %v", i.LostOps)
	}
	return s
}

// Check verifies the invariants against what the callers were told.
func (b *Bank) Check(ctx context.Context, admin *sql.DB, res *Result) (Invariants, error) {
	var inv Invariants
	var total int
	if err := admin.QueryRowContext(ctx, "SELECT COALESCE(SUM(balance), 0) FROM "+b.acct).Scan(&total); err != nil {
		return inv, err
	}
	inv.MoneyConserved = total == b.Accounts*InitialBalance
	rows, err := admin.QueryContext(ctx, "SELECT op, src, dst, amount FROM "+b.ledger)
	if err != nil {
		return inv, err
	}
	inLedger := map[string]bool{}
	want := map[int]int{}
	for i := 1; i <= b.Accounts; i++ {
		want[i] = InitialBalance
	}
	for rows.Next() {
		var op string
		var src, dst, amount int
		if err := rows.Scan(&op, &src, &dst, &amount); err != nil {
			rows.Close()
			return inv, err
		}
		inLedger[op] = true
		want[src] -= amount
		want[dst] += amount
		if res.FailedOps[op] {
			inv.Phantom++
		}
		if res.UnknownOps[op] {
			inv.UnknownCommitted++
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return inv, err
	}
	for op := range res.Acked {
		if !inLedger[op] {
			inv.Lost++
			inv.LostOps = append(inv.LostOps, op+" acknowledged at "+res.AckedAt[op].Format("15:04:05.000"))
		}
	}
	inv.LedgerMatches = true
	for id, w := range want {
		var got int
		if err := admin.QueryRowContext(ctx, b.ph("SELECT balance FROM "+b.acct+" WHERE id = ?"), id).Scan(&got); err != nil {
			return inv, err
		}
		inv.LedgerMatches = inv.LedgerMatches && got == w
	}
	return inv, nil
}

// LedgerTable is the name of the ledger table (op, src, dst, amount), for
// diagnostics that look rows up.
func (b *Bank) LedgerTable() string { return b.ledger }
