package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// crashConnector dials the fake server, remembers every connection it
// opened, and refuses dials while the fake server is down (crash/resume).
type crashConnector struct {
	*fakeConnector
	clock *fakeClock

	mu     sync.Mutex
	conns  []*fakeConn
	down   bool
	upAt   time.Time // with down: refuse until the clock reaches it; zero: until resume
	dialed []time.Time
}

func (c *crashConnector) Connect(ctx context.Context) (driver.Conn, error) {
	c.mu.Lock()
	c.dialed = append(c.dialed, c.clock.Now())
	if c.down && (c.upAt.IsZero() || c.clock.Now().Before(c.upAt)) {
		c.mu.Unlock()
		return nil, errRefused
	}
	c.mu.Unlock()
	ic, err := c.fakeConnector.Connect(ctx)
	if fc, ok := ic.(*fakeConn); ok {
		c.mu.Lock()
		c.conns = append(c.conns, fc)
		c.mu.Unlock()
	}
	return ic, err
}

// crash kills the server: every connection open so far is dead, which the
// driver finds out only when it next uses it (io.ErrUnexpectedEOF: the
// server's FATAL or a read of a closed socket, not driver.ErrBadConn), and
// dials are refused until resume (or until upAt when set).
func (c *crashConnector) crash(upAt time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down, c.upAt = true, upAt
	for _, fc := range c.conns {
		fc.gone = true
	}
}

func (c *crashConnector) resume() { c.mu.Lock(); c.down = false; c.mu.Unlock() }

func (c *crashConnector) dialsBetween(from, to time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, at := range c.dialed {
		if !at.Before(from) && at.Before(to) {
			n++
		}
	}
	return n
}

func crashDB(t *testing.T, b Breaker) (*sql.DB, *crashConnector, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	cc := &crashConnector{fakeConnector: &fakeConnector{srv: newFakeServer()}, clock: clock}
	wc, err := WrapConnector(cc, WithClock(clock), WithDialect(DialectPostgres), WithBreaker(b), WithoutBudget())
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	t.Cleanup(func() { db.Close() })
	return db, cc, clock
}

// pool fills the pool with n idle connections.
func pool(t *testing.T, db *sql.DB, n int) {
	t.Helper()
	db.SetMaxIdleConns(n)
	var held []*sql.Conn
	for range n {
		c, err := db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	for _, c := range held {
		c.Close()
	}
}

// openBreaker dials while the server is down until the breaker opens. The
// pooled connections are held meanwhile so that database/sql dials.
func openBreaker(t *testing.T, db *sql.DB, pooled int) {
	t.Helper()
	ctx := context.Background()
	var held []*sql.Conn
	for range pooled {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	for range 5 {
		if c, err := db.Conn(ctx); err == nil {
			c.Close()
		}
	}
	for _, c := range held {
		c.Close() // back to the pool: dead, as the driver will find
	}
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("breaker = %v, want open after the failed dials", s.Breaker)
	}
}

// After a server crash every pooled connection is dead, and its first
// statement fails with a lost connection (not driver.ErrBadConn: pgx reads
// the server's FATAL or EOF). Such a connection took the half-open
// breaker's single probe and opened the breaker again, once per stale
// connection in the pool: after a restart write service came back several
// open timeouts late. Only a fresh dial may be the probe: while the breaker
// is not closed a connection from before its last opening is discarded
// before anything is sent (database/sql then dials).
func TestStalePooledConnectionNeverTakesTheProbe(t *testing.T) {
	db, cc, clock := crashDB(t, Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01, ConsecutiveDialFailures: 3})
	pool(t, db, 3)
	cc.crash(time.Time{})
	openBreaker(t, db, 3)
	cc.resume()
	clock.Advance(2 * time.Second) // past the open time: the next call may probe

	cc.mu.Lock()
	stale := append([]*fakeConn(nil), cc.conns...)
	cc.mu.Unlock()
	dials := len(cc.dialed)
	var n int
	if err := db.QueryRowContext(context.Background(), "SELECT 1").Scan(&n); err != nil {
		t.Fatalf("first read after the server came back: %v (a stale pooled connection took the probe)", err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker = %v, want closed: a fresh dial was the probe and succeeded", s.Breaker)
	}
	if d := len(cc.dialed) - dials; d != 1 {
		t.Errorf("dials after the server came back: %d, want 1 (the probe)", d)
	}
	for i, fc := range stale {
		if fc.broken {
			t.Errorf("stale connection %d was used after the outage (the driver found it dead): it should have been discarded unused", i)
		}
	}
	// RunInTx too: BEGIN on a pooled connection is refused the same way.
	pool(t, db, 3)
	cc.crash(time.Time{})
	openBreaker(t, db, 3)
	cc.resume()
	clock.Advance(2 * time.Second)
	if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	}); err != nil {
		t.Fatalf("RunInTx after the server came back: %v", err)
	}
	if s := stats(t, db); s.Breaker != BreakerClosed {
		t.Errorf("breaker = %v after RunInTx, want closed", s.Breaker)
	}
}

// A *sql.Conn pinned to a connection from before the outage cannot move to
// another connection: while the breaker is open its call fails at once with
// an error that says the breaker is open (ErrCircuitOpen), nothing sent.
func TestPinnedStaleConnectionSeesCircuitOpen(t *testing.T) {
	db, cc, _ := crashDB(t, Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01, ConsecutiveDialFailures: 3})
	pool(t, db, 1)
	pinned, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	cc.crash(time.Time{})
	openBreaker(t, db, 0)
	_, err = pinned.ExecContext(context.Background(), "UPDATE t SET n = 1")
	if !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v, want ErrCircuitOpen", err)
	}
	if cc.conns[0].broken {
		t.Error("the statement was sent on the stale connection")
	}
}

// While the server stays down the breaker probes every ProbeInterval after
// the first OpenTimeout, so a caller whose deadline outlasts the outage is
// served within about a ProbeInterval of the server's return (not within a
// whole OpenTimeout: a probe that failed just before the return kept
// callers out for another second), and the server sees one dial per
// ProbeInterval, not a dial storm.
func TestProbePacingAfterAFailedProbe(t *testing.T) {
	b := Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.2, ConsecutiveDialFailures: 3}
	interval := b.withDefaults().ProbeInterval
	if interval != 200*time.Millisecond {
		t.Fatalf("default ProbeInterval = %v, want 200ms", interval)
	}
	var worst time.Duration
	for _, outage := range []time.Duration{3000, 3130, 3270, 3400, 3550, 3690, 3830, 3960, 4100} {
		outage *= time.Millisecond
		db, cc, clock := crashDB(t, b)
		pool(t, db, 1)
		down := clock.Now()
		up := down.Add(outage)
		cc.crash(up)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		var n int
		err := db.QueryRowContext(ctx, "SELECT 1").Scan(&n)
		cancel()
		if err != nil {
			t.Fatalf("outage %v: the caller's deadline outlasts it, but: %v", outage, err)
		}
		lag := clock.Now().Sub(up)
		worst = max(worst, lag)
		if lag > interval*6/5+10*time.Millisecond {
			t.Errorf("outage %v: served %v after the server was back, want within the probe interval (%v, jittered)", outage, lag, interval)
		}
		// Dials while down: those until it opened (3 in a row), then one
		// per probe.
		if d, most := cc.dialsBetween(down, up), 3+int(outage/interval)+2; d > most {
			t.Errorf("outage %v: %d dials while the server was down, want at most %d", outage, d, most)
		}
	}
	t.Logf("worst lag after the server's return: %v", worst)
}

// ProbeInterval is never longer than OpenTimeout, and validated like it.
func TestProbeIntervalDefaultsAndBounds(t *testing.T) {
	if got := (Breaker{OpenTimeout: 50 * time.Millisecond}).withDefaults().ProbeInterval; got != 50*time.Millisecond {
		t.Errorf("ProbeInterval with OpenTimeout 50ms = %v, want 50ms", got)
	}
	if got := (Breaker{ProbeInterval: 3 * time.Second}).withDefaults().ProbeInterval; got != time.Second {
		t.Errorf("ProbeInterval 3s with the default OpenTimeout = %v, want 1s", got)
	}
	if err := (Breaker{ProbeInterval: -1}).validate(); err == nil {
		t.Error("a negative ProbeInterval was accepted")
	}
	if err := (Breaker{ProbeInterval: 25 * time.Hour}).validate(); err == nil {
		t.Error("a ProbeInterval above 24h was accepted")
	}
}

// deadlineOnly is a context whose deadline has passed while its timer has
// not yet marked it done (the window in which pgx's dial returns "i/o
// timeout" at the caller's deadline).
type deadlineOnly struct {
	context.Context
	dl time.Time
}

func (c deadlineOnly) Deadline() (time.Time, bool) { return c.dl, true }

// A dial cut by the caller's own deadline says nothing about the server,
// even when the driver returns before the context says it is done: a burst
// of calls with tiny deadlines opened the breaker (10 such dials in a row),
// and the pool's connections were then discarded as stale.
func TestDialAtTheCallersDeadlineIsNotAServerFailure(t *testing.T) {
	clock := newFakeClock()
	srv := newFakeServer()
	errTimeout := &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	for range 30 {
		srv.dialErrs = append(srv.dialErrs, errTimeout)
	}
	wc, err := WrapConnector(&fakeConnector{srv: srv}, WithClock(clock), WithDialect(DialectPostgres),
		WithBreaker(Breaker{ConsecutiveDialFailures: 3}), WithoutBudget())
	if err != nil {
		t.Fatal(err)
	}
	ctx := deadlineOnly{Context: context.Background(), dl: time.Now().Add(-time.Millisecond)}
	for range 10 {
		if _, err := wc.Connect(ctx); err == nil {
			t.Fatal("a dial that failed succeeded")
		}
	}
	if s := wc.(*connector).r.breaker.State(); s != BreakerClosed {
		t.Errorf("breaker = %v after dials cut by the callers' deadlines, want closed", s)
	}
}

// BEGIN that found only connections from before the breaker last opened
// (database/sql gave up after its re-runs, the last on a connection that
// was dialled while the breaker opened) sent nothing: RunInTx pauses and
// replays it, gated by the breaker, instead of returning ErrCircuitOpen
// (TestPatroniFailover's switchover in a CI rehearsal: one caller got
// ErrCircuitOpen with no breaker rejection counted).
func TestRunInTxReplaysABeginHandedOffAsStale(t *testing.T) {
	r := newRetrier(defaultConfig(), nil, DialectPostgres)
	err := handOffWith(newError("begin", 1, Unavailable, ErrCircuitOpen, nil), "the breaker is open and the connection was opened before it opened")
	o := &txOutcome{phase: phaseBegin, err: err}
	r.decide(o, &txAttempt{Context: context.Background()}, true)
	if !o.replay || o.cls != Unavailable || o.cause == nil {
		t.Fatalf("a stale BEGIN hand-off: replay=%v cls=%v cause=%v, want a replay as Unavailable", o.replay, o.cls, o.cause)
	}
	// A refusal of the breaker itself stays final.
	o = &txOutcome{phase: phaseBegin, err: newError("dial", 1, Unavailable, ErrCircuitOpen, nil)}
	r.decide(o, &txAttempt{Context: context.Background()}, true)
	if o.replay {
		t.Fatal("ErrCircuitOpen refused by the breaker was replayed")
	}
}
