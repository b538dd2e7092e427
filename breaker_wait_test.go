package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"sync"
	"testing"
	"time"
)

// manualClock moves only when the test calls Advance (or, with auto on,
// when something sleeps): a Sleep waits for the clock or its context, as a
// real one does, so a test sees who is still asleep.
type manualClock struct {
	mu       sync.Mutex
	now      time.Time
	auto     bool
	sleepers []*manualSleeper
	changed  chan struct{} // closed and replaced whenever sleepers change
}

type manualSleeper struct {
	until time.Time
	done  chan struct{}
}

func newManualClock() *manualClock {
	return &manualClock{now: time.Now(), changed: make(chan struct{})}
}

func (c *manualClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *manualClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	c.mu.Lock()
	if c.auto {
		c.now = c.now.Add(d)
		c.mu.Unlock()
		return ctx.Err()
	}
	s := &manualSleeper{until: c.now.Add(d), done: make(chan struct{})}
	c.sleepers = append(c.sleepers, s)
	c.notifyLocked()
	c.mu.Unlock()
	select {
	case <-s.done:
	case <-ctx.Done():
		c.mu.Lock()
		for i, x := range c.sleepers {
			if x == s {
				c.sleepers = append(c.sleepers[:i], c.sleepers[i+1:]...)
				c.notifyLocked()
				break
			}
		}
		c.mu.Unlock()
	}
	return ctx.Err()
}

func (c *manualClock) setAuto(on bool) { c.mu.Lock(); c.auto = on; c.mu.Unlock() }

// nextWake is how long until the earliest sleeper wakes.
func (c *manualClock) nextWake() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var d time.Duration = -1
	for _, s := range c.sleepers {
		if w := s.until.Sub(c.now); d < 0 || w < d {
			d = w
		}
	}
	return d
}

// withRand makes every random draw r (1: every jittered pause its longest).
func withRand(r float64) Option {
	return func(c *config) error { c.rnd = func() float64 { return r }; return nil }
}

func (c *manualClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	keep := c.sleepers[:0]
	for _, s := range c.sleepers {
		if s.until.After(c.now) {
			keep = append(keep, s)
		} else {
			close(s.done)
		}
	}
	c.sleepers = keep
	c.notifyLocked()
	c.mu.Unlock()
}

func (c *manualClock) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// waitSleepers waits (in real time, at most a few seconds) until exactly n
// Sleep calls wait on the clock.
func (c *manualClock) waitSleepers(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		c.mu.Lock()
		got, ch := len(c.sleepers), c.changed
		c.mu.Unlock()
		if got == n {
			return
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("%d callers asleep, want %d", got, n)
		}
	}
}

// gatedConnector refuses dials while down, and otherwise holds each dial
// until the test opens the gate: the test decides when a probe's dial
// returns.
type gatedConnector struct {
	*fakeConnector
	mu      sync.Mutex
	down    bool
	gate    chan struct{} // nil: dials pass at once
	waiting int           // dials held at the gate
	dials   int
	changed chan struct{}
}

func (c *gatedConnector) Connect(ctx context.Context) (driver.Conn, error) {
	c.mu.Lock()
	c.dials++
	gate := c.gate
	if gate != nil {
		c.waiting++
		close(c.changed)
		c.changed = make(chan struct{})
	}
	c.mu.Unlock()
	if gate != nil {
		<-gate
		c.mu.Lock()
		c.waiting--
		c.mu.Unlock()
	}
	c.mu.Lock()
	down := c.down
	c.mu.Unlock()
	if down {
		return nil, errRefused
	}
	return c.fakeConnector.Connect(ctx)
}

func (c *gatedConnector) set(down bool, gate chan struct{}) {
	c.mu.Lock()
	c.down, c.gate = down, gate
	c.mu.Unlock()
}

func (c *gatedConnector) dialCount() int { c.mu.Lock(); defer c.mu.Unlock(); return c.dials }

func (c *gatedConnector) waitAtGate(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		c.mu.Lock()
		got, ch := c.waiting, c.changed
		c.mu.Unlock()
		if got == n {
			return
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("%d dials at the gate, want %d", got, n)
		}
	}
}

// Callers whose deadline outlasts an outage wait for the breaker's probe.
// When the probe's dial succeeds and the breaker closes, the server is
// back: every waiting caller must go at once. They slept on a 25-75 ms
// recheck while the probe was out (and until the next probe when they
// started waiting just before it failed), so after a crash restart one
// connection did all the work for up to 75 ms while the plain driver,
// dialling in a loop, was back at full rate (chaos pgx/restart). A down
// server still sees only the probes: waiters do not dial while the probe
// fails.
func TestWaitersGoWhenTheProbeClosesTheBreaker(t *testing.T) {
	const callers = 8
	for _, how := range []string{"exec", "RunInTx"} {
		t.Run(how, func(t *testing.T) {
			clock := newManualClock()
			gc := &gatedConnector{fakeConnector: &fakeConnector{srv: newFakeServer()}, changed: make(chan struct{})}
			wc, err := WrapConnector(gc, WithClock(clock), WithDialect(DialectPostgres), WithoutBudget(),
				WithBreaker(Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01, ConsecutiveDialFailures: 3}))
			if err != nil {
				t.Fatal(err)
			}
			db := sql.OpenDB(wc)
			defer db.Close()
			db.SetMaxOpenConns(callers)

			// The server goes down; dials without a deadline fail until the
			// breaker opens (their backoff takes no real time).
			gc.set(true, nil)
			clock.setAuto(true)
			for range 3 {
				if c, err := db.Conn(context.Background()); err == nil {
					c.Close()
				}
			}
			clock.setAuto(false)
			if s := stats(t, db); s.Breaker != BreakerOpen {
				t.Fatalf("breaker = %v, want open", s.Breaker)
			}

			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			errs := make(chan error, callers)
			for i := range callers {
				go func() {
					if how == "exec" {
						_, err := db.ExecContext(ctx, fmt.Sprintf("UPDATE t SET v = %d", i))
						errs <- err
						return
					}
					errs <- RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						_, err := tx.ExecContext(ctx, fmt.Sprintf("UPDATE t SET v = %d", i))
						return err
					})
				}()
			}
			clock.waitSleepers(t, callers) // all wait for the probe, none dials

			// First probe: the server is still down. One dial, and the
			// others go on waiting without dialling.
			gate := make(chan struct{})
			gc.set(true, gate)
			dials := gc.dialCount()
			clock.Advance(1100 * time.Millisecond)
			gc.waitAtGate(t, 1)
			clock.waitSleepers(t, callers-1)
			close(gate)
			clock.waitSleepers(t, callers)
			if d := gc.dialCount() - dials; d != 1 {
				t.Fatalf("dials to the down server at the probe: %d, want 1", d)
			}

			// Second probe, ProbeInterval later: the server is back.
			gate = make(chan struct{})
			gc.set(false, gate)
			clock.Advance(300 * time.Millisecond)
			gc.waitAtGate(t, 1)
			clock.waitSleepers(t, callers-1)
			gc.set(false, nil) // the others' dials pass at once
			close(gate)

			// The clock stands still from here: every caller must finish.
			timeout := time.After(5 * time.Second)
			for done := 0; done < callers; done++ {
				select {
				case err := <-errs:
					if err != nil {
						t.Fatalf("caller: %v", err)
					}
				case <-timeout:
					t.Errorf("%d of %d callers still waiting after the probe closed the breaker (asleep on the clock: they should have been woken)", callers-done, callers)
					clock.Advance(time.Second) // let them go, to end the test
					for ; done < callers; done++ {
						<-errs
					}
					return
				}
			}
			if s := stats(t, db); s.Breaker != BreakerClosed {
				t.Errorf("breaker = %v, want closed", s.Breaker)
			}
		})
	}
}

// A PostgreSQL server in crash recovery answers every dial with 57P03 ("not
// yet accepting connections", "starting up", "in recovery mode"): it is up,
// and takes connections any moment. In the chaos pgx/restart runs the last
// failed probe was such an answer in 8 runs of 11, and the next probe came
// a whole ProbeInterval (200-240 ms) later while the plain driver, dialling
// in a loop, was back as soon as recovery ended. An open breaker probes a
// recovering server again soon, as it does a standby during an election
// (OpenTimeout/8); a server that is shutting down, or refuses, keeps the
// ProbeInterval pacing.
func TestProbeSoonWhileTheServerRecovers(t *testing.T) {
	b := Breaker{MinRequests: 5, OpenTimeout: time.Second, OpenJitter: 0.01, ConsecutiveDialFailures: 3}
	soon := b.OpenTimeout / electionReprobeShare
	interval := b.withDefaults().ProbeInterval
	for _, c := range []struct {
		answer error
		soon   bool
	}{
		{&pgError{"57P03", "the database system is not yet accepting connections"}, true},
		{&pgError{"57P03", "the database system is starting up"}, true},
		{&pgError{"57P03", "the database system is in recovery mode"}, true},
		{&pgError{"57P03", "the database system is shutting down"}, false},
		{errRefused, false},
	} {
		t.Run(c.answer.Error(), func(t *testing.T) {
			clock := newFakeClock()
			var mu sync.Mutex
			var dialed []time.Time
			// Refused until the breaker opens, then c.answer at the first
			// probe, then up.
			answers := []error{errRefused, errRefused, errRefused, c.answer}
			srv := newFakeServer()
			conn := connectorFunc(func(ctx context.Context) (driver.Conn, error) {
				mu.Lock()
				dialed = append(dialed, clock.Now())
				n := len(dialed)
				mu.Unlock()
				if n <= len(answers) {
					return nil, answers[n-1]
				}
				return (&fakeConnector{srv: srv}).Connect(ctx)
			})
			wc, err := WrapConnector(conn, WithClock(clock), WithDialect(DialectPostgres), WithoutBudget(), WithBreaker(b))
			if err != nil {
				t.Fatal(err)
			}
			db := sql.OpenDB(wc)
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if _, err := db.ExecContext(ctx, "UPDATE t SET v = 1"); err != nil {
				t.Fatalf("the caller's deadline outlasts the outage, but: %v", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(dialed) != 5 {
				t.Fatalf("%d dials, want 5 (3 refused, the probe answered %q, the next probe)", len(dialed), c.answer)
			}
			gap := dialed[4].Sub(dialed[3])
			if c.soon && gap > soon*11/10 {
				t.Errorf("next probe %v after a recovering server's answer, want within %v", gap, soon*11/10)
			}
			if !c.soon && gap < interval {
				t.Errorf("next probe %v after %q, want the ProbeInterval (%v): the server is not coming up", gap, c.answer, interval)
			}
		})
	}
}

// A COMMIT lost in a crash is resolved on a side connection that the
// resolution dials itself, backing off up to 500 ms between refused dials.
// When the breaker's probe finds the server back, the resolution must ask
// at once: it slept on for up to half a second (in the chaos pgx/restart
// runs its caller came back 0.2-0.7 s after the others).
func TestCommitResolutionGoesWhenTheProbeClosesTheBreaker(t *testing.T) {
	clock := newManualClock()
	srv := newFakeServer()
	srv.script("COMMIT", step{err: errLost, ran: true})
	gc := &gatedConnector{fakeConnector: &fakeConnector{srv: srv}, changed: make(chan struct{})}
	wc, err := WrapConnector(gc, WithClock(clock), WithDialect(DialectPostgres), WithoutBudget(), withRand(1),
		WithBreaker(Breaker{MinRequests: 5, OpenTimeout: 100 * time.Millisecond, OpenJitter: 0.01, ConsecutiveDialFailures: 1}))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(wc)
	defer db.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resolved := make(chan error, 1)
	go func() {
		resolved <- RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ('op-1')"); err != nil {
				return err
			}
			gc.set(true, nil) // the server crashes as COMMIT is sent
			return nil
		})
	}()
	// The resolution's side dials are refused; its pause grows to 500 ms.
	for {
		clock.waitSleepers(t, 1)
		d := clock.nextWake()
		if d >= 500*time.Millisecond {
			break
		}
		clock.Advance(d)
	}
	// Another caller's dial opens the breaker; a caller with a deadline
	// waits for its probe.
	if c, err := db.Conn(context.Background()); err == nil {
		c.Close()
		t.Fatal("a dial to the down server succeeded")
	}
	if s := stats(t, db); s.Breaker != BreakerOpen {
		t.Fatalf("breaker = %v, want open", s.Breaker)
	}
	waiter := make(chan error, 1)
	go func() { _, err := db.ExecContext(ctx, "UPDATE t SET v = 1"); waiter <- err }()
	clock.waitSleepers(t, 2)

	// The server is back; the probe, 101 ms on, finds it.
	gc.set(false, nil)
	clock.Advance(102 * time.Millisecond)
	if err := <-waiter; err != nil {
		t.Fatalf("the waiting caller: %v", err)
	}
	select {
	case err := <-resolved:
		if err != nil {
			t.Fatalf("RunInTx: %v, want success (the lost COMMIT committed)", err)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("the lost COMMIT's resolution still asleep after the probe closed the breaker (%v of its pause left)", clock.nextWake())
		clock.Advance(time.Second)
		<-resolved
	}
	if n := srv.ranCount("INSERT"); n != 1 {
		t.Errorf("%d inserts, want 1 (resolved as committed, no replay)", n)
	}
}
