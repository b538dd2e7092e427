package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"
)

// The per-connection memo of the SQL reader's answers (queryFacts) must
// answer exactly what the reader does, whatever order the texts come in:
// the same constant again, an equal text built anew, another text.
func TestQueryFactsAnswerAsTheReader(t *testing.T) {
	texts := []string{
		"SELECT n FROM t WHERE id = 1",
		"BEGIN",
		"UPDATE t SET n = n + 1",
		"COMMIT",
		"SET autocommit = 0",
		"CREATE TABLE x (a int)",
		"COMMIT AND CHAIN",
		"",
		"INSERT INTO t VALUES (1); COMMIT",
		"INSERT INTO t VALUES " + strings.Repeat("(1), ", 1000) + "(1)", // longer than factsMaxLen
		"BEGIN; " + strings.Repeat("SELECT 1; ", 500),
	}
	for _, d := range []Dialect{DialectPostgres, DialectMySQL, DialectUnknown} {
		c := &conn{r: &retrier{dialect: d}}
		for round := 0; round < 3; round++ {
			for i := range texts {
				for _, q := range []string{texts[i], strings.Clone(texts[i]), texts[(i+round)%len(texts)]} {
					// In each order: the memo's first fact may be any of the three.
					if got, want := c.isReadQuery(q), isReadQuery(d, q); got != want {
						t.Errorf("%v %q: isReadQuery %v, want %v", d, q, got, want)
					}
					if got, want := c.txControl(q), txControl(d, q); got != want {
						t.Errorf("%v %q: txControl %v, want %v", d, q, got, want)
					}
					if got, want := c.escapesTx(q), escapesTx(d, q); got != want {
						t.Errorf("%v %q: escapesTx %v, want %v", d, q, got, want)
					}
				}
			}
		}
	}
}

// A goroutine is seen inside an attempt's closure by its own mark, and
// only there: not before, not after, not from another goroutine.
func TestInClosureSeesOnlyTheClosuresGoroutine(t *testing.T) {
	srv := newFakeServer()
	db, _ := testDB(t, srv)
	if inClosure() {
		t.Fatal("inClosure before any RunInTx")
	}
	var inside, other bool
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		inside = inClosure()
		done := make(chan bool)
		go func() { done <- inClosure() }()
		other = <-done
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !inside || other {
		t.Errorf("inClosure inside the closure %v, on another goroutine meanwhile %v; want true, false", inside, other)
	}
	if inClosure() || closureOverflow.Load() != 0 {
		t.Errorf("after RunInTx: inClosure %v, overflow %d; want false, 0", inClosure(), closureOverflow.Load())
	}
}

// When the slots near a goroutine's own are taken (a collision), its
// attempt counts in closureOverflow and a nested RunInTx with a context of
// its own is still found by the stack: the outer is not replayed.
func TestNestedCommitSeenWhenTheClosureSlotsCollide(t *testing.T) {
	g := curG()
	if g == 0 {
		t.Skip("no curG on this architecture: every attempt takes the overflow path already")
	}
	i := closureSlot(g)
	for k := uintptr(0); k < closureProbe; k++ {
		if !closureSlots[(i+k)%closureSlotCount].CompareAndSwap(0, 1) {
			t.Fatalf("slot %d is taken", (i+k)%closureSlotCount)
		}
	}
	defer func() {
		for k := uintptr(0); k < closureProbe; k++ {
			closureSlots[(i+k)%closureSlotCount].Store(0)
		}
	}()
	srv := newFakeServer()
	srv.script("UPDATE outer", step{err: errDeadlockPG})
	db, _ := testDB(t, srv, WithMaxAttempts(5))
	var outer, overflow int64
	err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		outer++
		overflow = closureOverflow.Load()
		if err := RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO inner_log VALUES (1)")
			return err
		}); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE outer SET n = 1")
		return err
	})
	if overflow < 1 {
		t.Errorf("closureOverflow in the closure = %d, want the attempt counted there", overflow)
	}
	if outer != 1 || !errors.Is(err, errDeadlockPG) {
		t.Errorf("outer ran %d times, err = %v; want once and the deadlock (the nested transaction had committed)", outer, err)
	}
	if n := srv.ranCount("INSERT INTO inner_log"); n != 1 {
		t.Errorf("the inner write committed %d times, want 1", n)
	}
}
