package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

func args(vs ...any) []driver.NamedValue {
	nv := make([]driver.NamedValue, len(vs))
	for i, v := range vs {
		nv[i] = driver.NamedValue{Ordinal: i + 1, Value: v}
	}
	return nv
}

const (
	debit  = "UPDATE acct SET balance = balance - $1 WHERE id = $2"
	credit = "UPDATE acct SET balance = balance + $1 WHERE id = $2"
)

// A write's keys are the arguments after its WHERE, with its table: the
// amount in SET is not one, and one id in two tables is two keys.
func TestKeysOfAStatement(t *testing.T) {
	a := statementKeys(debit, args(int64(5), int64(3)))
	b := statementKeys(credit, args(int64(3), int64(3)))
	c := statementKeys(credit, args(int64(5), int64(4)))
	if len(a) != 1 || len(b) != 1 || a[0] != b[0] {
		t.Fatalf("the row id=3 of acct: keys %v and %v, want one, the same", a, b)
	}
	if overlaps(a, c) {
		t.Error("id 3 and id 4 share a key (the amount 5 counted?)")
	}
	if overlaps(a, statementKeys("UPDATE other SET x = 1 WHERE id = $1", args(int64(3)))) {
		t.Error("id 3 of two tables share a key")
	}
	if overlaps(a, statementKeys("delete FROM acct where id = $1", args(3))) == false {
		t.Error("DELETE FROM acct ... id = 3 (an int) is not acct's row 3")
	}
	if k := statementKeys("INSERT INTO ledger VALUES ($1, $2)", args("op", int64(3))); len(k) != 0 {
		t.Errorf("an INSERT has keys %v, want none (no WHERE)", k)
	}
}

func running(g *keyRegistry, doomable bool, held ...uint64) *txKeys {
	k := g.start(nil)
	k.doomable = doomable
	k.held = held
	return k
}

// A write that would close a wait cycle among the db's transactions is
// refused at once, with a deadlock of sqlretry's own (replayed and counted
// as a conflict), instead of being sent and found after deadlock_timeout.
// Without the cycle it goes.
func TestKeysForeseenDeadlockIsRefused(t *testing.T) {
	var g keyRegistry
	ka := statementKeys(debit, args(int64(1), int64(1)))
	kb := statementKeys(debit, args(int64(1), int64(2)))
	t1 := running(&g, false, ka...)
	t2 := running(&g, false, kb...)
	if err := t2.before(false, debit, args(int64(1), int64(1))); err != nil {
		t.Fatalf("t1 waits for nothing: %v", err)
	}
	t2.after() // t2 now holds a and b (it waited for t1 in the server)
	// t1 writes b, held by t2, which holds what t1 holds: a cycle only
	// if t2 waits; it has no write in flight.
	if err := t1.before(false, debit, args(int64(1), int64(2))); err != nil {
		t.Fatalf("no cycle: %v", err)
	}
	t1.after()
	g.end(t1)
	g.end(t2)

	t1 = running(&g, false, ka...)
	t2 = running(&g, false, kb...)
	if err := t1.before(false, debit, args(int64(1), int64(2))); err != nil { // t1 waits for t2 in the server
		t.Fatal(err)
	}
	err := t2.before(false, credit, args(int64(1), int64(1)))
	var pg interface{ SQLState() string }
	if !errors.As(err, &pg) || pg.SQLState() != "40P01" {
		t.Fatalf("t2 closes the cycle: err %v, want sqlretry's 40P01", err)
	}
	if c := classify(nil, err); c != RetryTransaction {
		t.Errorf("the refusal classifies as %v, want RetryTransaction", c)
	}
	if !overlaps(t2.all(), ka) {
		t.Error("the replay's keys miss the refused write's")
	}
}

// In REPEATABLE READ or SERIALIZABLE, a write to a row another running
// transaction of the db wrote fails when that one commits: it is refused
// before it waits. In READ COMMITTED it goes (it waits, then writes).
func TestKeysWriteAfterAnothersIsRefusedWhenItWouldFail(t *testing.T) {
	var g keyRegistry
	ka := statementKeys(debit, args(int64(1), int64(1)))
	running(&g, false, ka...)
	rc := running(&g, false)
	if err := rc.before(false, debit, args(int64(9), int64(1))); err != nil {
		t.Errorf("READ COMMITTED: %v", err)
	}
	ser := g.start(&sql.TxOptions{Isolation: sql.LevelSerializable})
	if err := ser.before(false, debit, args(int64(9), int64(1))); err == nil {
		t.Error("SERIALIZABLE write after another's to id 1 was let go")
	}
	if err := ser.before(false, debit, args(int64(9), int64(7))); err != nil {
		t.Errorf("SERIALIZABLE write to a free row: %v", err)
	}
	if err := ser.before(true, debit, args(int64(9), int64(1))); err != nil {
		t.Errorf("a read is never refused: %v", err)
	}
	if n := g.refused.Load(); n != 1 {
		t.Errorf("refused %d, want 1", n)
	}
}

// A replay waits before BEGIN until no attempt in flight holds its keys,
// and goes at once when none does.
func TestKeysReplayWaitsForItsKeys(t *testing.T) {
	var g keyRegistry
	ka := statementKeys(debit, args(int64(1), int64(1)))
	kb := statementKeys(debit, args(int64(1), int64(2)))
	holder := running(&g, false, ka...)
	if g.admitReplay(context.Background(), kb, nil) == nil {
		t.Fatal("a replay whose keys are free waited")
	}
	done := make(chan bool)
	go func() { done <- g.admitReplay(context.Background(), ka, nil) != nil }()
	select {
	case <-done:
		t.Fatal("a replay whose key is held did not wait")
	case <-time.After(50 * time.Millisecond):
	}
	g.end(holder)
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("not admitted when the holder ended")
		}
	case <-time.After(time.Second):
		t.Fatal("still waiting after the holder ended")
	}
}

// The wait never holds a caller past its context, nor past keyWait, nor
// inside another attempt (a nested RunInTx with a context of its own).
func TestKeysReplayWaitIsBounded(t *testing.T) {
	var g keyRegistry
	ka := statementKeys(debit, args(int64(1), int64(1)))
	running(&g, false, ka...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if g.admitReplay(ctx, ka, nil) != nil {
		t.Error("admitted while the key is held")
	}
	start := time.Now()
	if g.admitReplay(context.Background(), ka, nil) != nil {
		t.Error("admitted while the key is held")
	}
	if el := time.Since(start); el < keyWait || el > keyWait+time.Second {
		t.Errorf("waited %v, want keyWait (%v)", el, keyWait)
	}
	if len(g.waiters) != 0 {
		t.Errorf("%d waiters left behind", len(g.waiters))
	}
	db, _ := testDB(t, newFakeServer())
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		start := time.Now()
		if g.admitReplay(context.Background(), ka, nil) != nil {
			t.Error("admitted while the key is held")
		}
		if el := time.Since(start); el > keyWait/2 {
			t.Errorf("a replay inside another attempt waited %v", el)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Through RunInTx on PostgreSQL: no key is recorded until a conflict (a
// statement's way is one comparison); after one, a SERIALIZABLE attempt
// whose write follows another running attempt's on the same row is
// refused, replayed once the other has ended, and commits.
func TestKeysThroughRunInTx(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv)
	l := retrierOf(db).txLimit
	transfer := func(id int64) func(context.Context, *sql.Tx) error {
		return func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, debit, int64(1), id)
			return err
		}
	}
	ser := &sql.TxOptions{Isolation: sql.LevelSerializable}
	if err := RunInTx(context.Background(), db, ser, transfer(1)); err != nil {
		t.Fatal(err)
	}
	if l.keys.on.Load() || len(l.keys.running) != 0 {
		t.Fatal("keys recorded before any conflict")
	}
	srv.script(debit, step{err: &pgError{code: "40001", msg: "could not serialize access"}})
	if err := RunInTx(context.Background(), db, ser, transfer(1)); err != nil {
		t.Fatal(err)
	}
	if !l.keys.recording(clock.Now()) {
		t.Fatal("a conflict did not turn the keys on")
	}
	other := running(&l.keys, true, statementKeys(debit, args(int64(1), int64(1)))...)
	go func() {
		time.Sleep(50 * time.Millisecond)
		l.keys.end(other)
	}()
	before := srv.ranCount(debit)
	start := time.Now()
	if err := RunInTx(context.Background(), db, ser, transfer(1)); err != nil {
		t.Fatal(err)
	}
	if n := l.keys.refused.Load(); n != 1 {
		t.Errorf("refused %d writes, want 1", n)
	}
	if n := l.keys.keyed.Load(); n != 1 {
		t.Errorf("%d replays admitted by their keys, want 1", n)
	}
	if el := time.Since(start); el < 40*time.Millisecond {
		t.Errorf("the replay did not wait for the other (%v)", el)
	}
	if n := srv.ranCount(debit) - before; n != 1 {
		t.Errorf("the write committed %d times, want 1", n)
	}
	clock.Advance(keysMemory + time.Second)
	if err := RunInTx(context.Background(), db, ser, transfer(1)); err != nil {
		t.Fatal(err)
	}
	if l.keys.on.Load() {
		t.Error("keys still recorded keysMemory after the last conflict")
	}
}

// A replay let in holds its keys from then on: another attempt's write to
// one of them is refused in SERIALIZABLE, and a replay that wants one
// waits. Two replays waiting for one key go one after the other, oldest
// first.
func TestKeysReplaysGoOneAfterTheOtherOldestFirst(t *testing.T) {
	var g keyRegistry
	ka := statementKeys(debit, args(int64(1), int64(1)))
	first := g.admitReplay(context.Background(), ka, nil)
	if first == nil {
		t.Fatal("not let in")
	}
	ser := g.start(&sql.TxOptions{Isolation: sql.LevelSerializable})
	if err := ser.before(false, credit, args(int64(2), int64(1))); err == nil {
		t.Error("a write to a key a running replay holds was let go")
	}
	g.end(ser)
	order := make(chan int, 2)
	for i := 1; i <= 2; i++ {
		go func() {
			if k := g.admitReplay(context.Background(), ka, nil); k != nil {
				order <- i
				time.Sleep(20 * time.Millisecond)
				g.end(k)
			}
		}()
		for end := time.Now().Add(time.Second); ; time.Sleep(time.Millisecond) {
			g.mu.Lock()
			n := len(g.waiters)
			g.mu.Unlock()
			if n == i || time.Now().After(end) {
				break
			}
		}
	}
	g.end(first)
	if a, b := <-order, <-order; a != 1 || b != 2 {
		t.Errorf("let in %d then %d, want 1 then 2", a, b)
	}
}

// Two SERIALIZABLE writes to one row at once: the second to lock it would
// fail when the first commits, so the second to ask is refused even before
// the first's write has returned.
func TestKeysWriteBesideAnothersInFlightIsRefused(t *testing.T) {
	var g keyRegistry
	a := g.start(&sql.TxOptions{Isolation: sql.LevelSerializable})
	b := g.start(&sql.TxOptions{Isolation: sql.LevelSerializable})
	if err := a.before(false, debit, args(int64(1), int64(5))); err != nil {
		t.Fatal(err)
	}
	// a's write is in flight (after not called yet).
	if err := b.before(false, credit, args(int64(1), int64(5))); err == nil {
		t.Error("a write beside another's in flight on the same row was let go")
	}
	a.after()
	g.end(a)
	if err := b.before(false, credit, args(int64(1), int64(5))); err != nil {
		t.Errorf("the row is free again: %v", err)
	}
}

// MySQL finds deadlocks at once: nothing of this runs there (the MariaDB
// replicas' fairness rests on the limiter alone).
func TestKeysNotOnMySQL(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv, WithDialect(DialectMySQL))
	l := retrierOf(db).txLimit
	srv.script(debit, step{err: &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock"}})
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, debit, int64(1), int64(1))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if l.keys.on.Load() || l.keys.keyed.Load() != 0 {
		t.Error("keys recorded on MySQL")
	}
}

// A cycle through three transactions is foreseen too, and a search among
// attempts that wait for each other without reaching the writer ends.
func TestKeysForeseenDeadlockOfThree(t *testing.T) {
	var g keyRegistry
	key := func(id int64) []uint64 { return statementKeys(debit, args(int64(1), id)) }
	t1 := running(&g, false, key(1)...)
	t2 := running(&g, false, key(2)...)
	t3 := running(&g, false, key(3)...)
	t1.inflight = key(2) // t1 waits for t2
	t2.inflight = key(3) // t2 waits for t3
	if err := t3.before(false, debit, args(int64(1), int64(1))); err == nil {
		t.Error("t3's write to t1's row closes t3→t1→t2→t3 and was let go")
	}
	t4 := running(&g, false, key(4)...)
	t3.inflight = key(1) // t3 waits for t1: a cycle without t4
	if err := t4.before(false, debit, args(int64(1), int64(1))); err != nil {
		t.Errorf("t4 waits for t1, whose waits never reach t4: %v", err)
	}
}

// A closure that swallows the refusal does not commit a part of its work:
// the transaction is poisoned as by the server's deadlock, and replayed.
func TestKeysSwallowedRefusalDoesNotCommit(t *testing.T) {
	srv := newFakeServer()
	db, clock := testDB(t, srv)
	l := retrierOf(db).txLimit
	l.keys.conflicted(clock.Now())
	other := running(&l.keys, true, statementKeys(debit, args(int64(1), int64(1)))...)
	go func() {
		time.Sleep(50 * time.Millisecond)
		l.keys.end(other)
	}()
	ser := &sql.TxOptions{Isolation: sql.LevelSerializable}
	runs := 0
	err := RunInTx(context.Background(), db, ser, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		if _, err := tx.ExecContext(ctx, "INSERT INTO ledger VALUES ($1)", int64(runs)); err != nil {
			return err
		}
		tx.ExecContext(ctx, debit, int64(1), int64(1)) // error swallowed
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Errorf("closure ran %d times, want 2", runs)
	}
	if n := srv.ranCount("INSERT INTO ledger"); n != 1 {
		t.Errorf("%d INSERTs committed, want 1 (the replay's)", n)
	}
}
