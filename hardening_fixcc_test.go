package sqlretry

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"
)

// A RunInTx nested in another's closure on a context of its own (not the
// closure's) is not seen as nested through its context: with contention
// control engaged the outer holds the only slot and the inner waited for
// one, and every caller waited for its deadline (a hostile tester's probe
// on PostgreSQL: every such caller, and plain callers queued behind them,
// failed at their deadline). On the closure's goroutine it must not wait
// at all; on another goroutine that the closure waits for, the limiter
// must let go once nothing completes. Either way the inner, the outer and
// the callers queued behind them commit, long before their deadlines.
func TestRunInTxNestedOnFreshContextDoesNotDeadlockContentionControl(t *testing.T) {
	write := func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1")
		return err
	}
	for _, tc := range []struct {
		name      string
		goroutine bool // the closure runs the inner RunInTx on another goroutine
		maxTook   time.Duration
		letGo     int64
	}{
		{"same goroutine", false, time.Second, 0},
		{"another goroutine", true, 3 * time.Second, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
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
						clock.Advance(5 * time.Millisecond)
					}
				}
			}()
			inner := func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				return RunInTx(ctx, db, nil, write)
			}
			start := time.Now()
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
					if !tc.goroutine {
						return inner()
					}
					ch := make(chan error, 1)
					go func() { ch <- inner() }()
					return <-ch
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
			took := time.Since(start)
			close(errs)
			for err := range errs {
				if err != nil {
					t.Errorf("RunInTx: %v", err)
				}
			}
			if took > tc.maxTook {
				t.Errorf("took %v, want at most %v", took, tc.maxTook)
			}
			if s := stats(t, db); s.ContentionLetGo != tc.letGo {
				t.Errorf("ContentionLetGo = %d, want %d", s.ContentionLetGo, tc.letGo)
			}
		})
	}
}
