package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// A Patroni cluster (a private etcd and 3 PostgreSQL 15 nodes, synchronous
// mode, TTL 8 s), reached through pgx's multi-host DSN with
// target_session_attrs=read-write, through three events users meet: a
// planned switchover (the leader handed to the sync standby), the leader's
// postmaster killed (Patroni restarts it: crash recovery), the whole
// leader node killed (Patroni and PostgreSQL: the sync standby promoted
// after the TTL). The transfer workload's 8 callers with 30 s deadlines
// must see no error (an ErrAmbiguousCommit included: every COMMIT lost
// in these events can be resolved), money conserved, no lost and no
// phantom write. One cluster for
// the three, in that order (the node kill last: the killed node does not
// come back).
func TestPatroniFailover(t *testing.T) {
	t.Parallel() // a private cluster: its waits overlap the other private-server tests
	if _, _, err := dbserver.PatroniBinaries(); err != nil {
		unavailable(t, err.Error())
	}
	cluster, err := dbserver.StartPatroni(3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Stop)
	t.Logf("FIGURES patroni: cluster of 3 up in %v (etcd, bootstrap, 2 replicas cloned and streaming, one synchronous): %s", cluster.Startup.Round(time.Millisecond), cluster.Members())
	for _, sc := range []struct {
		name     string
		duration time.Duration // of the workload; the event comes 1.5 s in
		event    func() (old *dbserver.PatroniNode, err error)
		except   bool // the cluster takes writes again on another node
	}{
		{"switchover", 7 * time.Second, func() (*dbserver.PatroniNode, error) {
			from, _, err := cluster.Switchover()
			return from, err
		}, true},
		// Patroni's crash recovery took 3–5 s on a quiet machine, 7.5 s
		// at load average 8: the workload runs well past it.
		{"postmaster-kill", 15 * time.Second, cluster.KillLeaderPostmaster, false},
		{"node-kill", (dbserver.PatroniTTL + 7) * time.Second, cluster.KillLeaderNode, true},
	} {
		// SQLRETRY_PATRONI_ONLY names the one scenario to run and
		// SQLRETRY_PATRONI_REPEAT how many times in a row (on the same
		// cluster), to hunt a rare failure.
		if only := os.Getenv("SQLRETRY_PATRONI_ONLY"); only != "" && only != sc.name {
			continue
		}
		repeat, _ := strconv.Atoi(os.Getenv("SQLRETRY_PATRONI_REPEAT"))
		for i := range max(repeat, 1) {
			name := sc.name
			if repeat > 1 {
				name = fmt.Sprintf("%s#%d", sc.name, i)
			}
			t.Run(name, func(t *testing.T) {
				patroniScenario(t, cluster, sc.name, sc.duration, sc.event, sc.except)
			})
			if t.Failed() {
				t.Logf("cluster: %s\n%s", cluster.Members(), cluster.Logs())
				return
			}
		}
	}
}

// patroniDiag, with SQLRETRY_PATRONI_DIAG set, records for every operation
// the transaction id, server and timeline of each attempt and the
// decisions sqlretry made for it, so that a lost acknowledgement can be
// traced to the server that answered and the WAL of every node.
type patroniDiag struct {
	mu    sync.Mutex
	lines []string
}

func (d *patroniDiag) add(format string, args ...any) {
	d.mu.Lock()
	d.lines = append(d.lines, time.Now().Format("15:04:05.000")+" "+fmt.Sprintf(format, args...))
	d.mu.Unlock()
}

func (d *patroniDiag) String() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.lines, "\n    ")
}

type patroniDiagKey struct{}

// patroniWALDump is every node's timeline history files and the WAL records
// of the given transaction ids (pg_waldump over each node's pg_wal).
func patroniWALDump(cluster *dbserver.Patroni, xids []string) string {
	var b strings.Builder
	bin := ""
	if dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_waldump"); len(dirs) > 0 {
		bin = dirs[len(dirs)-1]
	}
	for _, node := range cluster.Nodes {
		wal := filepath.Join(node.DataDir(), "pg_wal")
		fmt.Fprintf(&b, "--- %s %s\n", node.Name, wal)
		hist, _ := filepath.Glob(filepath.Join(wal, "*.history"))
		for _, h := range hist {
			body, _ := os.ReadFile(h)
			fmt.Fprintf(&b, "%s: %s\n", filepath.Base(h), strings.TrimSpace(string(body)))
		}
		segs, _ := filepath.Glob(filepath.Join(wal, "0000*"))
		var names []string
		for _, s := range segs {
			names = append(names, filepath.Base(s))
		}
		fmt.Fprintf(&b, "files: %s\n", strings.Join(names, " "))
		if bin == "" {
			continue
		}
		for _, s := range segs {
			if strings.HasSuffix(s, ".history") {
				continue
			}
			for _, x := range xids {
				out, _ := exec.Command(bin, "-x", x, s).CombinedOutput()
				for _, l := range strings.Split(string(out), "\n") {
					if strings.Contains(l, "rmgr:") {
						fmt.Fprintf(&b, "%s: %s\n", filepath.Base(s), l)
					}
				}
			}
		}
	}
	return b.String()
}

func patroniScenario(t *testing.T, cluster *dbserver.Patroni, name string, duration time.Duration,
	event func() (*dbserver.PatroniNode, error), except bool) {
	ctx := context.Background()
	if err := cluster.WaitHealthy(3 * time.Minute); err != nil {
		t.Fatalf("cluster not healthy before the event: %v\n%s", err, cluster.Logs())
	}
	leader, err := cluster.Leader()
	if err != nil {
		t.Fatal(err)
	}
	admin, err := sql.Open("pgx", cluster.DSN+" connect_timeout=2 application_name=bed-admin")
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	bank, err := workload.NewBank(ctx, admin, "pgx", fmt.Sprintf("pf%d", rand.Uint32()), 4)
	if err != nil {
		t.Fatal(err)
	}
	dials := &workload.DialLog{}
	cfg, err := pgx.ParseConfig(cluster.DSN + " connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = dials.Dial
	// Every lost COMMIT's resolution, with the rule that decided, in the
	// log: an ErrAmbiguousCommit then says why it could not be known.
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithObserver(sqlretry.ObserverFunc(func(ctx context.Context, e sqlretry.Event) {
		d, _ := ctx.Value(patroniDiagKey{}).(*patroniDiag)
		if e.Kind == sqlretry.EventCommitResolved {
			t.Logf("%s COMMIT resolution: outcome=%v reason=%q err=%v", time.Now().Format("15:04:05.000"), e.Outcome, e.Reason, e.Err)
		}
		if d != nil && e.Kind != sqlretry.EventBreaker {
			d.add("event %v op=%s attempt=%d class=%v outcome=%v reason=%q err=%v", e.Kind, e.Op, e.Attempt, e.Class, e.Outcome, e.Reason, e.Err)
		}
	})))
	defer db.Close()
	const workers = 8
	// The pool holds sessions on the leader, as an application's does.
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

	var down, writable, eventDone time.Time
	var newLeader *dbserver.PatroniNode
	chaos := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(chaos)
		time.Sleep(1500 * time.Millisecond)
		down = time.Now()
		var old *dbserver.PatroniNode
		var eventErr error
		evDone := make(chan struct{})
		go func() {
			defer close(evDone)
			old, eventErr = event()
			eventDone = time.Now()
		}()
		var werr error
		if except {
			// The old leader takes writes until it is demoted or killed:
			// the cluster's time is when another node takes one.
			newLeader, werr = cluster.WaitWritableExcept(2*time.Minute, leader)
		} else {
			<-evDone // the postmaster is gone when the kill returns
			newLeader, werr = cluster.WaitWritable(2 * time.Minute)
		}
		writable = time.Now()
		if werr != nil {
			t.Errorf("the cluster took no write after the %s: %v", name, werr)
		}
		<-evDone
		if eventErr != nil {
			t.Errorf("%s: %v", name, eventErr)
		}
		if old != nil && old != leader {
			t.Errorf("%s hit %s, the leader was %s", name, old.Name, leader.Name)
		}
	}()
	tick := 10 * time.Millisecond
	// The cluster's own writability over the run, by writing to the nodes
	// directly every 20 ms: a stretch in which the cluster took writes but
	// the workload committed nothing is sqlretry's, not the cluster's.
	clusterTL := make([]bool, int(duration/(100*time.Millisecond))+1)
	probeDone, probeStop := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(probeDone)
		for {
			select {
			case <-probeStop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := cluster.WaitWritable(300 * time.Millisecond); err == nil {
				if i := int(time.Since(start) / (100 * time.Millisecond)); i < len(clusterTL) {
					clusterTL[i] = true
				}
			}
		}
	}()
	strategy := workload.Strategy(workload.RunInTx)
	var diags sync.Map // op -> *patroniDiag
	if os.Getenv("SQLRETRY_PATRONI_DIAG") != "" {
		ledger := bank.LedgerTable()
		strategy = func(ctx context.Context, db *sql.DB, opts *sql.TxOptions, body func(context.Context, *sql.Tx) error) error {
			d := &patroniDiag{}
			var op string
			err := sqlretry.RunInTx(context.WithValue(ctx, patroniDiagKey{}, d), db, opts, func(ctx context.Context, tx *sql.Tx) error {
				if err := body(ctx, tx); err != nil {
					d.add("attempt: body: %v", err)
					return err
				}
				var xid, tl, lsn string
				var port int
				err := tx.QueryRowContext(ctx, "SELECT op, pg_current_xact_id()::text, inet_server_port(), "+
					"substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8), pg_current_wal_insert_lsn()::text FROM "+ledger+
					" WHERE xmin::text = (pg_current_xact_id()::text::bigint % 4294967296)::text").Scan(&op, &xid, &port, &tl, &lsn)
				d.add("attempt: op %s xid %s on :%d timeline %s insert lsn %s err=%v", op, xid, port, tl, lsn, err)
				return err
			})
			d.add("returned err=%v", err)
			if op != "" {
				diags.Store(op, d)
			}
			return err
		}
	}
	res := workload.Run(ctx, workload.Config{Workers: workers, Duration: duration, OpTimeout: 30 * time.Second, Tick: tick}, bank, db, strategy)
	close(probeStop)
	<-probeDone
	<-chaos
	if t.Failed() {
		t.FailNow()
	}
	if st := db.Stats(); st.InUse != 0 {
		t.Errorf("%d connections still in use after the workload", st.InUse)
	}
	// The check goes to the leader of now, through a pool of its own.
	if err := cluster.WaitHealthy(3 * time.Minute); err != nil && !except {
		t.Logf("cluster not healthy after the event: %v", err)
	}
	check, err := sql.Open("pgx", cluster.DSN+" connect_timeout=2 application_name=bed-admin")
	if err != nil {
		t.Fatal(err)
	}
	defer check.Close()
	inv, err := bank.Check(ctx, check, res)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Lost > 0 {
		var xids []string
		for _, lost := range inv.LostOps {
			op, _, _ := strings.Cut(lost, " ")
			if v, ok := diags.Load(op); ok {
				d := v.(*patroniDiag)
				t.Logf("LOST %s:\n    %s", op, d)
				for _, l := range d.lines {
					if _, rest, ok := strings.Cut(l, " xid "); ok {
						x, _, _ := strings.Cut(rest, " ")
						xids = append(xids, x)
					}
				}
			} else {
				t.Logf("LOST %s: no diagnostics (SQLRETRY_PATRONI_DIAG unset)", lost)
			}
		}
		var server string
		_ = check.QueryRowContext(ctx, "SELECT inet_server_port()::text || ' timeline ' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) || ' insert ' || pg_current_wal_insert_lsn()::text").Scan(&server)
		t.Logf("check read from :%s; cluster: %s; dir %s", server, cluster.Members(), cluster.Dir())
		t.Logf("WAL of the lost ids %v:\n%s", xids, patroniWALDump(cluster, xids))
		t.Logf("Patroni logs:\n%s", cluster.FullLogs())
	}
	bank.Drop(ctx, check)
	longest, back := stretches(res, start, writable, tick)
	s, _ := sqlretry.StatsOf(db)
	nl := "?"
	if newLeader != nil {
		nl = newLeader.Name
	}
	t.Logf("FIGURES patroni/%s: ops=%d committed=%d surfaced errors=%d (ambiguous %d) %v; replays=%d connection retries=%d hand-offs=%d resolved commits=%d; "+
		"cluster took writes again %v after the event (on %s, was %s; event call returned after %v), longest stretch without a commit %v, "+
		"first commit %v after the cluster took writes; dial attempts during the outage %d (dial failures in all %d), breaker rejections %d, circuit waits %d; %v",
		name, res.Committed+res.Failed, res.Committed, res.Failed, res.Unknown, res.Errors, s.RetriesTransaction, s.RetriesConnection, s.HandOffs, s.CommitsResolved,
		writable.Sub(down).Round(time.Millisecond), nl, leader.Name, eventDone.Sub(down).Round(time.Millisecond), longest,
		back, dials.Between(down, writable), s.DialFailures, s.CircuitRejections, s.CircuitWaits, inv)
	t.Logf("timeline (commits per 100 ms): %v", coarse(res.Timeline, 10))
	var marks strings.Builder
	stall, run := 0, 0
	for i, ok := range clusterTL {
		c := coarse(res.Timeline, 10)
		committed := i < len(c) && c[i] > 0
		switch {
		case ok && !committed:
			marks.WriteByte('!')
			run++
		case ok:
			marks.WriteByte('+')
			run = 0
		default:
			marks.WriteByte('.')
			run = 0
		}
		if !start.Add(time.Duration(i) * 100 * time.Millisecond).Before(writable) {
			stall = max(stall, run)
		}
	}
	// +: the cluster took a write and the workload committed; !: the
	// cluster took a write, the workload committed nothing; .: no write.
	t.Logf("FIGURES patroni/%s: after the cluster took writes again, longest stretch in which it did and the workload committed nothing: %v; per 100 ms: %s",
		name, time.Duration(stall)*100*time.Millisecond, marks.String())
	if n := res.Failed; n != 0 {
		var kinds []string
		for k, v := range res.Errors {
			kinds = append(kinds, fmt.Sprintf("%d× %s", v, k))
		}
		t.Errorf("%d operations failed through the %s: %s", n, name, strings.Join(kinds, "; "))
	}
	if !inv.OK() {
		t.Errorf("invariants broken: %v", inv)
	}
	if back < 0 || res.Committed < workers {
		t.Errorf("%d commits, first commit after the cluster took writes %v: the workload did not run through the event", res.Committed, back)
	}
}
