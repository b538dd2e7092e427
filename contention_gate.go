package sqlretry

import (
	"context"
	"database/sql/driver"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// The database-side queue (WithContentionQueue, PostgreSQL). A limiter
// sees only its own *sql.DB's transactions; several replicas of an
// application, each with its own, conflict with each other however far
// each one cuts (two transfers in opposite directions from two replicas
// deadlock, found after deadlock_timeout, a second). The one thing the
// replicas share is the database, and it has a lock manager: while the
// queue is in use, the replicas take turns at a session advisory lock
// named after the closure (the function's name, the same in every replica
// of one program). A replica holds the lock for a turn (gateTurn) on a
// session of its own, and its attempts of that closure run during its
// turn only, one at a time; when the turn is over it admits no new
// attempt, waits for the one in flight, and gives the lock back, and the
// next replica waiting in the server's queue (first come, first served)
// takes it. So a transaction of the closure meets no other replica's, and
// a turn costs two statements on the side session whatever the number of
// transactions in it. (The first version took the lock on the
// transaction's own connection around each transaction: two more
// statements each, on the transaction's path.)
//
// The lock is held by a session that runs no transaction, and attempts
// wait for their turn before BEGIN, holding nothing: no deadlock cycle
// runs through the queue, and a replay never starts from a snapshot taken
// before its wait. The session is not one of the db's pool, whose
// connections the turn's transactions need. The wait is bounded (gateWait,
// and the caller's context): past it, or on any error of the lock, the
// attempt runs without the queue (it never fails because of it). A
// session whose unlock failed is closed, not used again; a holder whose
// session ends loses the lock with it, and the attempts of its turn then
// meet the next replica's, as without the queue. The queue only orders
// work: correctness is the server's isolation's.
//
// Not on MySQL: with GET_LOCK in place of the advisory lock, the MariaDB
// hot spot (deadlocks found at once, cheap) engaged the queue in some
// replicas only, and these got a third of the others' commits (4×4: 308
// against 1,063-1,122; 8×2: 134 and 155 against 438-473).

// gateWait bounds the wait for a turn; past it the attempt runs without
// the queue: a closure that waits for a RunInTx it started on another
// goroutine (which would wait for the closure's own turn to end) costs
// this, once, and not a deadlock.
const gateWait = 2 * time.Second

// gateBroken is how long attempts run without the queue after the lock
// could not be taken.
const gateBroken = 10 * time.Second

// gateTurn is how long a replica keeps the lock while it has attempts to
// run: long against a transaction (about a millisecond on a local server)
// and the two statements of a handover, short against the wait of the
// replicas behind it.
const gateTurn = 20 * time.Millisecond

// gateName is the name of fn's queue: its function's name, so that every
// replica of one program finds the same one.
func gateName(fn any) string {
	f := runtime.FuncForPC(reflect.ValueOf(fn).Pointer())
	if f == nil {
		return ""
	}
	return f.Name()
}

// gateKey is PostgreSQL's advisory lock key for a queue name: FNV-1a, 64
// bits.
func gateKey(name string) int64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(name); i++ {
		h ^= uint64(name[i])
		h *= 1099511628211
	}
	return int64(h)
}

// serverGate is one replica's place in the queue of one closure.
type serverGate struct {
	lim       *txLimiter
	connector driver.Connector
	dialect   Dialect
	key       int64
	clock     Clock

	mu      sync.Mutex
	state   gateState
	side    driver.Conn // the session that holds the lock, or held it last
	heldAt  time.Time
	active  int // attempts running in this turn: at most one
	waiters []*gateWaiter
	turns   int64 // turns taken, for tests
	// brokenUntil: the last take failed; until then attempts run without
	// the queue.
	brokenUntil time.Time

	probing  atomic.Bool
	probedAt atomic.Int64 // unix ns
}

type gateState int

const (
	gateFree    gateState = iota // the lock is not ours
	gateTaking                   // a goroutine is taking it
	gateHeld                     // ours: attempts enter
	gateClosing                  // ours, the turn is over: no attempt enters, it goes back when the last leaves
)

type gateWaiter struct {
	ready chan struct{}
	in    bool // admitted to a turn (else: run without the queue)
}

// gate returns the queue for the closure named name, whose sessions
// connector opens; nil: none (no name, or not PostgreSQL).
func (l *txLimiter) gate(connector driver.Connector, dialect Dialect, name string) *serverGate {
	if name == "" || dialect != DialectPostgres {
		return nil
	}
	if g, ok := l.gates.Load(name); ok {
		return g.(*serverGate)
	}
	g, _ := l.gates.LoadOrStore(name, &serverGate{lim: l, connector: connector, dialect: dialect, key: gateKey(name), clock: l.clock})
	return g.(*serverGate)
}

// enter waits for the replica's turn; false: run without the queue (the
// wait passed gateWait, ctx ended, the lock failed, or the caller runs
// inside another attempt of this db). After true, leave must be called
// once the attempt has ended.
func (g *serverGate) enter(ctx context.Context) bool {
	g.mu.Lock()
	if g.state == gateFree && g.clock.Now().Before(g.brokenUntil) {
		g.mu.Unlock()
		return false
	}
	if g.state == gateHeld {
		if g.clock.Now().Sub(g.heldAt) >= gateTurn {
			g.state = gateClosing
		} else if g.active == 0 && len(g.waiters) == 0 {
			g.active++
			g.mu.Unlock()
			return true
		}
	}
	if nestedInAttempt() {
		// Its outer may be in the turn that must end before the next:
		// waiting would hold the turn until gateWait.
		g.mu.Unlock()
		return false
	}
	w := &gateWaiter{ready: make(chan struct{})}
	g.waiters = append(g.waiters, w)
	switch g.state {
	case gateFree:
		g.state = gateTaking
		go g.take()
	case gateClosing:
		g.handOverLocked() // when the turn ended with nothing in it
	}
	g.mu.Unlock()
	t := time.NewTimer(gateWait)
	defer t.Stop()
	select {
	case <-w.ready:
		return w.in
	case <-ctx.Done():
	case <-t.C:
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-w.ready: // admitted meanwhile: leave the turn at once
		if w.in {
			g.leaveLocked()
		}
	default:
		for i, x := range g.waiters {
			if x == w {
				g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
				break
			}
		}
	}
	return false
}

// leave ends an attempt of the turn.
func (g *serverGate) leave() {
	g.mu.Lock()
	g.leaveLocked()
	g.mu.Unlock()
}

func (g *serverGate) leaveLocked() {
	g.active--
	if g.state == gateHeld && g.clock.Now().Sub(g.heldAt) >= gateTurn {
		g.state = gateClosing
	}
	g.admitLocked()
	g.handOverLocked()
}

// admitLocked lets the next waiter into the turn when none runs. One at a
// time: the queue is used on a hot spot, where the closure's transactions
// would collide with each other, and the one in a turn runs without
// meeting another replica's (chaos replicas, PostgreSQL, 1×16: 1,394-1,604
// transactions/s against 30-920 for sqlretry's defaults and 638-1,452
// for the backoff loop in the same runs).
func (g *serverGate) admitLocked() {
	for g.state == gateHeld && g.active == 0 && len(g.waiters) > 0 {
		w := g.waiters[0]
		g.waiters = g.waiters[1:]
		w.in = true
		g.active++
		close(w.ready)
	}
}

// handOverLocked gives the lock back when the turn is over and its last
// attempt has ended, and queues again for the attempts that wait.
func (g *serverGate) handOverLocked() {
	if g.state != gateClosing || g.active > 0 {
		return
	}
	again := len(g.waiters) > 0
	if again {
		g.state = gateTaking
	} else {
		g.state = gateFree
	}
	conn := g.side
	if !again {
		g.side = nil // closed after the unlock: the queue is idle
	}
	go func() {
		g.unlock(conn, again)
		if again {
			g.take()
		}
	}()
}

// expire ends a turn that nobody uses: a replica with no attempt in
// flight must not keep the others out.
func (g *serverGate) expire(turn int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.turns == turn && g.state == gateHeld {
		g.state = gateClosing
		g.handOverLocked()
	}
}

// take queues for the lock in the server on a session of its own and
// admits the waiters when it has it, or sends them on without the queue.
// The session is not one of the db's pool: it would take a connection the
// turn's transactions need (with SetMaxOpenConns(1), the only one).
func (g *serverGate) take() {
	ctx, cancel := context.WithTimeout(context.Background(), gateWait)
	g.mu.Lock()
	conn := g.side
	g.mu.Unlock()
	var err error
	if conn == nil {
		conn, err = g.connector.Connect(ctx)
	}
	if err == nil {
		if err = g.lock(ctx, conn); err != nil {
			conn.Close() // a lock whose wait was cancelled may still be granted
		}
	}
	cancel()
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		// A lock not granted within gateWait: its holder hangs (a replica
		// whose host vanished keeps its session, and the lock, until the
		// server's TCP keepalive notices). Attempts do not wait for it
		// again for a while; they run without the queue.
		g.side, g.state = nil, gateFree
		g.brokenUntil = g.clock.Now().Add(gateBroken)
		for _, w := range g.waiters {
			close(w.ready)
		}
		g.waiters = nil
		return
	}
	g.side, g.state, g.heldAt = conn, gateHeld, g.clock.Now()
	g.turns++
	turn := g.turns
	g.admitLocked()
	if g.active == 0 { // every waiter gave up meanwhile
		g.state = gateClosing
		g.handOverLocked()
		return
	}
	time.AfterFunc(gateTurn, func() { g.expire(turn) })
}

// lock takes the lock on conn, waiting at most until ctx ends.
func (g *serverGate) lock(ctx context.Context, conn driver.Conn) error {
	return execConn(ctx, conn, "SELECT pg_catalog.pg_advisory_lock($1)", g.key)
}

// unlock gives the lock back; the session is kept for the next turn when
// keep says so, else closed. A session whose unlock failed is closed: it
// may still hold the lock. The same statement asks whether another session
// holds or waits for the lock (whether it is read before or after the
// release, the next replica in line is seen): then the replicas use the
// queue, and this one stays in it (see stay).
func (g *serverGate) unlock(conn driver.Conn, keep bool) {
	ctx, cancel := context.WithTimeout(context.Background(), gateWait)
	defer cancel()
	hi, lo := g.lockID()
	vals, err := queryRow(ctx, conn, "SELECT pg_catalog.pg_advisory_unlock($1), "+gateOthers, g.key, hi, lo)
	if err != nil || !isTrue(vals[0]) || !keep {
		conn.Close()
		g.mu.Lock()
		if g.side == conn {
			g.side = nil
		}
		g.mu.Unlock()
	}
	if err == nil && len(vals) > 1 && isTrue(vals[1]) {
		g.stay()
	}
}

// gateOthers says whether a session other than this one holds or waits for
// the advisory lock of key ($2 its high 32 bits, $3 its low ones, as
// pg_locks shows a bigint key) in this database.
const gateOthers = `EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND classid::bigint = $2 AND objid::bigint = $3 AND objsubid = 1 ` +
	`AND pid <> pg_catalog.pg_backend_pid() AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))`

func (g *serverGate) lockID() (hi, lo int64) {
	return int64(uint64(g.key) >> 32), int64(uint64(g.key) & 0xffffffff)
}

// gateStick is how long after its own last conflict a replica stays in the
// queue because other replicas use it. While all of them queue, none
// conflicts, and each would otherwise leave gateMemory after its last
// conflict and run past the others (TestPostgresReplicasHotSpotQueue: one
// replica committed 349 and 502 transactions, the three others 32-118);
// once a closure stops conflicting, they leave after this.
const gateStick = 30 * time.Second

// stay keeps the db in the queue that other replicas use, for a while
// after its last conflict.
func (g *serverGate) stay() {
	now := g.clock.Now()
	if now.UnixNano()-g.lim.gateReason.Load() < int64(gateStick) {
		g.lim.joinGate(now, false)
	}
}

// probeDue says whether an attempt that ran outside the queue looks
// whether other replicas use it: after a conflict, and for gateStick after
// the db's last one, commits too. A replica outside the queue runs past
// those in it and collides with the transactions of their turns, and it
// may be the one that wins every collision (the replicas in the queue
// abort): then it sees no conflict of its own, and only its commits would
// tell it to join (chaos replicas 4×4: two replicas committed 1,279 and
// 1,302 transactions, the two others 327 and 308).
func (l *txLimiter) probeDue(conflict bool) bool {
	now := l.clock.Now().UnixNano()
	if conflict {
		l.lastConflict.Store(now)
		return true
	}
	return now-l.lastConflict.Load() < int64(gateStick)
}

// probe follows an attempt that ran outside the queue (probeDue): when
// another replica uses the queue, this one joins it. Its own limiter may
// never engage (its conflicts look rare or lone). At most one probe at a
// time, and one per gateProbeEvery.
func (g *serverGate) probe() {
	now := g.clock.Now().UnixNano()
	if now-g.probedAt.Load() < int64(gateProbeEvery) || !g.probing.CompareAndSwap(false, true) {
		return
	}
	g.probedAt.Store(now)
	go func() {
		defer g.probing.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), gateWait)
		defer cancel()
		conn, err := g.connector.Connect(ctx)
		if err != nil {
			return
		}
		defer conn.Close()
		hi, lo := g.lockID()
		vals, err := queryRow(ctx, conn, "SELECT $1::bigint, "+gateOthers, g.key, hi, lo)
		if err == nil && len(vals) > 1 && isTrue(vals[1]) {
			g.lim.joinGate(g.clock.Now(), true)
		}
	}()
}

// gateProbeEvery spaces the probes of one queue: each opens a session.
const gateProbeEvery = 250 * time.Millisecond

// isTrue reads a boolean result.
func isTrue(v driver.Value) bool {
	b, err := driver.Bool.ConvertValue(v)
	t, ok := b.(bool)
	return err == nil && ok && t
}
