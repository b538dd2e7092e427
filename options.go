package sqlretry

import (
	"context"
	"errors"
	"fmt"
	"math"
	"reflect"
	"time"
)

// Option configures sqlretry. Options are checked when they are applied:
// Open, Register, Wrap and WrapConnector return the error; OpenDB returns a
// *sql.DB whose every call returns it.
type Option func(*config) error

// Dialect selects the database-specific behaviour: error tables, how a lost
// COMMIT is resolved, and PostgreSQL's rule that any error aborts a
// transaction. Open detects it from the driver.
type Dialect uint8

const (
	DialectUnknown  Dialect = iota // both error tables; lost COMMITs are ErrAmbiguousCommit
	DialectPostgres                // pgx, lib/pq, and pgwire engines
	DialectMySQL                   // go-sql-driver/mysql: MySQL, MariaDB
)

// String names the dialect: "postgres", "mysql" or "unknown".
func (d Dialect) String() string {
	switch d {
	case DialectPostgres:
		return "postgres"
	case DialectMySQL:
		return "mysql"
	}
	return "unknown"
}

type config struct {
	backoff        Backoff
	breaker        *Breaker // nil: no breaker
	budget         *Budget  // nil: no budget
	dialParallel   int
	attemptTimeout time.Duration
	observer       Observer
	clock          Clock
	rnd            func() float64
	rules          []Classifier
	dialect        Dialect
	dialectSet     bool
	resolveCommits bool
	mysqlMarker    string // "" when off
	// mysqlMarkerSet: the caller named the marker table
	// (WithMySQLCommitMarker), so a table it may not use is an error of
	// each writing transaction; the default marker turns itself off.
	mysqlMarkerSet bool
	commitFlight   CommitFlight // WithCommitFlight; nil: the question before COMMIT has a round trip of its own

	contentionControl bool
	contentionQueue   bool
	shortLockWait     bool // WithShortLockWait
	shortDeadlock     bool // WithShortDeadlockCheck
	replaySpread      bool // WithReplaySpread ...
	replaySpreadSet   bool // ... given: otherwise on for MySQL/MariaDB only

	shadow bool // WithShadow

	fallback func(ctx context.Context, reason error) error // WithFallback
}

func defaultConfig() config {
	br, bu := DefaultBreaker, DefaultBudget
	return config{
		backoff:        DefaultBackoff,
		breaker:        &br,
		budget:         &bu,
		dialParallel:   4,
		clock:          realClock{},
		rnd:            defaultRand,
		resolveCommits: true,
		mysqlMarker:    DefaultMySQLCommitMarker,

		contentionControl: true,
		shortLockWait:     false, // server-side handlers may catch its lock timeout: WithShortLockWait
		shortDeadlock:     true,  // only when the role may set deadlock_timeout: WithShortDeadlockCheck
		replaySpread:      true,
	}
}

func (c *config) apply(opts []Option) error {
	for i, o := range opts {
		if o == nil {
			return fmt.Errorf("sqlretry: option %d is nil", i)
		}
		if err := o(c); err != nil {
			return err
		}
	}
	return nil
}

// WithContentionControl turns RunInTx's contention control on (the
// default) or off. While the transactions of a *sql.DB keep aborting each
// other (serialization failures, deadlocks, lock-wait timeouts) it lets only
// as many run at once as commit without conflict, halving the number at each
// round of conflicts and growing it by one per round of commits, and lets go
// once conflicts stop. The others wait their turn, first come first served,
// within their context's deadline. A RunInTx inside another never waits.
func WithContentionControl(on bool) Option {
	return func(c *config) error {
		c.contentionControl = on
		return nil
	}
}

// WithReplaySpread turns the replay spread of RunInTx on or off. By
// default it is on for MySQL and MariaDB, where InnoDB finds deadlocks at
// once and contention control seldom engages. On PostgreSQL, where
// contention control and short deadlock checks handle a hot spot within
// one process, it is on by default only while contention control is not
// engaged and at least a fifth of the db's recent attempts conflicted
// (other replicas of the application, whose conflicts no replica's
// contention control can remove), and then pauses at most 250 ms; true
// turns it on always, false off. A
// replay after a conflict (a serialization failure, a deadlock, a
// lock-wait timeout) waits the backoff's delay, or a random delay up to a
// spread that grows with the db's recent share of attempts that conflicted
// and with how long the attempt took, when that is longer: on a hot spot
// the replays then spread out instead of colliding again, which also works
// across replicas of an application (each sees the same share of
// conflicts). A timeout that ended the attempt (statement, transaction or
// idle-in-transaction timeout) is not a conflict and is not spread. The
// delay is shorter for a call's later replays, never
// takes more than a quarter of the time left to the caller's deadline,
// and never goes past the backoff's MaxElapsed. It costs the callers of
// one db some evenness: see the README.
func WithReplaySpread(on bool) Option {
	return func(c *config) error {
		c.replaySpread, c.replaySpreadSet = on, true
		return nil
	}
}

// WithContentionQueue (off by default) makes contention control queue in
// the database as well, for applications running as several replicas on
// PostgreSQL (each *sql.DB has its own contention control, which sees only
// its own transactions): while it limits, for 5 s after, and while other
// replicas use the queue, the replicas take turns of 20 ms at a session
// advisory lock named after fn's function (pg_advisory_lock, on a session
// of its own, outside the pool), and within its turn a replica runs fn's
// transactions one at a time. A turn costs two statements on that
// session; a wait longer than 2 s (or the caller's deadline) or an error
// runs the transaction without it. It does nothing on MySQL. See the
// README.
func WithContentionQueue(on bool) Option {
	return func(c *config) error {
		c.contentionQueue = on
		return nil
	}
}

// WithShortLockWait turns RunInTx's short lock waits on or off (the
// default). On PostgreSQL, which looks for a deadlock only after
// deadlock_timeout (1 s by default), an attempt that replays a conflict,
// and any attempt while the db met deadlocks in the last 2 s, sets its
// transaction's lock_timeout (SHOW lock_timeout, then SET LOCAL, right
// after BEGIN: utility statements, which take no snapshot) to a few times
// a recent commit's duration, at least 20 ms, doubling at each such
// attempt of one call and never as long as deadlock_timeout: a
// deadlock then breaks after that bound, as a lock timeout that RunInTx
// replays. A lower lock_timeout of the user's is kept, and a SET LOCAL in
// the closure wins. It does nothing on MySQL. Given to one RunInTx call
// on a db opened with them, false turns them off for that call.
//
// Turn them on only where no code on the server catches a lock timeout:
// a PL/pgSQL EXCEPTION WHEN lock_not_available (or WHEN OTHERS) block in
// a function or trigger the transactions run catches sqlretry's bound as
// its own, and its transaction commits what that handler does (a "busy"
// branch) where the plain driver would have waited and done the work;
// the client cannot see that happen. What the closure itself does with
// the bound's 55P03 (a savepoint handler, its own Rollback, an error of
// its own) is seen: such an attempt is never committed, it is replayed
// without a bound. See the README.
func WithShortLockWait(on bool) Option {
	return func(c *config) error {
		c.shortLockWait = on
		return nil
	}
}

// WithShortDeadlockCheck turns RunInTx's short deadlock checks on (the
// default) or off. On PostgreSQL, which looks for a deadlock only after
// deadlock_timeout (1 s by default), an attempt that replays a conflict,
// and any attempt while the db met deadlocks in the last 2 s, runs SHOW
// deadlock_timeout right after BEGIN and, when it is longer than the bound
// WithShortLockWait describes, SET LOCAL deadlock_timeout to it (utility
// statements: they take no snapshot). A deadlock the transaction takes
// part in is then found after that bound instead of a second; no wait
// that is not a deadlock ends. The transaction becomes the cycle's victim
// where the plain driver might have made the other one it, so a PL/pgSQL
// EXCEPTION WHEN deadlock_detected handler on the server would take its
// branch in it: where such handlers exist, turn them off. A 40P01 under
// the bound that the closure handles itself is never committed: the
// attempt is replayed with the server's deadlock_timeout. Only a role that
// may set deadlock_timeout gets them (a superuser, or GRANT SET ON
// PARAMETER deadlock_timeout, PostgreSQL 15 and later); for any other
// role such an attempt is refused (42501) and runs again at once without
// it; the refusing session stops asking until its role may have changed
// back (a session's own SET ROLE) or a minute passes, and four refusals
// in a row pause the db's checks for a minute, doubling up to an hour.
// WithShortLockWait(true) takes
// their place. It does nothing on MySQL. Given to one RunInTx call on a
// db opened with them, false turns them off for that call. See the
// README.
func WithShortDeadlockCheck(on bool) Option {
	return func(c *config) error {
		c.shortDeadlock = on
		return nil
	}
}

func optionError(name string, err error) error {
	return fmt.Errorf("sqlretry: %s: %w", name, err)
}

// maxOptionDuration bounds every duration option: a longer one is a unit
// mistake (a count of seconds given as a Duration of nanoseconds scaled up),
// and near the top of the int64 range the backoff's and the breaker's
// float arithmetic overflows.
const maxOptionDuration = 24 * time.Hour

var errDurationTooLong = fmt.Errorf("durations must not exceed %v", maxOptionDuration)

// maxDialConcurrency bounds WithDialConcurrency (the limiter's channel is
// allocated at that size).
const maxDialConcurrency = 10000

// finite reports a float option that is neither NaN nor infinite: NaN
// passes every range check (each comparison is false) and then poisons
// the arithmetic (Backoff{Multiplier: NaN} removed all backoff).
func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// WithBackoff sets the retry pacing; zero fields take DefaultBackoff's values.
func WithBackoff(b Backoff) Option {
	return func(c *config) error {
		if err := b.validate(); err != nil {
			return optionError("WithBackoff", err)
		}
		c.backoff = b.withDefaults()
		return nil
	}
}

// WithMaxAttempts sets how many attempts a call may make, the first
// included (default 30). 1 turns retries off.
func WithMaxAttempts(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return optionError("WithMaxAttempts", fmt.Errorf("%d is not at least 1", n))
		}
		c.backoff.MaxAttempts = n
		return nil
	}
}

// WithBreaker sets the circuit breaker; zero fields take DefaultBreaker's values.
func WithBreaker(b Breaker) Option {
	return func(c *config) error {
		if err := b.validate(); err != nil {
			return optionError("WithBreaker", err)
		}
		b = b.withDefaults()
		c.breaker = &b
		return nil
	}
}

// WithoutBreaker turns the circuit breaker off.
func WithoutBreaker() Option {
	return func(c *config) error { c.breaker = nil; return nil }
}

// WithBudget sets the retry budget; zero fields take DefaultBudget's values.
func WithBudget(b Budget) Option {
	return func(c *config) error {
		if err := b.validate(); err != nil {
			return optionError("WithBudget", err)
		}
		b = b.withDefaults()
		c.budget = &b
		return nil
	}
}

// WithoutBudget turns the retry budget off.
func WithoutBudget() Option {
	return func(c *config) error { c.budget = nil; return nil }
}

// WithDialConcurrency bounds the dials in flight per connector (default 4).
func WithDialConcurrency(n int) Option {
	return func(c *config) error {
		if n < 1 || n > maxDialConcurrency {
			return optionError("WithDialConcurrency", fmt.Errorf("%d is not in [1, %d]", n, maxDialConcurrency))
		}
		c.dialParallel = n
		return nil
	}
}

// WithAttemptTimeout bounds each dial and each autocommit statement attempt
// inside the caller's deadline (default 0: no bound), so that a hung
// connection turns into a retry while time is left. A write that timed out
// after it was sent is ambiguous and is not retried.
func WithAttemptTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return optionError("WithAttemptTimeout", errors.New("must not be negative"))
		}
		if d > maxOptionDuration {
			return optionError("WithAttemptTimeout", errDurationTooLong)
		}
		c.attemptTimeout = d
		return nil
	}
}

// WithObserver sends every decision to o (default: none).
func WithObserver(o Observer) Option {
	return func(c *config) error {
		if o == nil || isNilPointer(o) {
			return optionError("WithObserver", errors.New("observer is nil"))
		}
		c.observer = o
		return nil
	}
}

// WithClock replaces the clock (default: the real one); for tests.
func WithClock(clock Clock) Option {
	return func(c *config) error {
		if clock == nil {
			return optionError("WithClock", errors.New("clock is nil"))
		}
		c.clock = clock
		return nil
	}
}

// WithClassifier adds a rule that runs before the defaults; later rules run
// after earlier ones.
func WithClassifier(rule Classifier) Option {
	return func(c *config) error {
		if rule == nil {
			return optionError("WithClassifier", errors.New("classifier is nil"))
		}
		c.rules = append(c.rules, rule)
		return nil
	}
}

// WithDialect overrides the dialect detected from the driver.
func WithDialect(d Dialect) Option {
	return func(c *config) error {
		if d > DialectMySQL {
			return optionError("WithDialect", fmt.Errorf("unknown dialect %d", d))
		}
		c.dialect, c.dialectSet = d, true
		return nil
	}
}

// WithCommitResolution turns the PostgreSQL resolution of lost COMMITs on
// or off (default on). When on, a transaction that wrote asks for its
// transaction id just before COMMIT (one extra round trip); when its COMMIT
// loses the connection, sqlretry asks txid_status on a fresh connection and
// reports success, replay, or ErrAmbiguousCommit. When off, every lost
// COMMIT is ErrAmbiguousCommit.
func WithCommitResolution(on bool) Option {
	return func(c *config) error { c.resolveCommits = on; return nil }
}

// DefaultMySQLCommitMarker is the table of the MySQL/MariaDB commit
// marker when no WithMySQLCommitMarker option names one.
const DefaultMySQLCommitMarker = "sqlretry_commit_marker"

// WithMySQLCommitMarker names the table of the MySQL/MariaDB resolution of
// lost COMMITs, or turns it off with "". It is on by default, in the table
// DefaultMySQLCommitMarker of the DSN's database.
//
// A transaction that wrote also inserts a row with a random token into
// table as it commits; after a lost COMMIT sqlretry waits for the old
// session to end and looks the token up. On MariaDB the INSERT travels
// with the COMMIT in one statement (an anonymous block), so it costs no
// round trip; on MySQL it is one more round trip. table is "name" (in the
// DSN's database, fixed at first use: USE in a transaction does not move
// it) or "db.name". It is created if missing; the user needs SELECT,
// INSERT and DELETE on it (CREATE only to create it). READ ONLY
// transactions write no marker. Rows older than an hour are deleted now
// and then, in the background, until the db is closed.
//
// The default marker turns itself off, with one EventResolutionOff for the
// observer (or one warning on slog's default logger when there is none),
// when there is no database to put it in or the user may not create or use
// it: a lost COMMIT is then ErrAmbiguousCommit. A table named here does not:
// writing transactions fail at once with an error that says what to do.
func WithMySQLCommitMarker(table string) Option {
	return func(c *config) error {
		if table != "" && !isPlainIdentifier(table) {
			return optionError("WithMySQLCommitMarker", fmt.Errorf("%q is not a plain table name ([A-Za-z0-9_], optionally schema.table)", table))
		}
		c.mysqlMarker, c.mysqlMarkerSet = table, table != ""
		return nil
	}
}

func isPlainIdentifier(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	dots := 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '.':
			dots++
			if dots > 1 || i == 0 || i == len(s)-1 {
				return false
			}
		case c == '_', c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		default:
			return false
		}
	}
	return true
}

// Context markers for one call.
type ctxKey uint8

const (
	keyIdempotent ctxKey = iota + 1
	keyNoRetry
)

// Idempotent marks the calls made with ctx as safe to run twice: an
// autocommit write that loses its connection after it was sent is re-run
// instead of returned as ambiguous.
func Idempotent(ctx context.Context) context.Context {
	return context.WithValue(ctx, keyIdempotent, true)
}

// NotIdempotent marks the calls made with ctx as unsafe to run twice even
// when they look like reads (a SELECT of a function with side effects).
// Statements the server rolled back are still retried.
func NotIdempotent(ctx context.Context) context.Context {
	return context.WithValue(ctx, keyIdempotent, false)
}

// NoRetry turns every retry off for the calls made with ctx.
func NoRetry(ctx context.Context) context.Context {
	return context.WithValue(ctx, keyNoRetry, true)
}

// isNilPointer says whether v is a nil pointer (or map, func, chan)
// inside a non-nil interface: a constructor's result left nil after its
// error, say, which would panic at the first call.
func isNilPointer(v any) bool {
	switch rv := reflect.ValueOf(v); rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Func, reflect.Chan, reflect.Interface, reflect.Slice:
		return rv.IsNil()
	}
	return false
}
