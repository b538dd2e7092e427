package sqlretry

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"
)

// A RunInTx nested in another's closure on a context of its own (not the
// closure's) cannot be seen as nested: with contention control engaged the
// outer holds the only slot and the inner waits for one. Nothing completes,
// so the limiter must let go: the inner, the outer and the callers queued
// behind them all commit, long before their deadlines (a hostile tester's
// probe on PostgreSQL: every such caller, and plain callers behind them,
// failed at their deadline).
func TestRunInTxNestedOnFreshContextDoesNotDeadlockContentionControl(t *testing.T) {
	db, clock := testDB(t, newFakeServer())
	engage(t, db)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // time passes
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				clock.Advance(20 * time.Millisecond)
			}
		}
	}()
	write := func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	}
	begun := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
		defer cancel()
		errs <- RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if err := write(ctx, tx); err != nil {
				return err
			}
			close(begun)
			ictx, icancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer icancel()
			return RunInTx(ictx, db, nil, write)
		})
	}()
	<-begun
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
			defer cancel()
			errs <- RunInTx(ctx, db, nil, write)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("RunInTx: %v", err)
		}
	}
	if s := stats(t, db); s.ContentionLetGo != 1 {
		t.Errorf("ContentionLetGo = %d, want 1", s.ContentionLetGo)
	}
}
