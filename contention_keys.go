package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Contention control that knows which transactions conflict (PostgreSQL).
// For a while after a conflict (keysMemory), each RunInTx attempt of the
// db records the keys its writing statements name: the values of the
// arguments after WHERE ($n), with the table's name, as a hash. (A guess
// at the rows a statement locks: it is used only to order and to cut work
// short, never to decide whether work is correct; that stays the server's
// isolation's.) With the keys of the transactions in flight known, two
// rules:
//
//   - A write foreseen to fail is refused before it is sent, with a
//     deadlock (40P01) of sqlretry's own, replayed like the server's: a
//     write that would wait for a transaction of this db that waits,
//     directly or through others, for this one (a deadlock the server finds
//     only after deadlock_timeout, a second by default), or a write, in a
//     REPEATABLE READ or SERIALIZABLE transaction, to a key another running
//     transaction of the db wrote (PostgreSQL fails it as a concurrent
//     update when the other commits, after waiting for it).
//   - A replay whose last attempt conflicted, once it has the limiter's
//     slot, waits before BEGIN until no transaction in flight holds a key
//     that attempt named (oldest first), and holds those keys from then
//     on. It never waits longer than keyWait, past its context's end, or
//     inside another attempt (a nested RunInTx); then it runs as it would
//     have.
//
// Refusing holds nothing and waits for nothing; the wait is before BEGIN,
// holding no connection and no lock, and for transactions that wait for
// nothing of this process. (Replays let in by their keys outside the
// limiter's slots were tried: in one process they kept the limiter's
// "alone and still conflicting" rule from letting go, but with four
// replicas that rule is what keeps them fair, and
// TestPostgresReplicasHotSpot failed 4 runs in 10 with them, 0 in 5
// without.)

// keysMemory is how long after a conflict the attempts record their keys.
const keysMemory = 5 * time.Second

// keyWait bounds a replay's wait for its keys.
const keyWait = time.Second

// runAttemptKeyed is runAttempt while the db records its attempts' keys
// (after a conflict), or for a replay whose last attempt's keys are known:
// with its slot, the replay waits for its keys (admitReplay); the
// attempt's statements see its keys through its context (tx.keyed). Kept
// apart so that runAttempt's way, when nothing conflicts, costs nothing
// more.
func (r *retrier) runAttemptKeyed(ctx context.Context, o *txOutcome, lim *txLimiter, db *sql.DB, txOpts *sql.TxOptions,
	fn func(context.Context, *sql.Tx) error, sees, conflicted bool, lockWait time.Duration, prevKeys *txKeys) (werr error) {
	slot, werr := lim.acquire(ctx)
	if werr != nil {
		return werr
	}
	var keys *txKeys
	if prevKeys != nil {
		keys = lim.keys.admitReplay(ctx, prevKeys.all(), txOpts)
	}
	if keys == nil {
		keys = r.recordKeys(lim, txOpts)
	}
	if keys != nil {
		defer lim.keys.end(keys) // also when fn panics
	}
	defer func() {
		var took time.Duration
		if !o.began.IsZero() {
			took = since(r.clock, o.began)
		}
		if lockWait > 0 && o.conflict {
			took = r.shortWait.conflictCost(took, true, o.cause) // shortwait.go
		}
		lim.release(slot, o.conflict && !conflicted, o.err == nil && o.phase == phaseCommit, took)
	}()
	queue := sees && r.cfg.contentionQueue
	var g *serverGate
	if queue && slot.gated {
		g = lim.gate(r.inner, r.dialect, gateName(fn))
	}
	inGate := g != nil && g.enter(ctx)
	if inGate {
		defer g.leave()
	}
	attCtx := ctx
	if keys != nil {
		attCtx = &keyedCtx{Context: ctx, keys: keys}
	}
	att := &txAttempt{Context: attCtx}
	o.began, o.phase, o.err = runTxOnce(att, db, txOpts, fn, r.clock, r.shortWait, lockWait)
	if lockWait > 0 && o.err != nil && ctx.Err() == nil && r.shortWaitRefused(o.err) {
		// The server does not know the settings (shortwait.go): off for
		// good, and the attempt again without it (its closure did not run).
		r.shortWait.off.Store(true)
		att = &txAttempt{Context: attCtx}
		o.began, o.phase, o.err = runTxOnce(att, db, txOpts, fn, r.clock, nil, 0)
	}
	if o.err != nil {
		r.decide(o, att, sees)
		o.conflict = ctx.Err() == nil && o.replay && r.isConflict(o.cause, o.cls)
	}
	r.endKeys(lim, keys, o)
	if queue && !inGate && lim.probeDue(o.conflict) {
		if g == nil {
			g = lim.gate(r.inner, r.dialect, gateName(fn))
		}
		if g != nil {
			g.probe()
		}
	}
	return nil
}

// recordKeys registers an attempt's keys when the db records them
// (PostgreSQL, after a conflict); nil otherwise.
func (r *retrier) recordKeys(lim *txLimiter, txOpts *sql.TxOptions) *txKeys {
	if r.dialect != DialectPostgres {
		return nil
	}
	if !lim.keys.recording(lim.clock.Now()) {
		lim.keys.on.Store(false)
		return nil
	}
	return lim.keys.start(txOpts)
}

// endKeys unregisters an attempt's keys; a conflict keeps the db recording
// (PostgreSQL), and gives the replay the keys to wait for.
func (r *retrier) endKeys(lim *txLimiter, keys *txKeys, o *txOutcome) {
	if keys != nil {
		lim.keys.end(keys)
		if o.conflict {
			o.keys = keys
		}
	}
	if o.conflict && r.dialect == DialectPostgres {
		lim.keys.conflicted(lim.clock.Now())
	}
}

// keyRegistry is the keys of a db's attempts in flight (txLimiter.keys).
type keyRegistry struct {
	on      atomic.Bool  // until may be in the future
	until   atomic.Int64 // unix ns: record keys until then
	refused atomic.Int64 // writes refused (foreseen deadlocks or failures)
	keyed   atomic.Int64 // replays admitted by their keys

	mu      sync.Mutex
	running map[*txKeys]struct{}
	waiters []*keyWaiter
}

// txKeys is one attempt's keys.
type txKeys struct {
	reg      *keyRegistry
	doomable bool // REPEATABLE READ or SERIALIZABLE: a write after another's on one row fails

	// Under reg.mu:
	held     []uint64 // keys its writes named (sent)
	inflight []uint64 // keys of the write in flight
	refused  []uint64 // keys of the write refused (for the replay's wait)
	ended    bool
}

type keyWaiter struct {
	keys  []uint64
	k     *txKeys // the replay's record, registered when it is let in
	ready chan struct{}
}

// keyedCtx is an attempt's context while it records its keys: the tx finds
// them through its txAttempt without a context lookup.
type keyedCtx struct {
	context.Context
	keys *txKeys
}

// recording says whether attempts record their keys now.
func (g *keyRegistry) recording(now time.Time) bool {
	u := g.until.Load()
	return u != 0 && now.UnixNano() < u
}

// conflicted notes a conflict: attempts record their keys for keysMemory.
func (g *keyRegistry) conflicted(now time.Time) {
	g.until.Store(now.Add(keysMemory).UnixNano())
	g.on.Store(true)
}

// start registers an attempt about to begin.
func (g *keyRegistry) start(txOpts *sql.TxOptions) *txKeys {
	k := newTxKeys(g, txOpts)
	g.mu.Lock()
	g.holdLocked(k, nil)
	g.mu.Unlock()
	return k
}

func newTxKeys(g *keyRegistry, txOpts *sql.TxOptions) *txKeys {
	k := &txKeys{reg: g}
	if txOpts != nil {
		switch txOpts.Isolation {
		case sql.LevelRepeatableRead, sql.LevelSnapshot, sql.LevelSerializable, sql.LevelLinearizable:
			k.doomable = true
		}
	}
	return k
}

// end unregisters an attempt and admits the replays its keys held back;
// false: it had ended already.
func (g *keyRegistry) end(k *txKeys) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if k.ended {
		return false
	}
	delete(g.running, k)
	k.ended, k.inflight = true, nil
	g.admitLocked()
	return true
}

// admitLocked wakes the waiters whose keys no running attempt holds and
// no waiter before them wants, oldest first; each holds its keys from then.
func (g *keyRegistry) admitLocked() {
	var kept []*keyWaiter
	for _, w := range g.waiters {
		if g.busyLocked(w.keys, nil) || overlapsAny(kept, w.keys) {
			kept = append(kept, w)
			continue
		}
		g.holdLocked(w.k, w.keys)
		close(w.ready)
	}
	g.waiters = kept
}

func overlapsAny(ws []*keyWaiter, keys []uint64) bool {
	for _, w := range ws {
		if overlaps(w.keys, keys) {
			return true
		}
	}
	return false
}

// busyLocked says whether a running attempt other than self holds or is
// writing one of keys.
func (g *keyRegistry) busyLocked(keys []uint64, self *txKeys) bool {
	for o := range g.running {
		if o != self && (overlaps(o.held, keys) || overlaps(o.inflight, keys)) {
			return true
		}
	}
	return false
}

// admitReplay waits until none of the keys of a replay's last attempt is
// held by an attempt in flight (or wanted by a replay that waited longer),
// and returns the replay's record, registered as holding them: from then
// on a write of another attempt to one of them is refused as if the replay
// had written it, and replays that want them wait. nil: it did not (keyWait
// passed, ctx ended, or the caller runs inside another attempt), and the
// replay takes the limiter's way.
func (g *keyRegistry) admitReplay(ctx context.Context, keys []uint64, txOpts *sql.TxOptions) *txKeys {
	if len(keys) == 0 {
		return nil
	}
	k := newTxKeys(g, txOpts)
	g.mu.Lock()
	if !g.busyLocked(keys, nil) && !g.wantedLocked(keys, nil) {
		g.holdLocked(k, keys)
		g.mu.Unlock()
		g.keyed.Add(1)
		return k
	}
	if nestedInAttempt() {
		g.mu.Unlock()
		return nil
	}
	w := &keyWaiter{keys: keys, k: k, ready: make(chan struct{})}
	g.waiters = append(g.waiters, w)
	g.mu.Unlock()
	t := time.NewTimer(keyWait)
	defer t.Stop()
	select {
	case <-w.ready:
		g.keyed.Add(1)
		return k
	case <-ctx.Done():
	case <-t.C:
	}
	g.mu.Lock()
	select {
	case <-w.ready: // admitted meanwhile: its keys go back
		g.mu.Unlock()
		g.end(k)
		return nil
	default:
	}
	for i, x := range g.waiters {
		if x == w {
			g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
			break
		}
	}
	g.admitLocked() // the ones behind it may go now
	g.mu.Unlock()
	return nil
}

// wantedLocked says whether a waiter before w (all of them when w is nil)
// wants one of keys.
func (g *keyRegistry) wantedLocked(keys []uint64, w *keyWaiter) bool {
	for _, x := range g.waiters {
		if x == w {
			return false
		}
		if overlaps(x.keys, keys) {
			return true
		}
	}
	return false
}

// holdLocked registers k as running and holding keys.
func (g *keyRegistry) holdLocked(k *txKeys, keys []uint64) {
	if g.running == nil {
		g.running = map[*txKeys]struct{}{}
	}
	k.held = append(k.held, keys...)
	g.running[k] = struct{}{}
}

// all is every key the attempt named, for its replay.
func (k *txKeys) all() []uint64 {
	k.reg.mu.Lock()
	defer k.reg.mu.Unlock()
	return append(append(append([]uint64(nil), k.held...), k.inflight...), k.refused...)
}

// errForeseen is the error of a write refused before it was sent.
type errForeseen struct{ why string }

func (e *errForeseen) Error() string {
	return "sqlretry: write not sent: " + e.why + " (SQLSTATE 40P01)"
}

// SQLState makes it a deadlock to classify: replayed, counted as a conflict.
func (e *errForeseen) SQLState() string { return "40P01" }

// before is called before a statement of the attempt is sent: it refuses a
// write foreseen to fail, and marks the keys of the one it lets go.
func (k *txKeys) before(read bool, query string, args []driver.NamedValue) error {
	if read {
		return nil
	}
	keys := statementKeys(query, args)
	if len(keys) == 0 {
		return nil
	}
	g := k.reg
	g.mu.Lock()
	defer g.mu.Unlock()
	for o := range g.running {
		if o == k {
			continue
		}
		if k.doomable && overlaps(o.inflight, keys) {
			// Both write it at once: the second to lock it fails when
			// the first commits.
			g.refused.Add(1)
			k.refused = keys
			return &errForeseen{"another transaction of this process in flight is writing the same key; one of them would fail"}
		}
		if !overlaps(o.held, keys) {
			continue
		}
		// k would wait for o.
		if k.doomable {
			g.refused.Add(1)
			k.refused = keys
			return &errForeseen{"another transaction of this process in flight wrote the same key; this one would fail when it commits"}
		}
		if g.waitsForLocked(o, k, map[*txKeys]bool{}) {
			g.refused.Add(1)
			k.refused = keys
			return &errForeseen{"it would close a deadlock with other transactions of this process"}
		}
	}
	k.inflight = keys
	return nil
}

// after is called when the statement let go by before has returned.
func (k *txKeys) after() {
	g := k.reg
	g.mu.Lock()
	if !k.ended && k.inflight != nil {
		k.held = append(k.held, k.inflight...)
		k.inflight = nil
	}
	g.mu.Unlock()
}

// waitsForLocked says whether from waits, through the writes in flight,
// for to: from's write in flight names a key held by an attempt that is
// to or waits for it. Each attempt is looked at once (seen), so the search
// costs at most the square of the attempts in flight.
func (g *keyRegistry) waitsForLocked(from, to *txKeys, seen map[*txKeys]bool) bool {
	if len(from.inflight) == 0 || seen[from] {
		return false
	}
	seen[from] = true
	for o := range g.running {
		if o == from || !overlaps(o.held, from.inflight) {
			continue
		}
		if o == to || g.waitsForLocked(o, to, seen) {
			return true
		}
	}
	return false
}

func overlaps(a, b []uint64) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

// statementKeys guesses the keys a writing statement locks: each argument
// named ($n) after the statement's WHERE, hashed with the table's name.
// None when there is no WHERE or no argument there.
func statementKeys(query string, args []driver.NamedValue) []uint64 {
	w := indexWord(query, "WHERE")
	if w < 0 {
		return nil
	}
	table := tableOf(query[:w])
	var keys []uint64
	q := query[w:]
	for i := 0; i < len(q); i++ {
		if q[i] != '$' {
			continue
		}
		n, j := 0, i+1
		for j < len(q) && q[j] >= '0' && q[j] <= '9' {
			n = 10*n + int(q[j]-'0')
			j++
		}
		i = j - 1
		if n == 0 {
			continue
		}
		for _, a := range args {
			if a.Ordinal == n {
				if h, ok := hashValue(table, a.Value); ok {
					keys = append(keys, h)
				}
				break
			}
		}
	}
	return keys
}

// tableOf is the word after UPDATE, or after the first FROM, in the text
// of a statement before its WHERE.
func tableOf(s string) string {
	t := strings.TrimSpace(s)
	i := -1
	if len(t) >= 6 && strings.EqualFold(t[:6], "UPDATE") {
		i = 6
	} else if f := indexWord(t, "FROM"); f >= 0 {
		i = f + 4
	}
	if i < 0 {
		return ""
	}
	f := strings.Fields(t[i:])
	if len(f) == 0 {
		return ""
	}
	return strings.ToLower(f[0])
}

// indexWord is the index of the first occurrence of word (upper case) in s
// as a whole word, case-insensitively; -1 if none.
func indexWord(s, word string) int {
	n := len(word)
	for i := 0; i+n <= len(s); i++ {
		if !strings.EqualFold(s[i:i+n], word) {
			continue
		}
		if (i == 0 || !isWordByte(s[i-1])) && (i+n == len(s) || !isWordByte(s[i+n])) {
			return i
		}
	}
	return -1
}

func isWordByte(b byte) bool {
	return b == '_' || b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
}

// hashValue hashes a table's name and an argument's value (FNV-1a).
func hashValue(table string, v any) (uint64, bool) {
	h := uint64(14695981039346656037)
	add := func(b byte) { h ^= uint64(b); h *= 1099511628211 }
	for i := 0; i < len(table); i++ {
		add(table[i])
	}
	add(0)
	var u uint64
	switch x := v.(type) {
	case int64:
		add('i')
		u = uint64(x)
	case int:
		add('i')
		u = uint64(int64(x))
	case int32:
		add('i')
		u = uint64(int64(x))
	case int16:
		add('i')
		u = uint64(int64(x))
	case uint32:
		add('i')
		u = uint64(x)
	case uint64:
		add('i')
		u = x
	case float64:
		add('f')
		u = math.Float64bits(x)
	case bool:
		add('b')
		if x {
			u = 1
		}
	case string:
		add('s')
		for i := 0; i < len(x); i++ {
			add(x[i])
		}
		return h, true
	case []byte:
		add('s')
		for _, c := range x {
			add(c)
		}
		return h, true
	default:
		return 0, false
	}
	for i := 0; i < 8; i++ {
		add(byte(u >> (8 * i)))
	}
	return h, true
}

// keyed is the attempt's keys while it records them; nil otherwise (one
// comparison on the way of every statement in a transaction).
func (t *tx) keyed() *txKeys {
	if a := t.attempt; a != nil {
		if kc, ok := a.Context.(*keyedCtx); ok {
			return kc.keys
		}
	}
	return nil
}
