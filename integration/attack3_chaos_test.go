package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// Attack 14 (attack3): no hook at all. Callers commit small transactions
// in a loop while a backend of the server is killed (SIGKILL) every
// 200 ms: each kill makes the postmaster end every session and run crash
// recovery, so COMMITs in flight are lost for real. Every success must
// have its row; no row may be there twice. Long: set
// SQLRETRY_ATTACK3_CHAOS=1 to run.
func TestAttack3BackendKillChaos(t *testing.T) {
	if os.Getenv("SQLRETRY_ATTACK3_CHAOS") == "" {
		t.Skip("set SQLRETRY_ATTACK3_CHAOS=1 to run (about 15 s)")
	}
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "chaos")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)")
	res := &resolutionCount{}
	slogObs := sqlretry.SlogObserver(slog.New(slog.NewTextHandler(res, nil)))
	var resolvedMu sync.Mutex
	resolved := map[string]string{}
	db, err := sqlretry.Open("pgx", srv.DSN, sqlretry.WithObserver(sqlretry.ObserverFunc(func(ctx context.Context, e sqlretry.Event) {
		slogObs.Observe(ctx, e)
		if e.Kind == sqlretry.EventCommitResolved {
			if op, ok := ctx.Value(opKey{}).(string); ok {
				resolvedMu.Lock()
				resolved[op] = fmt.Sprintf("%v: %s", e.Outcome, e.Reason)
				resolvedMu.Unlock()
			}
		}
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	warmUp(t, db, tbl)
	const callers = 16
	stop := make(chan struct{})
	var mu sync.Mutex
	done := map[string]int{} // op -> calls, for successes
	var ambiguous, failed, total atomic.Int32
	var wg sync.WaitGroup
	for c := 0; c < callers; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				op := fmt.Sprintf("c%d-%d", c, i)
				ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), opKey{}, op), 20*time.Second)
				calls := 0
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
					return err
				})
				cancel()
				total.Add(1)
				switch {
				case err == nil:
					mu.Lock()
					done[op] = calls
					mu.Unlock()
				case errors.Is(err, sqlretry.ErrAmbiguousCommit):
					ambiguous.Add(1)
				default:
					if failed.Add(1) <= 3 {
						t.Logf("error: %s: %v", op, err)
					}
				}
			}
		}(c)
	}
	kills := 0
	admin, err := sql.Open("pgx", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	end := time.Now().Add(10 * time.Second)
	for time.Now().Before(end) {
		time.Sleep(200 * time.Millisecond)
		var pid int
		if err := admin.QueryRow("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY random() LIMIT 1").Scan(&pid); err != nil {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			kills++
		}
	}
	close(stop)
	wg.Wait()
	counts := map[string]int{}
	rows, err := plain.Query("SELECT op, count(*) FROM " + tbl + " GROUP BY op")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var op string
		var n int
		rows.Scan(&op, &n)
		counts[op] = n
	}
	rows.Close()
	lost, doubled := 0, 0
	for op, calls := range done {
		switch n := counts[op]; {
		case n == 0:
			lost++
			t.Errorf("LOST WRITE: %s succeeded after %d run(s), no row; resolution: %q", op, calls, resolved[op])
		case n > 1:
			doubled++
			t.Errorf("DOUBLED WRITE: %s, %d rows", op, n)
		}
	}
	t.Logf("FIGURES attack3/backend-kill-chaos: %d kills, %d transactions, %d succeeded, %d ErrAmbiguousCommit, %d other errors, %d lost, %d doubled; lost COMMITs resolved: %d committed (%d by the WAL at the record), %d not committed (%d by the WAL at the record: another life's), %d other", kills, total.Load(), len(done), ambiguous.Load(), failed.Load(), lost, doubled, res.committed.Load(), res.walOurs.Load(), res.notCommitted.Load(), res.walOther.Load(), res.other.Load())
}

type opKey struct{}

// resolutionCount counts sqlretry's commit-resolved decisions by outcome.
type resolutionCount struct {
	committed, notCommitted, other atomic.Int32
	// answered by the WAL at the record: the id's status said committed,
	// the record there is another life's (before that check, a lost
	// write), or it is the transaction's message.
	walOther, walOurs atomic.Int32
}

func (r *resolutionCount) Write(p []byte) (int, error) {
	line := string(p)
	if strings.Contains(line, "commit-resolved") {
		switch {
		case strings.Contains(line, "outcome=committed"):
			r.committed.Add(1)
			if strings.Contains(line, "the record is the transaction's message") {
				r.walOurs.Add(1)
			}
			if os.Getenv("SQLRETRY_ATTACK3_VERBOSE") != "" {
				fmt.Print("RESOLVED ", line)
			}
		case strings.Contains(line, "outcome=not-committed"):
			r.notCommitted.Add(1)
			if strings.Contains(line, "the WAL there is another life's") {
				r.walOther.Add(1)
			}
		default:
			r.other.Add(1)
		}
	}
	return len(p), nil
}
