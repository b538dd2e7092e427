package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// A failover on two private PostgreSQL 15 servers, a primary and its
// synchronous streaming standby, reached through pgx's multi-host DSN with
// the standby listed first and target_session_attrs=read-write. The
// primary's postmaster is killed (pg_ctl -m immediate) and restarted as a
// standby, as a cluster manager restarts a failed leader: for a while no
// host is writable and pgconn fails every connect with "read only
// connection" (or a refused dial on the restarting host). 1.5 s after the
// crash the standby is promoted. The transfer workload's callers, started
// after the crash with 10 s deadlines, must all succeed: no surfaced error,
// money conserved, no lost and no phantom write, and the first commit soon
// after the new primary takes writes. With 32 callers and a 4 s election
// the callers must wait for the breaker's probe, not each dial on its own
// until the retry budget runs out.
func TestFailoverPromotedStandby(t *testing.T) {
	for _, tc := range []struct {
		workers  int
		election time.Duration
	}{{8, 1500 * time.Millisecond}, {32, 4 * time.Second}} {
		t.Run(fmt.Sprintf("%d callers, %v", tc.workers, tc.election), func(t *testing.T) {
			promotedStandby(t, tc.workers, tc.election)
		})
	}
}

func promotedStandby(t *testing.T, workers int, election time.Duration) {
	pair, err := dbserver.StartPostgresSyncPair()
	if err != nil {
		unavailable(t, err.Error())
	}
	defer pair.Stop()
	sPort, pPort := dsnPort(t, pair.StandbyDSN), dsnPort(t, pair.Primary.DSN)
	dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write connect_timeout=2", sPort, pPort)
	ctx := context.Background()

	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	// One account per caller: the test is about the failover, and 32
	// callers on 4 accounts made it a hot spot whose deadlocks (1 s each
	// to detect) ran callers out of their 10 s on a loaded machine.
	bank, err := workload.NewBank(ctx, admin, "pgx", fmt.Sprintf("fo%d", rand.Uint32()), max(4, workers))
	if err != nil {
		t.Fatal(err)
	}
	dials := &workload.DialLog{}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = dials.Dial
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	defer db.Close()
	// The pool holds sessions on the primary, as an application's does.
	db.SetMaxIdleConns(workers)
	var warm sync.WaitGroup
	for range workers {
		warm.Add(1)
		go func() {
			defer warm.Done()
			if _, err := db.ExecContext(ctx, "SELECT pg_sleep(0.05)"); err != nil {
				t.Error(err)
			}
		}()
	}
	warm.Wait()
	standby, err := sql.Open("pgx", pair.StandbyDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Close()
	standby.SetMaxIdleConns(1)
	if err := standby.PingContext(ctx); err != nil {
		t.Fatal(err)
	}

	down := time.Now()
	if err := pair.CrashPrimary(); err != nil {
		t.Fatal(err)
	}
	var readOnlyAt, promoteAt, writable time.Time
	chaos := make(chan struct{})
	go func() {
		defer close(chaos)
		if err := pair.RestartPrimaryAsStandby(); err != nil {
			t.Error(err)
		}
		readOnlyAt = time.Now()
		time.Sleep(time.Until(down.Add(election)))
		promoteAt = time.Now()
		done := make(chan error, 1)
		go func() { done <- pair.PromoteStandby() }()
		// When the new primary takes writes, by asking it.
		for {
			var inRecovery bool
			if err := standby.QueryRowContext(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err == nil && !inRecovery {
				writable = time.Now()
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	tick := 10 * time.Millisecond
	start := time.Now()
	res := workload.Run(ctx, workload.Config{Workers: workers, Duration: election + 2500*time.Millisecond, OpTimeout: 10 * time.Second, Tick: tick}, bank, db, workload.RunInTx)
	<-chaos
	if t.Failed() {
		t.FailNow()
	}
	inv, err := bank.Check(ctx, admin, res)
	if err != nil {
		t.Fatal(err)
	}
	first := time.Time{}
	for i, n := range res.Timeline {
		if n > 0 {
			first = start.Add(time.Duration(i) * tick)
			break
		}
	}
	longest, run := 0, 0
	for _, n := range res.Timeline[:min(int(res.Elapsed/tick), len(res.Timeline))] {
		if run++; n > 0 {
			run = 0
		}
		longest = max(longest, run)
	}
	s, _ := sqlretry.StatsOf(db)
	t.Logf("FIGURES failover/promoted-standby/%d callers: ops=%d committed=%d surfaced errors=%d (unknown %d) %v; replays=%d connection retries=%d hand-offs=%d; "+
		"no writable host for %v (old primary back read-only after %v, promote at %v), first commit %v after the new primary took writes, "+
		"longest stretch without a commit %v; dial attempts during the outage %d (%d dial failures in all), breaker rejections %d, circuit waits %d; %v",
		workers, res.Committed+res.Failed, res.Committed, res.Failed, res.Unknown, res.Errors, s.RetriesTransaction, s.RetriesConnection, s.HandOffs,
		writable.Sub(down).Round(time.Millisecond), readOnlyAt.Sub(down).Round(time.Millisecond), promoteAt.Sub(down).Round(time.Millisecond),
		first.Sub(writable).Round(time.Millisecond), (time.Duration(longest) * tick), dials.Between(down, writable), s.DialFailures,
		s.CircuitRejections, s.CircuitWaits, inv)
	if res.Failed != 0 {
		t.Errorf("%d operations failed through the failover: %v", res.Failed, res.Errors)
	}
	if !inv.OK() {
		t.Errorf("invariants broken: %v", inv)
	}
	if first.IsZero() || res.Committed < int64(workers) {
		t.Fatalf("%d commits after the failover", res.Committed)
	}
	// Write service back soon after the cluster: the breaker's probe
	// pacing must not add its second (goal 0.5 s; a margin for a busy CI).
	if lag := first.Sub(writable); lag > time.Second {
		t.Errorf("first commit %v after the new primary took writes, want well under a second", lag)
	}
}
