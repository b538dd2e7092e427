package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

const a2MyDSN = "root@tcp(127.0.0.1:3306)/test?parseTime=true&multiStatements=true"
const a2PgDSN = "postgres://postgres@127.0.0.1:5432/test"

func a2Conn(t *testing.T, dsn string) driver.Connector {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	c, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Bad input must fail at once (README: "no endpoints, a nil or repeated
// connector, an empty or repeated DSN, an unregistered driver").
func TestAttack2EndpointsBadInput(t *testing.T) {
	good := a2Conn(t, a2MyDSN)
	cases := map[string]func() error{
		"nil slice":     func() error { _, err := sqlretry.NewEndpointsConnector(nil); return err },
		"nil connector": func() error { _, err := sqlretry.NewEndpointsConnector([]driver.Connector{good, nil}); return err },
		"repeated":      func() error { _, err := sqlretry.NewEndpointsConnector([]driver.Connector{good, good}); return err },
		"names mismatch": func() error {
			_, err := sqlretry.NewEndpointsConnector([]driver.Connector{good}, sqlretry.WithEndpointNames("a", "b"))
			return err
		},
		"nil check": func() error {
			_, err := sqlretry.NewEndpointsConnector([]driver.Connector{good}, sqlretry.WithEndpointCheck(nil))
			return err
		},
		"neg timeout": func() error {
			_, err := sqlretry.NewEndpointsConnector([]driver.Connector{good}, sqlretry.WithEndpointTimeout(-time.Second))
			return err
		},
		"bad choice": func() error {
			_, err := sqlretry.NewEndpointsConnector([]driver.Connector{good}, sqlretry.WithEndpointChoice(7))
			return err
		},
		"empty dsns":   func() error { _, err := sqlretry.OpenEndpoints("mysql", nil); return err },
		"empty dsn":    func() error { _, err := sqlretry.OpenEndpoints("mysql", []string{a2MyDSN, ""}); return err },
		"repeated dsn": func() error { _, err := sqlretry.OpenEndpoints("mysql", []string{a2MyDSN, a2MyDSN}); return err },
		"unregistered": func() error { _, err := sqlretry.OpenEndpoints("nosuch", []string{a2MyDSN}); return err },
		"malformed dsn": func() error {
			_, err := sqlretry.OpenEndpoints("mysql", []string{"root@tcp(127.0.0.1:3306"})
			return err
		},
	}
	for name, f := range cases {
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("%s: panicked: %v", name, r)
				}
			}()
			if err := f(); err == nil {
				t.Errorf("%s: accepted", name)
			} else {
				t.Logf("%s: %v", name, err)
			}
		}()
	}
}

// All endpoints down: EndpointsError naming each, no password, returned
// within the caller's deadline; Health reports each.
func TestAttack2EndpointsAllDown(t *testing.T) {
	dsns := []string{"root:s3cretPW@tcp(127.0.0.1:1)/test", "root:s3cretPW@tcp(127.0.0.1:2)/test"}
	db, err := sqlretry.OpenEndpoints("mysql", dsns)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	err = db.PingContext(ctx)
	el := time.Since(start)
	t.Logf("err after %v: %v", el, err)
	if err == nil {
		t.Fatal("ping succeeded")
	}
	if strings.Contains(err.Error(), "s3cretPW") {
		t.Errorf("password leaked: %v", err)
	}
	var ee *sqlretry.EndpointsError
	if !errors.As(err, &ee) {
		t.Errorf("no *EndpointsError in %v", err)
	} else if len(ee.Errs) != 2 {
		t.Errorf("EndpointsError has %d errs", len(ee.Errs))
	}
	if el > 2500*time.Millisecond {
		t.Errorf("took %v past a 2s deadline", el)
	}
	// second call right away: breaker(s) open — error must still be useful
	err2 := db.PingContext(context.Background())
	t.Logf("second: %v", err2)
	if err2 != nil && strings.Contains(err2.Error(), "s3cretPW") {
		t.Errorf("password leaked: %v", err2)
	}
}

// One node down, the other up: PreferFirst must pass over the dead one;
// Health must say so; read-only check via EndpointNotWritable.
func TestAttack2EndpointsFirstDownAndReadOnly(t *testing.T) {
	dead := a2Conn(t, "root@tcp(127.0.0.1:1)/test")
	ro := a2Conn(t, a2MyDSN)
	good := a2Conn(t, a2MyDSN+"&timeout=5s")
	var checks atomic.Int32
	ec, err := sqlretry.NewEndpointsConnector([]driver.Connector{dead, ro, good},
		sqlretry.WithEndpointNames("dead", "ro", "good"),
		sqlretry.WithEndpointCheck(func(ctx context.Context, c driver.Conn) error {
			n := checks.Add(1)
			// the 1st check is ro's, the 2nd good's, alternating
			if n%2 == 1 {
				return sqlretry.EndpointNotWritable("test says read-only")
			}
			return nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(ec)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	h := ec.Health()
	for _, e := range h {
		t.Logf("%+v", e)
	}
	if len(h) != 3 || h[0].State == sqlretry.BreakerClosed || h[0].LastErr == nil || h[1].LastErr == nil || h[2].Dials != 1 {
		t.Errorf("unexpected health %+v", h)
	}
}

// Shadow mode against a dead server: must behave like the plain driver —
// fail as fast, same error, never ErrCircuitOpen, no waits.
func TestAttack2ShadowDeadServerLikePlain(t *testing.T) {
	for _, drv := range []string{"pgx", "mysql"} {
		t.Run(drv, func(t *testing.T) {
			dsn := map[string]string{"pgx": "postgres://postgres@127.0.0.1:1/test?connect_timeout=2", "mysql": "root@tcp(127.0.0.1:1)/test"}[drv]
			plain, _ := sql.Open(drv, dsn)
			defer plain.Close()
			var decisions atomic.Int32
			sh, err := sqlretry.Open(drv, dsn, sqlretry.WithShadow(true), sqlretry.WithObserver(sqlretry.ObserverFunc(func(_ context.Context, e sqlretry.Event) {
				if e.Shadow {
					decisions.Add(1)
				}
			})))
			if err != nil {
				t.Fatal(err)
			}
			defer sh.Close()
			ctx := context.Background()
			var tp, ts time.Duration
			for i := 0; i < 30; i++ {
				s := time.Now()
				ep := plain.PingContext(ctx)
				tp += time.Since(s)
				s = time.Now()
				es := sh.PingContext(ctx)
				ts += time.Since(s)
				if errors.Is(es, sqlretry.ErrCircuitOpen) || errors.Is(es, sqlretry.ErrBudgetExhausted) {
					t.Fatalf("call %d: shadow refused: %v", i, es)
				}
				if ep == nil || es == nil || ep.Error() != es.Error() {
					// pgx/mysql errors on a refused dial are deterministic
					t.Errorf("call %d: plain %q shadow %q", i, ep, es)
				}
				_, ep = plain.ExecContext(ctx, "SELECT 1")
				_, es = sh.ExecContext(ctx, "SELECT 1")
				if ep == nil || es == nil || ep.Error() != es.Error() {
					t.Errorf("exec %d: plain %q shadow %q", i, ep, es)
				}
			}
			t.Logf("plain %v shadow %v decisions %d", tp, ts, decisions.Load())
			if ts > tp*3+200*time.Millisecond {
				t.Errorf("shadow slower: %v vs %v", ts, tp)
			}
		})
	}
}

// Shadow on MySQL: a unique violation is the driver's own *mysql.MySQLError,
// the same value shape; a RunInTx write runs exactly once even on deadlock.
func TestAttack2ShadowMySQLDeadlockRunsOnce(t *testing.T) {
	plain, _ := sql.Open("mysql", a2MyDSN)
	defer plain.Close()
	sh, err := sqlretry.Open("mysql", a2MyDSN, sqlretry.WithShadow(true))
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	tbl := table(t, plain, "a2shd")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL) ENGINE=InnoDB", "INSERT INTO "+tbl+" VALUES (1,0),(2,0)")
	_, err = sh.Exec("INSERT INTO " + tbl + " VALUES (1,0)")
	var me *mysql.MySQLError
	if !errors.As(err, &me) || me.Number != 1062 {
		t.Fatalf("dup: %T %v", err, err)
	}
	if _, ok := err.(*mysql.MySQLError); !ok {
		t.Errorf("shadow wrapped the driver's error: %T", err)
	}
	// deadlock: two RunInTx in opposite order
	var runs atomic.Int32
	var wg sync.WaitGroup
	errs := make([]error, 2)
	barrier := make(chan struct{})
	var ready sync.WaitGroup
	ready.Add(2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			first, second := 1+i, 2-i
			once := false
			errs[i] = sqlretry.RunInTx(context.Background(), sh, nil, func(ctx context.Context, tx *sql.Tx) error {
				runs.Add(1)
				if _, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE %s SET n=n+1 WHERE id=%d", tbl, first)); err != nil {
					return err
				}
				if !once {
					once = true
					ready.Done()
					<-barrier
				}
				_, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE %s SET n=n+1 WHERE id=%d", tbl, second))
				return err
			})
		}(i)
	}
	ready.Wait()
	close(barrier)
	wg.Wait()
	t.Logf("runs %d errs %v", runs.Load(), errs)
	if runs.Load() != 2 {
		t.Errorf("shadow ran closures %d times, want 2", runs.Load())
	}
	nerr := 0
	for _, e := range errs {
		if e != nil {
			nerr++
			if !errors.As(e, &me) || me.Number != 1213 {
				t.Errorf("not the driver's deadlock: %T %v", e, e)
			}
		}
	}
	if nerr != 1 {
		t.Errorf("%d errors, want exactly one deadlock", nerr)
	}
}

// WithFallback: a panicking fallback; a fallback given while the breaker is
// closed must not be called; fallback error identity.
func TestAttack2FallbackPanicsAndNil(t *testing.T) {
	db, err := sqlretry.Open("pgx", "postgres://postgres@127.0.0.1:1/test?connect_timeout=1",
		sqlretry.WithBreaker(sqlretry.Breaker{OpenTimeout: time.Minute, ConsecutiveDialFailures: 1}))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = db.PingContext(ctx) // open the breaker
	called := 0
	ran := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error { ran++; return nil },
		sqlretry.WithFallback(func(ctx context.Context, reason error) error {
			called++
			if !errors.Is(reason, sqlretry.ErrCircuitOpen) {
				t.Errorf("reason %v", reason)
			}
			return nil
		}))
	t.Logf("err %v called %d ran %d", err, called, ran)
	if called != 1 || ran != 0 {
		t.Errorf("fallback called %d, fn ran %d", called, ran)
	}
	func() {
		defer func() {
			r := recover()
			t.Logf("panic recovered: %v", r)
			if r != "boom" {
				t.Errorf("panic value %v", r)
			}
		}()
		sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error { return nil },
			sqlretry.WithFallback(func(ctx context.Context, reason error) error { panic("boom") }))
	}()
	// the db still usable (no leaked slot): ten more runs return quickly
	for i := 0; i < 10; i++ {
		c2, cancel2 := context.WithTimeout(context.Background(), time.Second)
		err := sqlretry.RunInTx(c2, db, nil, func(ctx context.Context, tx *sql.Tx) error { return nil })
		cancel2()
		if !errors.Is(err, sqlretry.ErrCircuitOpen) {
			t.Errorf("after panic, run %d: %v", i, err)
		}
	}
	// WithFallback(nil)
	if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error { return nil }, sqlretry.WithFallback(nil)); err == nil {
		t.Errorf("WithFallback(nil) made RunInTx report success")
	} else {
		t.Logf("WithFallback(nil): %v", err)
	}
	// Fallback on Open applied to a plain Exec? It must not be.
	_, err = db.ExecContext(ctx, "INSERT INTO x VALUES (1)")
	t.Logf("exec on open breaker: %v", err)
}

// SetBackoff/SetBudget/SetShadow on a live db under concurrent traffic
// (-race), PostgreSQL, with real serialization failures.
func TestAttack2PolicyFlipsUnderTraffic(t *testing.T) {
	plain, _ := sql.Open("pgx", a2PgDSN)
	defer plain.Close()
	db, err := sqlretry.Open("pgx", a2PgDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tbl := table(t, plain, "a2pol")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" SELECT g, 0 FROM generate_series(1,2) g")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	stop := make(chan struct{})
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable}, func(ctx context.Context, tx *sql.Tx) error {
					var n int
					if err := tx.QueryRowContext(ctx, "SELECT sum(n) FROM "+tbl).Scan(&n); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE %s SET n=n+1 WHERE id=%d", tbl, 1+w%2))
					return err
				})
				if err == nil {
					ok.Add(1)
				} else {
					var pe *pgconn.PgError
					if ctx.Err() == nil && !(errors.As(err, &pe) && pe.Code == "40001") {
						t.Errorf("unexpected: %v", err)
					}
					failed.Add(1)
				}
			}
		}(w)
	}
	for i := 0; i < 200; i++ {
		sqlretry.SetBackoff(db, sqlretry.Backoff{Initial: time.Duration(i%5+1) * time.Millisecond, MaxAttempts: i%4 + 1})
		sqlretry.SetBudget(db, sqlretry.Budget{Max: float64(i % 7), Ratio: 0.1})
		sqlretry.SetShadow(db, i%3 == 0)
		time.Sleep(10 * time.Millisecond)
	}
	sqlretry.SetShadow(db, false)
	close(stop)
	wg.Wait()
	var sum int
	plain.QueryRow("SELECT sum(n) FROM " + tbl).Scan(&sum)
	t.Logf("ok %d failed %d sum %d", ok.Load(), failed.Load(), sum)
	if int64(sum) != ok.Load() {
		t.Errorf("sum %d != successes %d", sum, ok.Load())
	}
	if err := sqlretry.SetBackoff(plain, sqlretry.DefaultBackoff); err == nil {
		t.Errorf("SetBackoff on a plain db accepted")
	}
	nb, _ := sqlretry.Open("pgx", a2PgDSN, sqlretry.WithoutBudget())
	defer nb.Close()
	if err := sqlretry.SetBudget(nb, sqlretry.DefaultBudget); err == nil {
		t.Errorf("SetBudget on WithoutBudget db accepted silently")
	}
	if err := sqlretry.SetBackoff(db, sqlretry.Backoff{Initial: -time.Second, Max: -1, MaxAttempts: -3}); err == nil {
		t.Errorf("SetBackoff accepted negative values")
	}
	if err := sqlretry.SetBudget(db, sqlretry.Budget{Ratio: -1, Max: -5}); err == nil {
		t.Errorf("SetBudget accepted negative values")
	}
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Errorf("nil db panicked: %v", r)
			}
		}()
		sqlretry.SetBackoff(nil, sqlretry.DefaultBackoff)
		sqlretry.SetBudget(nil, sqlretry.DefaultBudget)
		sqlretry.SetShadow(nil, true)
		sqlretry.ShadowOf(nil)
		sqlretry.StatsOf(nil)
	}()
}

// README: "For a Galera cluster, or a primary with failover candidates".
// A plain (non-Galera) MariaDB primary must be accepted by the default check.
func TestAttack2EndpointsPlainMariaDBAccepted(t *testing.T) {
	plain, _ := sql.Open("mysql", a2MyDSN)
	defer plain.Close()
	var name, val, ver string
	plain.QueryRow("SELECT VERSION()").Scan(&ver)
	if err := plain.QueryRow("SHOW GLOBAL STATUS LIKE 'wsrep_ready'").Scan(&name, &val); err == nil {
		t.Logf("server %s: %s=%s", ver, name, val)
	}
	var prov string
	plain.QueryRow("SELECT @@wsrep_on").Scan(&prov)
	t.Logf("wsrep_on=%s", prov)
	db, err := sqlretry.OpenEndpoints("mysql", []string{a2MyDSN})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		t.Errorf("OpenEndpoints refuses a standalone MariaDB primary: %v", err)
	}
}
