package sqlretry

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"
)

// spreadRun runs n calls on a fake PostgreSQL whose UPDATE takes 10 ms
// (the fake clock) and fails to serialize at every call's first attempt,
// and returns the delays slept before the replays.
func spreadRun(t *testing.T, n int, ctx context.Context, opts ...Option) []time.Duration {
	return spreadRunErr(t, n, ctx, errSerialize, opts...)
}

func spreadRunErr(t *testing.T, n int, ctx context.Context, conflict error, opts ...Option) []time.Duration {
	t.Helper()
	srv := newFakeServer()
	db, clock := testDB(t, srv, append([]Option{WithContentionControl(false)}, opts...)...)
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond) // the attempt's work
		return updateTx(ctx, tx)
	}
	for range n {
		srv.script("UPDATE", step{err: conflict})
		if err := RunInTx(ctx, db, nil, slow); err != nil {
			t.Fatal(err)
		}
	}
	return clock.Sleeps()
}

// With half the attempts conflicting, replays wait up to the spread (what
// an attempt took times 300·p/(1-p), at most the backoff's Max), not the
// backoff's 5 ms: on a hot spot they then stop colliding again. Without
// it (WithReplaySpread(false)) every delay is the backoff's.
func TestReplaySpreadGrowsWithConflicts(t *testing.T) {
	on := spreadRun(t, 200, context.Background(), WithReplaySpread(true))
	off := spreadRun(t, 200, context.Background(), WithReplaySpread(false))
	def := spreadRun(t, 200, context.Background()) // PostgreSQL: off by default
	for _, d := range def {
		if d > 5*time.Millisecond {
			t.Fatalf("a delay of %v on PostgreSQL by default: the spread is on only for MySQL unless asked", d)
		}
	}
	var longOn, longOff int
	for _, d := range on[len(on)-100:] {
		if d > 50*time.Millisecond {
			longOn++
		}
		if d > time.Second {
			t.Fatalf("a delay of %v, over the backoff's Max", d)
		}
	}
	for _, d := range off {
		if d > 5*time.Millisecond {
			longOff++
		}
	}
	if longOn < 50 || longOff != 0 {
		t.Fatalf("delays over 50 ms with the spread: %d of the last 100 (want most); over 5 ms without: %d (want 0)", longOn, longOff)
	}
}

// The spread never takes more than a quarter of the time left to the
// caller's deadline.
func TestReplaySpreadWithinTheDeadline(t *testing.T) {
	ctx := context.Background()
	srv := newFakeServer()
	db, clock := testDB(t, srv, WithContentionControl(false), WithReplaySpread(true))
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	for range 200 { // the share of conflicts grows
		srv.script("UPDATE", step{err: errSerialize})
		if err := RunInTx(ctx, db, nil, slow); err != nil {
			t.Fatal(err)
		}
	}
	for range 20 {
		before := len(clock.Sleeps())
		// A deadline 200 ms after the fake clock's now (ahead of the real
		// time, which the context's own expiry follows).
		short, cancel := context.WithDeadline(ctx, clock.Now().Add(200*time.Millisecond))
		srv.script("UPDATE", step{err: errSerialize})
		err := RunInTx(short, db, nil, slow)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range clock.Sleeps()[before:] {
			if d > 48*time.Millisecond { // a quarter of what is left after the 10 ms attempt
				t.Fatalf("a delay of %v with 190 ms left", d)
			}
		}
	}
}

// On MySQL and MariaDB the spread is on by default (a deadlock, 1213).
func TestReplaySpreadOnByDefaultForMySQL(t *testing.T) {
	sleeps := spreadRunErr(t, 200, context.Background(), errCertification, WithDialect(DialectMySQL), WithCommitResolution(false))
	long := 0
	for _, d := range sleeps[len(sleeps)-100:] {
		if d > 50*time.Millisecond {
			long++
		}
	}
	if long < 50 {
		t.Fatalf("delays over 50 ms on MySQL by default: %d of the last 100, want most", long)
	}
}

// spreadPrimed is a db (fake clock, PostgreSQL with the spread asked for)
// on which 200 calls each conflicted once: half its recent attempts
// conflicted.
func spreadPrimed(t *testing.T, opts ...Option) (*fakeServer, *sql.DB, *fakeClock, func(context.Context, *sql.Tx) error) {
	t.Helper()
	srv := newFakeServer()
	db, clock := testDB(t, srv, append([]Option{WithContentionControl(false), WithReplaySpread(true)}, opts...)...)
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	for range 200 {
		srv.script("UPDATE", step{err: errSerialize})
		if err := RunInTx(context.Background(), db, nil, slow); err != nil {
			t.Fatal(err)
		}
	}
	return srv, db, clock, slow
}

// attack24: the spread's waits stay within the backoff's MaxElapsed (a
// call slept 6-8 s past it).
func TestReplaySpreadWithinMaxElapsed(t *testing.T) {
	srv, db, clock, slow := spreadPrimed(t, WithBackoff(Backoff{MaxElapsed: 300 * time.Millisecond, Max: 10 * time.Second}), withRand(0.99))
	before := len(clock.Sleeps())
	for range 30 {
		srv.script("UPDATE", step{err: errSerialize})
	}
	start := clock.Now()
	err := RunInTx(context.Background(), db, nil, slow)
	if err == nil {
		t.Fatal("want the conflict back after MaxElapsed")
	}
	var slept time.Duration
	for _, d := range clock.Sleeps()[before:] {
		slept += d
	}
	if took := clock.Now().Sub(start); slept > 300*time.Millisecond || took > 700*time.Millisecond {
		t.Fatalf("slept %v, the call took %v: past MaxElapsed 300ms", slept, took)
	}
}

// attack24: a db with no attempt ending for a while forgets its share of
// conflicts: a lone conflict after 2 s of quiet waits what it would on a
// db that never conflicted (its own conflict counts: 10 ms x 300 x
// (1/64)/(63/64), 48 ms), not the burst's spread (up to 1 s).
func TestReplaySpreadForgetsAQuietStretch(t *testing.T) {
	srv, db, clock, slow := spreadPrimed(t, withRand(0.99))
	clock.Advance(2 * time.Second)
	before := len(clock.Sleeps())
	srv.script("UPDATE", step{err: errSerialize})
	if err := RunInTx(context.Background(), db, nil, slow); err != nil {
		t.Fatal(err)
	}
	if d := clock.Sleeps()[before:]; len(d) != 1 || d[0] > 60*time.Millisecond {
		t.Fatalf("after 2 s of quiet a lone conflict's replay waited %v", d)
	}
}

// attack24: calls that turn the spread off still count in the db's share
// of conflicts; and the older a call, the shorter its spread (its replays
// had waited while fresh first attempts went on: unfair).
func TestReplaySpreadCountsEveryCallAndFavoursOldCalls(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv, WithContentionControl(false), WithReplaySpread(true), withRand(0.99))
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	for range 200 {
		srv.script("UPDATE", step{err: errSerialize})
		if err := RunInTx(context.Background(), db, nil, slow, WithReplaySpread(false)); err != nil {
			t.Fatal(err)
		}
	}
	before := len(clock.Sleeps())
	srv.script("UPDATE", step{err: errSerialize}, step{err: errSerialize}, step{err: errSerialize})
	if err := RunInTx(context.Background(), db, nil, slow); err != nil {
		t.Fatal(err)
	}
	d := clock.Sleeps()[before:]
	if len(d) != 3 || d[0] < 200*time.Millisecond {
		t.Fatalf("delays %v: the opted-out calls' conflicts are not in the db's share", d)
	}
	if !(d[1] < d[0] && d[2] < d[1]) {
		t.Fatalf("delays %v: an older call's replay should wait less", d)
	}
}

// On PostgreSQL the spread is off by default while contention control is
// engaged, and on while it is not and conflicts are frequent: replicas of
// an application, whose limiters let go of conflicts they cannot remove,
// replayed after the backoff's few milliseconds and collided again (chaos
// replicas, 2026-12-02: about 2 attempts per commit at 4 and 8 replicas).
// Here one caller at a time, so the limiter never engages. Every call
// conflicts once: the replays spread. One call in ten conflicts (a killed
// session, a slow link): they do not.
func TestReplaySpreadOnPostgresWhileContentionControlIsNotEngaged(t *testing.T) {
	sleeps := spreadRunErr(t, 200, context.Background(), errSerialize, WithContentionControl(true))
	long := 0
	for _, d := range sleeps[len(sleeps)-100:] {
		if d > 50*time.Millisecond {
			long++
		}
	}
	if long < 20 {
		t.Fatalf("delays over 50 ms on PostgreSQL with contention control not engaged and every call conflicting: %d of the last 100, want many", long)
	}
	off := spreadRunErr(t, 200, context.Background(), errSerialize, WithContentionControl(true), WithReplaySpread(false))
	for _, d := range off {
		if d > 5*time.Millisecond {
			t.Fatalf("a delay of %v with WithReplaySpread(false): the spread must stay off", d)
		}
	}

	srv := newFakeServer()
	db, clock := testDB(t, srv)
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	for i := range 400 {
		if i%10 == 0 {
			srv.script("UPDATE", step{err: errSerialize})
		}
		if err := RunInTx(context.Background(), db, nil, slow); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range clock.Sleeps() {
		if d > 5*time.Millisecond {
			t.Fatalf("a delay of %v with one call in ten conflicting: rare conflicts replay after the backoff", d)
		}
	}
}

// While contention control is engaged it paces a PostgreSQL db's
// transactions, and the spread is off unless asked for; while it is not,
// a replay is spread by default only while a fifth or more of the db's
// recent attempts conflicted (rarer conflicts: a killed session, a slow
// link, whose long attempts made the spread pause 0.2-1 s).
func TestReplaySpreadOffOnPostgresWhileEngaged(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    []Option
		engaged bool
		p       int64
		want    bool
		dialect Dialect
	}{
		{"default, not engaged, frequent conflicts", nil, false, spreadOne / 3, true, DialectPostgres},
		{"default, not engaged, rare conflicts", nil, false, spreadOne / 8, false, DialectPostgres},
		{"default, engaged", nil, true, spreadOne / 3, false, DialectPostgres},
		{"asked for, engaged, rare conflicts", []Option{WithReplaySpread(true)}, true, spreadOne / 8, true, DialectPostgres},
		{"refused, not engaged", []Option{WithReplaySpread(false)}, false, spreadOne / 3, false, DialectPostgres},
		{"MySQL default, engaged, rare conflicts", nil, true, spreadOne / 8, true, DialectMySQL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, _ := testDB(t, newFakeServer(), append([]Option{WithDialect(tc.dialect)}, tc.opts...)...)
			r := retrierOf(db)
			r.txLimit.engaged.Store(tc.engaged)
			r.spread.p.Store(tc.p)
			if got := r.spreadsNow(r.txLimit); got != tc.want {
				t.Fatalf("spreadsNow = %v, want %v", got, tc.want)
			}
			if r.spreadsNow(nil) != r.spreads() {
				t.Fatal("without a limiter (contention control off, a nested call) spreadsNow must be spreads")
			}
		})
	}
}

// Shadow mode reports the pause enforcement would take: on PostgreSQL with
// contention control not engaged and frequent conflicts, the spread's
// (attack24: shadow mode once reported the backoff's few ms where
// enforcing paused hundreds).
func TestShadowReportsThePostgresSpreadWhileNotEngaged(t *testing.T) {
	srv := newFakeServer()
	log := &eventLog{}
	db, clock := testDB(t, srv, WithObserver(log), withRand(0.99))
	slow := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(10 * time.Millisecond)
		return updateTx(ctx, tx)
	}
	r := retrierOf(db)
	prime := func() {
		r.spread.p.Store(spreadOne / 2) // half the recent attempts conflicted
		r.spread.last.Store(clock.Now().UnixNano())
	}
	prime()
	srv.script("UPDATE", step{err: errSerialize})
	if err := RunInTx(context.Background(), db, nil, slow); err != nil {
		t.Fatal(err)
	}
	enforced := clock.Sleeps()[len(clock.Sleeps())-1]
	if !SetShadow(db, true) {
		t.Fatal("SetShadow")
	}
	prime()
	srv.script("UPDATE", step{err: errSerialize})
	if err := RunInTx(context.Background(), db, nil, slow); err == nil {
		t.Fatal("shadow mode: want the conflict back")
	}
	ev := log.shadow()
	if len(ev) != 1 || ev[0].Kind != EventRetry {
		t.Fatalf("shadow events %+v, want one retry", ev)
	}
	if enforced < 50*time.Millisecond || ev[0].Delay < enforced/2 {
		t.Fatalf("shadow mode reported a pause of %v where enforcing paused %v", ev[0].Delay, enforced)
	}
}

// After a burst of conflicts the db's share of conflicting attempts goes
// back to 0 with commits, not to a residue that keeps every commit
// reading the clock and writing the db's shared spread state (integer
// decay by 1/64 stopped at 63 of 2^20 before).
func TestReplaySpreadShareReturnsToZero(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	for range 50 {
		srv.script("UPDATE", step{err: errSerialize})
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	r := retrierOf(db)
	if r.spread.p.Load() == 0 {
		t.Fatal("no share of conflicts after 50 conflicts")
	}
	for range 2000 {
		if err := RunInTx(context.Background(), db, nil, updateTx); err != nil {
			t.Fatal(err)
		}
	}
	if p := r.spread.p.Load(); p != 0 {
		t.Fatalf("after 2000 commits the share of conflicts is %d of %d, want 0", p, spreadOne)
	}
}

// The PostgreSQL default spread pauses at most spreadAutoMax (250 ms); one
// asked for with WithReplaySpread(true), up to the backoff's Max.
func TestReplaySpreadOnPostgresByDefaultIsBounded(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []Option
		max  time.Duration
	}{
		{"default", nil, spreadAutoMax},
		{"asked for", []Option{WithReplaySpread(true)}, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := spreadPauseAfter(t, step{err: errSerialize}, 40*time.Millisecond, tc.opts...)
			if got > tc.max || got < tc.max*9/10 {
				t.Fatalf("paused %v after a 40 ms attempt with half the attempts conflicting, want about %v", got, tc.max)
			}
		})
	}
}

// spreadsNow says whether a conflict's replay of a call with limiter lim
// is spread now (spreadTracks, spreading), as attempts decides it.
func (r *retrier) spreadsNow(lim *txLimiter) bool {
	_, auto := r.spreadTracks(lim, false)
	return r.spreading(auto)
}

// spreadPauseAfter is the pause before the replay of one call whose
// first attempt took took and failed as fail says, on a fresh db (options
// opts) where half the recent attempts conflicted.
func spreadPauseAfter(t *testing.T, fail step, took time.Duration, opts ...Option) time.Duration {
	t.Helper()
	srv := newFakeServer()
	db, clock := testDB(t, srv, append([]Option{withRand(0.99)}, opts...)...)
	primeSpread(db, clock)
	srv.script("UPDATE", fail)
	fn := func(ctx context.Context, tx *sql.Tx) error {
		clock.Advance(took)
		return updateTx(ctx, tx)
	}
	if err := RunInTx(context.Background(), db, nil, fn); err != nil {
		t.Fatal(err)
	}
	return clock.Sleeps()[len(clock.Sleeps())-1]
}

// primeSpread makes half the db's recent attempts conflicted, as of now.
func primeSpread(db *sql.DB, clock *fakeClock) {
	r := retrierOf(db)
	r.spread.p.Store(spreadOne / 2)
	r.spread.last.Store(clock.Now().UnixNano())
}

// Hostile review of the PostgreSQL default spread (2026-12-02): each case
// failed before its fix.
func TestReplaySpreadPostgresDefaultReview(t *testing.T) {
	slow := func(clock *fakeClock, took time.Duration) func(context.Context, *sql.Tx) error {
		return func(ctx context.Context, tx *sql.Tx) error {
			clock.Advance(took)
			return updateTx(ctx, tx)
		}
	}
	t.Run("calls that refuse the spread count in the db's share", func(t *testing.T) {
		srv := newFakeServer()
		db, clock := testDB(t, srv)
		for range 100 {
			srv.script("UPDATE", step{err: errSerialize})
			if err := RunInTx(context.Background(), db, nil, slow(clock, 10*time.Millisecond), WithReplaySpread(false)); err != nil {
				t.Fatal(err)
			}
		}
		if p := retrierOf(db).spread.p.Load(); p < spreadOne/10 {
			t.Fatalf("after 100 refusing calls that each conflicted once the db's share is %d of %d: they were left out", p, spreadOne)
		}
		for _, d := range clock.Sleeps() {
			if d > 10*time.Millisecond {
				t.Fatalf("a refusing call paused %v", d)
			}
		}
	})
	t.Run("an unknown dialect does not spread by default", func(t *testing.T) {
		if d := spreadPauseAfter(t, step{err: errSerialize}, 10*time.Millisecond, WithDialect(DialectUnknown)); d > 10*time.Millisecond {
			t.Fatalf("paused %v on DialectUnknown", d)
		}
	})
	t.Run("a transaction timeout is not spread", func(t *testing.T) {
		timeout := step{err: &pgSevError{Severity: "FATAL", Code: "25P04", Message: "terminating connection due to transaction timeout"}, closes: true}
		if d := spreadPauseAfter(t, timeout, 20*time.Millisecond); d > 10*time.Millisecond {
			t.Fatalf("a transaction timeout's replay paused %v", d)
		}
	})
	t.Run("shadow mode reports the spread whatever the limiter's stale state", func(t *testing.T) {
		srv := newFakeServer()
		log := &eventLog{}
		db, clock := testDB(t, srv, WithObserver(log), withRand(0.99))
		retrierOf(db).txLimit.engaged.Store(true) // engaged when shadow mode was turned on
		SetShadow(db, true)
		primeSpread(db, clock)
		srv.script("UPDATE", step{err: errSerialize})
		_ = RunInTx(context.Background(), db, nil, slow(clock, 10*time.Millisecond))
		ev := log.shadow()
		if len(ev) != 1 || ev[0].Delay < 100*time.Millisecond {
			t.Fatalf("shadow events %+v: want one retry with the spread's pause", ev)
		}
	})
	t.Run("the spread keeps the Max the call started with", func(t *testing.T) {
		srv := newFakeServer()
		db, clock := testDB(t, srv, withRand(0.99), WithBackoff(Backoff{Max: 20 * time.Millisecond}))
		primeSpread(db, clock)
		srv.script("UPDATE", step{err: errSerialize})
		fn := func(ctx context.Context, tx *sql.Tx) error {
			clock.Advance(10 * time.Millisecond)
			SetBackoff(db, Backoff{Max: 10 * time.Second})
			return updateTx(ctx, tx)
		}
		if err := RunInTx(context.Background(), db, nil, fn); err != nil {
			t.Fatal(err)
		}
		if d := clock.Sleeps()[len(clock.Sleeps())-1]; d > 20*time.Millisecond {
			t.Fatalf("paused %v: past the call's Max of 20 ms", d)
		}
	})
}

// Under -race: concurrent calls of a PostgreSQL db with the default
// spread, per-call refusals, shadow mode turned on and off, the limiter
// engaging and letting go on its own (a hostile review's, 2026-12-02).
func TestReplaySpreadPostgresConcurrentCalls(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv)
	r := retrierOf(db)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			SetShadow(db, i%7 == 0)
			_ = r.spreadsNow(r.txLimit)
			time.Sleep(100 * time.Microsecond)
		}
	}()
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				srv.script("UPDATE", step{err: errSerialize})
				var opts []Option
				if (g+i)%2 == 0 {
					opts = append(opts, WithReplaySpread(false))
				}
				_ = RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error { clock.Advance(time.Millisecond); return updateTx(ctx, tx) }, opts...)
			}
		}()
	}
	wg.Wait()
	close(stop)
	SetShadow(db, false)
	_ = stats(t, db)
}
