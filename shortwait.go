package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Short lock waits for replays (PostgreSQL).
//
// PostgreSQL looks for a deadlock only after deadlock_timeout (1 s by
// default, and only a superuser may change it): every transaction of a
// cycle, and every one queued behind them, stalls that long. Contention
// control keeps one *sql.DB's transactions from forming cycles, but the
// transactions of other replicas of the application (each its own *sql.DB)
// it cannot see, and in one process the cycles that form before it
// engages each cost a second too. So an attempt that is a replay after a
// conflict, and any attempt while the db met deadlocks recently, sets a
// lock_timeout of its own right after BEGIN, bounded by what the db's
// transactions take: a cycle then breaks after that bound, with a
// lock_not_available (55P03) that RunInTx replays like the deadlock it
// replaces.
//
// The bound is shortWaitFactor times a recent commit's duration (at least
// shortWaitFloor), doubled at each short-wait attempt of one call, and
// never as long as the server's deadlock_timeout: a caller waiting behind
// a session that holds its row for seconds gets a handful of short
// attempts, then waits as long as it takes. The user's settings win: a
// lock_timeout already lower (the session's, the role's, the DSN's) is
// kept, and a SET LOCAL of the closure runs after sqlretry's. It is SET
// LOCAL, so nothing outlives the transaction, also behind PgBouncer in
// transaction mode. The happy path pays one atomic load per RunInTx; the
// attempts that get a bound pay two utility statements (set), three when
// deadlock_timeout is read again.
type shortWait struct {
	hot      atomic.Bool  // a deadlock, or a short wait that ran out, was seen ...
	hotUntil atomic.Int64 // ... and it counts until then (unix ns)
	commit   atomic.Int64 // recent commit duration, ns (moving average of the attempts that had a bound); 0: none yet
	deadlock atomic.Int64 // the server's deadlock_timeout, ms; 0: not read yet
	// deadlockRead: when short lock waits last read deadlock_timeout
	// (unix ns, the db's clock).
	deadlockRead atomic.Int64
	off          atomic.Bool // the server refused the statement (an engine without lock_timeout): off for good
	// refusals: the 42501s the bound's SET met in a row, no bound set
	// between them (roleRefusal); pausedUntil: the db asks for no bound
	// until then (unix ns, the db's clock; 0: not paused), after
	// refusalsToPause of them; pauseFor: the next pause.
	refusals    atomic.Int32
	pausedUntil atomic.Int64
	pauseFor    atomic.Int64
	// deadlockMode: the bound is a deadlock_timeout (WithShortDeadlockCheck,
	// the default), not a lock_timeout (WithShortLockWait(true)).
	deadlockMode bool
}

const (
	shortWaitFloor  = 20 * time.Millisecond
	shortWaitFactor = 4
	// shortWaitMemory: how long a deadlock (or a short wait that ran out)
	// keeps every attempt of the db bounded.
	shortWaitMemory = 2 * time.Second
	// defaultDeadlockTimeout is assumed until the server says.
	defaultDeadlockTimeout = time.Second
)

// Short lock waits run utility statements only, none of which takes the
// transaction's snapshot (the SELECT of set_config they sent before did:
// under REPEATABLE READ a closure that began with LOCK TABLE read rows
// older than its lock, and SET TRANSACTION failed after it):
// shortLockShow reads the lock_timeout in force (the session's, the
// role's, the DSN's), and when it is 0 or longer than the bound, and the
// server's deadlock_timeout longer still, shortLockSet(ms) sets the
// transaction's (SET LOCAL). deadlock_timeout is read with
// shortDeadlockShow on the db's first bounded attempt and again once
// shortWaitRelearn has passed: it only decides whether a bound is worth
// setting, and a server's that changed (a reload, a session's SET) is
// seen within that time. The bound is on shortDeadlockMS's grid, as few
// texts as short deadlock checks send. Both end in shortLockMark, so that
// a closure's own SHOW or SET LOCAL lock_timeout is never taken for
// sqlretry's (isShortWaitQuery: its SET makes the attempt's later 55P03s
// the user's, tx.done).
const (
	shortLockMark      = " /* sqlretry */"
	shortLockShow      = "SHOW lock_timeout" + shortLockMark
	shortLockSetPrefix = "SET LOCAL lock_timeout = "
)

// shortWaitRelearn: how long short lock waits go on with the
// deadlock_timeout they read before they read it again.
const shortWaitRelearn = time.Minute

func shortLockSet(ms int64) string {
	return shortLockSetPrefix + strconv.FormatInt(ms, 10) + shortLockMark
}

// Short deadlock checks run two utility statements, neither of which takes
// the transaction's snapshot (a SELECT would: under REPEATABLE READ a
// closure that begins with LOCK TABLE would then read rows older than
// its lock, and SET TRANSACTION ISOLATION LEVEL would fail after it):
// shortDeadlockShow reads the session's deadlock_timeout, and, when it is
// longer than the bound, shortDeadlockSet(ms) lowers it for the
// transaction (SET LOCAL). A role that may not set it (not a superuser,
// no GRANT SET ON PARAMETER) gets 42501 and the db stops asking; the
// attempt runs again at once without them, its closure not having run.
// Both end in shortLockMark, as short lock waits' do: a closure's own
// SET LOCAL deadlock_timeout was taken for sqlretry's (hidden from
// observers, and a deadlock after it counted as one of the bound's). The
// bound is rounded up to 5 ms times a power of two, so that a few
// texts serve every bound (a driver caches a prepared statement per
// text).
const (
	shortDeadlockShow      = "SHOW deadlock_timeout" + shortLockMark
	shortDeadlockSetPrefix = "SET LOCAL deadlock_timeout = "
)

// shortDeadlockMS rounds a bound up to 5 ms times a power of two, at
// least 20 ms.
func shortDeadlockMS(d time.Duration) int64 {
	ms := int64(20)
	for ms*int64(time.Millisecond) < int64(d) && ms < 1<<40 {
		ms *= 2
	}
	return ms
}

func shortDeadlockSet(ms int64) string {
	return shortDeadlockSetPrefix + strconv.FormatInt(ms, 10) + shortLockMark
}

// isShortWaitQuery says whether query is one of the bound's statements.
func isShortWaitQuery(query string) bool {
	return query == shortLockShow || query == shortDeadlockShow ||
		(strings.HasPrefix(query, shortDeadlockSetPrefix) || strings.HasPrefix(query, shortLockSetPrefix)) && strings.HasSuffix(query, shortLockMark)
}

// parsePgMillis reads a time setting as SHOW gives it ("1s", "20ms",
// "1min", "1h", "1d"; a bare number is ms) in ms; false if it does not
// parse.
func parsePgMillis(s string) (int64, bool) {
	units := []struct {
		suffix string
		ms     int64
	}{{"ms", 1}, {"min", 60000}, {"s", 1000}, {"h", 3600000}, {"d", 86400000}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.ms
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n * mult, true
}

// newShortWait is the db's short-wait state, nil when off: PostgreSQL only
// (MySQL finds deadlocks at once, and its lock wait timeout counts whole
// seconds). WithShortLockWait(true) bounds lock waits; otherwise
// WithShortDeadlockCheck (on by default) bounds the wait before the
// deadlock check.
func newShortWait(cfg config, dialect Dialect) *shortWait {
	switch {
	case dialect != DialectPostgres:
		return nil
	case cfg.shortLockWait:
		return &shortWait{}
	case cfg.shortDeadlock:
		return &shortWait{deadlockMode: true}
	}
	return nil
}

// offFor says whether a call whose options are cfg turns the db's short
// waits off for itself.
func (s *shortWait) offFor(cfg config) bool {
	return s != nil && (s.deadlockMode && !cfg.shortDeadlock || !s.deadlockMode && !cfg.shortLockWait)
}

// isHot says whether the db met a deadlock (or a short wait ran out)
// within shortWaitMemory. The clock is read only while it did.
func (s *shortWait) isHot(clock Clock) bool {
	if !s.hot.Load() {
		return false
	}
	if clock.Now().UnixNano() < s.hotUntil.Load() {
		return true
	}
	s.hot.Store(false)
	return false
}

// bound is the lock wait for a call's attempt after n attempts of the same
// call that had one; 0: none (off, or the bound reached deadlock_timeout,
// where it no longer shortens anything).
func (s *shortWait) bound(n int) time.Duration {
	if s.off.Load() {
		return 0
	}
	b, dt := s.first(), s.deadlockTimeout()
	for ; n > 0 && b < dt; n-- {
		b *= 2
	}
	if b >= dt {
		return 0
	}
	return b
}

// top is the longest bound below deadlock_timeout: where a call's bounds
// stop climbing while contention control is engaged (tx.go). There an
// attempt with no bound joins the tangle of lock waits that only the
// server's deadlock detection unwinds, one victim a second, while it holds
// a slot: on the READ COMMITTED hot spot (attack5) most unbounded
// attempts were such replays. 0: none (off, or no bound below it).
func (s *shortWait) top() time.Duration {
	if s.off.Load() {
		return 0
	}
	b, dt := s.first(), s.deadlockTimeout()
	if b >= dt {
		return 0
	}
	for 2*b < dt {
		b *= 2
	}
	return b
}

// first is a call's first bound: shortWaitFactor times a recent commit's
// duration, at least shortWaitFloor.
func (s *shortWait) first() time.Duration {
	return max(shortWaitFloor, shortWaitFactor*time.Duration(s.commit.Load()))
}

// deadlockTimeout is the server's deadlock_timeout, as the last bounded
// attempt read it, or PostgreSQL's default until one did.
func (s *shortWait) deadlockTimeout() time.Duration {
	if ms := s.deadlock.Load(); ms > 0 {
		return time.Duration(ms) * time.Millisecond
	}
	return defaultDeadlockTimeout
}

// committed takes an attempt that had a bound and committed, took long
// after its BEGIN returned, into the recent commit duration (weight 1/8).
func (s *shortWait) committed(took time.Duration) {
	if took <= 0 {
		return
	}
	old := s.commit.Load()
	if old == 0 {
		s.commit.Store(int64(took))
		return
	}
	s.commit.Store(old + (int64(took)-old)/8)
}

// failed takes an attempt's cause: a deadlock, or a lock wait that ran out
// under this bound (bounded), makes the db hot for shortWaitMemory.
func (s *shortWait) failed(cause error, bounded bool, clock Clock) {
	switch ErrorCode(cause) {
	case "40P01":
	case "55P03":
		if !bounded {
			return
		}
	default:
		return
	}
	s.hotUntil.Store(clock.Now().Add(shortWaitMemory).UnixNano())
	s.hot.Store(true)
}

// conflictCost is what an attempt that a conflict aborted cost, for
// contention control: took, or for a lock wait that ran out under this
// attempt's bound, at least the server's deadlock_timeout. Such a wait
// most often broke a cycle that PostgreSQL would have found after
// deadlock_timeout, and contention control judges conflicts by what they
// waste: counted at 20 ms they looked cheap, it limited less, and the
// single-process hot spot committed less than without short waits in 4
// of 7 runs (0.33-0.78).
//
// With short deadlock checks it is a deadlock found under the bound that
// counts so: PostgreSQL would have found it after deadlock_timeout.
func (s *shortWait) conflictCost(took time.Duration, bounded bool, cause error) time.Duration {
	if s == nil || !bounded {
		return took
	}
	switch code := ErrorCode(cause); {
	case code == "55P03" && !s.deadlockMode, code == "40P01" && s.deadlockMode:
		return max(took, s.deadlockTimeout())
	}
	return took
}

// shortWaitError is the failure of the statement that sets the bound.
type shortWaitError struct{ err error }

func (e *shortWaitError) Error() string {
	return "sqlretry: setting a short lock_timeout or deadlock_timeout: " + e.err.Error()
}
func (e *shortWaitError) Unwrap() error { return e.err }

// shortBound is what set did: the bound it set (ms; 0: none, the user's
// setting stays) and the session's value it replaced, as SHOW gave it
// (tx.restoreBound). A bound set is sqlretry's own (txAttempt.ownBound).
type shortBound struct {
	ms  int64
	pre string
}

// gridMS is the bound for d on shortDeadlockMS's grid, under the
// session's deadlock_timeout dt (ms; 0: not known): one that rounded up
// would reach it takes the grid's step below, so that top's bound is still
// set.
func gridMS(d time.Duration, dt int64) int64 {
	ms := shortDeadlockMS(d)
	if dt > 0 && ms >= dt && ms > shortWaitFloor.Milliseconds() {
		ms /= 2
	}
	return ms
}

// set runs the bound's statements in the attempt's transaction, right
// after BEGIN.
func (s *shortWait) set(ctx context.Context, sqlTx *sql.Tx, d time.Duration, clock Clock) (shortBound, error) {
	if s.deadlockMode {
		return s.setDeadlock(ctx, sqlTx, d)
	}
	var cur string
	if err := sqlTx.QueryRowContext(ctx, shortLockShow).Scan(&cur); err != nil {
		return shortBound{}, &shortWaitError{err: err}
	}
	lt, ok := parsePgMillis(cur)
	if now := clock.Now().UnixNano(); s.deadlock.Load() == 0 || now-s.deadlockRead.Load() >= int64(shortWaitRelearn) {
		var dts string
		if err := sqlTx.QueryRowContext(ctx, shortDeadlockShow).Scan(&dts); err != nil {
			return shortBound{}, &shortWaitError{err: err}
		}
		if dt, ok := parsePgMillis(dts); ok && dt > 0 {
			s.learn(dt)
			s.deadlockRead.Store(now)
		}
	}
	dt := s.deadlock.Load()
	ms := gridMS(d, dt)
	if !ok || (lt > 0 && lt <= ms) || dt <= ms {
		return shortBound{}, nil // the user's lock_timeout (or one that does not parse) stays
	}
	if _, err := sqlTx.ExecContext(ctx, shortLockSet(ms)); err != nil {
		return shortBound{}, &shortWaitError{err: err}
	}
	return shortBound{ms: ms, pre: cur}, nil
}

// setDeadlock is set with short deadlock checks: SHOW, then SET LOCAL when
// the session's deadlock_timeout is longer than the bound (else, or when
// it does not parse, it is the user's: nothing is set). A bound set makes
// a deadlock found in this transaction one the plain driver may have left
// to another transaction of the cycle to find (txAttempt.ownBound).
func (s *shortWait) setDeadlock(ctx context.Context, sqlTx *sql.Tx, d time.Duration) (shortBound, error) {
	var cur string
	if err := sqlTx.QueryRowContext(ctx, shortDeadlockShow).Scan(&cur); err != nil {
		return shortBound{}, &shortWaitError{err: err}
	}
	dt, ok := parsePgMillis(cur)
	if ok {
		s.learn(dt)
	}
	if !ok {
		return shortBound{}, nil
	}
	ms := gridMS(d, dt)
	if dt <= ms {
		return shortBound{}, nil
	}
	if _, err := sqlTx.ExecContext(ctx, shortDeadlockSet(ms)); err != nil {
		return shortBound{}, &shortWaitError{err: err}
	}
	return shortBound{ms: ms, pre: cur}, nil
}

// learn keeps the server's deadlock_timeout (ms) as a bounded attempt read
// it.
func (s *shortWait) learn(dt int64) {
	if dt > 0 && dt != s.deadlock.Load() {
		s.deadlock.Store(dt)
	}
}

// refused says whether the statement's failure is the server's refusal
// (an engine that speaks PostgreSQL's protocol without lock_timeout or
// deadlock_timeout): the feature turns off, and the attempt runs again
// without it, its closure not having run.
func (r *retrier) shortWaitRefused(err error) bool {
	var sw *shortWaitError
	if !errors.As(err, &sw) || staleStatement(err) {
		return false
	}
	switch r.classify(sw.err) {
	case Permanent:
		return true
	}
	return false
}

// roleRefusal takes a refusal of the bound (shortWaitRefused): a 42501
// (the role may not set the setting) is its session's, whose replays then
// run unbounded (conn.boundRefusedAt), and the db goes on; after
// refusalsToPause of them in a row, no bound set between them, the db
// stops asking for a minute, then twice as long each time, up to an hour.
// Any other refusal (an engine without the setting) is the db's, for
// good: false. A session's own SET ROLE to a role that may not (a report
// run under another role, RESET ROLE after) turned short waits off for the
// whole db for good (attack22), also when two sessions did so before the
// db's first bound (attack23); a grant revoked while the db runs had every
// replay refused (attack23).
func (s *shortWait) roleRefusal(err error, clock Clock) bool {
	var sw *shortWaitError
	if !errors.As(err, &sw) || ErrorCode(sw.err) != "42501" {
		return false
	}
	if s.refusals.Add(1) >= refusalsToPause {
		s.refusals.Store(0)
		d := time.Duration(s.pauseFor.Load())
		if d == 0 {
			d = shortWaitRelearn
		}
		s.pausedUntil.Store(clock.Now().Add(d).UnixNano())
		s.pauseFor.Store(int64(min(2*d, time.Hour)))
	}
	return true
}

// refusalsToPause: the refusals in a row that pause the db's bounds
// (roleRefusal).
const refusalsToPause = 4

// paused says whether the db asks for no bound now (roleRefusal).
func (s *shortWait) paused(clock Clock) bool {
	u := s.pausedUntil.Load()
	if u == 0 {
		return false
	}
	if clock.Now().UnixNano() < u {
		return true
	}
	s.pausedUntil.CompareAndSwap(u, 0)
	return false
}

// boundSet notes a bound set: the refusals in a row start again, and so
// does the pause's doubling (a db whose role may set the bound again).
func (s *shortWait) boundSet() {
	if s.refusals.Load() != 0 {
		s.refusals.Store(0)
	}
	if s.pauseFor.Load() != 0 {
		s.pauseFor.Store(0)
	}
}

// staleStatement says whether the bound's statement failed because the
// driver's cached prepared statement of it is gone from the session
// (26000: the closure or an earlier caller ran DEALLOCATE ALL or DISCARD
// ALL on the pooled connection). The server refused nothing: pgx drops
// the cache entry on the error, and the attempt runs again at once without
// the bound, its closure not having run (attack17: it was taken for a
// server without the settings, and short waits turned off for good).
func staleStatement(err error) bool {
	var sw *shortWaitError
	return errors.As(err, &sw) && ErrorCode(sw.err) == "26000"
}
