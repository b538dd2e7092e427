package sqlretry

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

func TestBackoffDelays(t *testing.T) {
	b := Backoff{Initial: 10 * time.Millisecond, Max: 80 * time.Millisecond, Multiplier: 2, Jitter: NoJitter}
	want := []time.Duration{10, 20, 40, 80, 80, 80}
	for i, w := range want {
		if got := b.delay(i+1, 0, func() float64 { return 0.5 }); got != w*time.Millisecond {
			t.Errorf("NoJitter attempt %d: %v, want %v", i+1, got, w*time.Millisecond)
		}
	}
	b.Jitter = FullJitter
	for attempt := 1; attempt < 10; attempt++ {
		if got := b.delay(attempt, 0, func() float64 { return 0.999 }); got > b.Max || got < 0 {
			t.Errorf("FullJitter out of [0, Max]: %v", got)
		}
		if got := b.delay(attempt, 0, func() float64 { return 0 }); got != 0 {
			t.Errorf("FullJitter low end: %v", got)
		}
	}
	b.Jitter = DecorrelatedJitter
	if got := b.delay(3, 20*time.Millisecond, func() float64 { return 1 }); got != 60*time.Millisecond {
		t.Errorf("Decorrelated high end: %v, want 3*prev", got)
	}
	if got := b.delay(3, time.Second, func() float64 { return 1 }); got != b.Max {
		t.Errorf("Decorrelated cap: %v", got)
	}
}

func TestPacerStops(t *testing.T) {
	clock := newFakeClock()
	b := Backoff{Initial: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: NoJitter, MaxAttempts: 3, MaxElapsed: time.Minute}
	p := newPacer(b, clock, defaultRand)
	ctx := context.Background()
	if d, stop := p.next(ctx, 1); stop != "" || d != 100*time.Millisecond {
		t.Fatalf("attempt 1: %v %q", d, stop)
	}
	if _, stop := p.next(ctx, 3); stop != stopMaxAttempts {
		t.Errorf("attempts: %q", stop)
	}
	b.MaxAttempts, b.MaxElapsed = 100, 250*time.Millisecond
	p = newPacer(b, clock, defaultRand)
	clock.Advance(100 * time.Millisecond)
	if _, stop := p.next(ctx, 2); stop != stopMaxElapsed {
		t.Errorf("elapsed: %q", stop)
	}
	dctx, cancel := context.WithDeadline(ctx, clock.Now().Add(150*time.Millisecond))
	defer cancel()
	p = newPacer(b, clock, defaultRand)
	if _, stop := p.next(dctx, 2); stop != stopDeadline {
		t.Errorf("deadline: %q", stop)
	}
}

func TestBreakerStateMachine(t *testing.T) {
	clock := newFakeClock()
	var changes []string
	b := newBreaker(Breaker{Window: 10 * time.Second, MinRequests: 4, FailureRatio: 0.5, OpenTimeout: time.Second, OpenJitter: 0, HalfOpenProbes: 2}.withDefaults(),
		clock, func() float64 { return 0 }, func(from, to BreakerState) { changes = append(changes, from.String()+">"+to.String()) })
	s := *b.settings.Load()
	s.OpenJitter = 0
	b.set(s)
	pass := func(o outcome) {
		tk, err := b.allow()
		if err != nil {
			t.Fatalf("allow: %v", err)
		}
		b.done(tk, o)
	}
	pass(outcomeSuccess)
	pass(outcomeSuccess)
	pass(outcomeFailure)
	if b.State() != BreakerClosed {
		t.Fatal("opened below the minimum volume")
	}
	pass(outcomeFailure) // 2 of 4 failed: ratio 0.5 reached
	if b.State() != BreakerOpen {
		t.Fatalf("state = %v, want open", b.State())
	}
	if _, err := b.allow(); err != ErrCircuitOpen {
		t.Fatalf("allow while open: %v", err)
	}
	clock.Advance(1100 * time.Millisecond)
	t1, err1 := b.allow()
	t2, err2 := b.allow()
	_, err3 := b.allow()
	if err1 != nil || err2 != nil || err3 != ErrCircuitOpen {
		t.Fatalf("half-open admits 2 probes: %v %v %v", err1, err2, err3)
	}
	b.done(t1, outcomeSuccess)
	if b.State() != BreakerHalfOpen {
		t.Fatal("closed after one of two probes")
	}
	b.done(t2, outcomeFailure)
	if b.State() != BreakerOpen {
		t.Fatal("a failed probe must re-open")
	}
	clock.Advance(1100 * time.Millisecond)
	t1, _ = b.allow()
	t2, _ = b.allow()
	b.done(t1, outcomeSuccess)
	b.done(t2, outcomeSuccess)
	if b.State() != BreakerClosed {
		t.Fatalf("state = %v, want closed", b.State())
	}
	want := "closed>open half-open>open half-open>closed"
	got := ""
	for _, c := range changes {
		if c != "open>half-open" {
			got += c + " "
		}
	}
	if got != want+" " {
		t.Errorf("changes = %v", changes)
	}
	// Old failures leave the window.
	pass(outcomeFailure)
	pass(outcomeFailure)
	clock.Advance(11 * time.Second)
	pass(outcomeSuccess)
	pass(outcomeSuccess)
	pass(outcomeFailure)
	if b.State() != BreakerClosed {
		t.Error("failures outside the window counted")
	}
}

func TestBreakerDiscardsLateResults(t *testing.T) {
	clock := newFakeClock()
	b := newBreaker(Breaker{MinRequests: 2, FailureRatio: 0.5, OpenTimeout: time.Second}.withDefaults(), clock, func() float64 { return 0 }, nil)
	old, _ := b.allow()
	tk, _ := b.allow()
	b.done(tk, outcomeFailure)
	tk, _ = b.allow()
	b.done(tk, outcomeFailure)
	if b.State() != BreakerOpen {
		t.Fatal("want open")
	}
	clock.Advance(2 * time.Second)
	probe, _ := b.allow()
	b.done(old, outcomeFailure) // began before the breaker opened: ignored
	if b.State() != BreakerHalfOpen {
		t.Fatalf("a late result moved the breaker: %v", b.State())
	}
	b.done(probe, outcomeSuccess)
	if b.State() != BreakerClosed {
		t.Fatal("want closed")
	}
}

func TestBudget(t *testing.T) {
	clock := newFakeClock()
	rb := newRetryBudget(Budget{Ratio: 0.5, PerSecond: 1, Max: 2}, clock)
	if got := []bool{rb.withdraw(), rb.withdraw(), rb.withdraw()}; !got[0] || !got[1] || got[2] {
		t.Fatalf("a full budget of 2 allows exactly 2 retries: %v", got)
	}
	rb.success()
	rb.success() // 2 successes at ratio 0.5 earn one retry
	if !rb.withdraw() || rb.withdraw() {
		t.Fatal("successes earn Ratio tokens each")
	}
	clock.Advance(time.Second) // the floor earns one per second
	if !rb.withdraw() || rb.withdraw() {
		t.Fatal("time earns PerSecond tokens")
	}
	for range 100 {
		rb.success()
	}
	if got := rb.tokens(); got != 2 {
		t.Errorf("tokens = %v, want capped at Max 2", got)
	}
}

// Successes reach the breaker in batches; a failure flushes what piled up,
// so connection losses amid heavy successful traffic do not open it.
func TestBreakerSeesBatchedSuccesses(t *testing.T) {
	for _, tc := range []struct {
		successes int
		wantOpen  bool
	}{{0, true}, {1000, false}, {10, true}} {
		cfg := defaultConfig()
		cfg.clock = newFakeClock()
		r := newRetrier(cfg, nil, DialectPostgres)
		for range tc.successes {
			r.succeeded(ticket{})
		}
		for range 25 {
			r.record(ConnectionLost)
		}
		if open := r.breaker.State() == BreakerOpen; open != tc.wantOpen {
			t.Errorf("%d successes then 25 losses: open = %v, want %v", tc.successes, open, tc.wantOpen)
		}
	}
}

// A window full of successes from before an outage must not keep the
// breaker closed while every dial fails: dial failures in a row, with no
// success in between, open it whatever the window holds.
func TestBreakerOpensOnConsecutiveDialFailures(t *testing.T) {
	for _, tc := range []struct {
		name     string
		between  bool // a success in the middle of the run of failures
		wantOpen bool
	}{{"ten in a row", false, true}, {"a success in between", true, false}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := defaultConfig()
			cfg.clock = newFakeClock()
			r := newRetrier(cfg, nil, DialectPostgres)
			for range 5000 {
				r.succeeded(ticket{})
			}
			for i := range DefaultBreaker.ConsecutiveDialFailures {
				if tc.between && i == DefaultBreaker.ConsecutiveDialFailures/2 {
					r.succeeded(ticket{})
				}
				tk, err := r.breaker.allow()
				if err != nil {
					t.Fatalf("dial %d: %v", i, err)
				}
				r.breaker.done(tk, outcomeDialFailure)
			}
			if open := r.breaker.State() == BreakerOpen; open != tc.wantOpen {
				t.Errorf("open = %v, want %v", open, tc.wantOpen)
			}
		})
	}
}

// A probe that fails just before the database comes back must not keep
// the breaker open for long: after OpenTimeout (1s by default, stretched by
// up to 20 % of jitter) comes the first probe, and after a failed probe the
// next within ProbeInterval (200ms by default, never above OpenTimeout).
func TestBreakerReprobesAfterOpenTimeout(t *testing.T) {
	for _, tc := range []struct {
		name         string
		b            Breaker
		firstProbe   time.Duration // after opening
		stillOpenAt  time.Duration // after the failed probe
		probeAllowed time.Duration
	}{
		{"default", Breaker{}, 1201 * time.Millisecond, 190 * time.Millisecond, 241 * time.Millisecond},
		{"set", Breaker{OpenTimeout: 300 * time.Millisecond, ProbeInterval: 100 * time.Millisecond}, 361 * time.Millisecond, 90 * time.Millisecond, 121 * time.Millisecond},
		{"short OpenTimeout", Breaker{OpenTimeout: 150 * time.Millisecond}, 181 * time.Millisecond, 140 * time.Millisecond, 181 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			b := newBreaker(tc.b.withDefaults(), clock, rand.Float64, nil)
			for range b.settings.Load().ConsecutiveDialFailures {
				tk, err := b.allow()
				if err != nil {
					t.Fatal(err)
				}
				b.done(tk, outcomeDialFailure)
			}
			if _, err := b.allow(); err != ErrCircuitOpen {
				t.Fatalf("after %d dial failures: err=%v, want ErrCircuitOpen", b.settings.Load().ConsecutiveDialFailures, err)
			}
			clock.Advance(tc.firstProbe)
			clock.Advance(tc.probeAllowed)
			tk, err := b.allow()
			if err != nil || !tk.probe {
				t.Fatalf("%v after opening: probe=%v err=%v, want a probe", tc.firstProbe, tk.probe, err)
			}
			b.done(tk, outcomeDialFailure)
			clock.Advance(tc.stillOpenAt)
			if _, err := b.allow(); err != ErrCircuitOpen {
				t.Fatalf("%v after the failed probe: err=%v, want ErrCircuitOpen", tc.stillOpenAt, err)
			}
			clock.Advance(tc.probeAllowed - tc.stillOpenAt)
			if tk, err := b.allow(); err != nil || !tk.probe {
				t.Fatalf("%v after the failed probe: probe=%v err=%v, want the next probe", tc.probeAllowed, tk.probe, err)
			}
		})
	}
}
