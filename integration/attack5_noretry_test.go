package integration

import (
	"context"
	"database/sql"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

// A call that asked for no retries (WithMaxAttempts(1), NoRetry(ctx))
// made within 2 s of another caller's deadlock on the same db, whose
// closure waits 300 ms behind a batch job's row lock. Without short waits
// it simply waits and commits; it must not get a lock timeout that the
// plain driver would never have raised and that it cannot replay.
func TestAttack5NoRetryCallAfterDeadlock(t *testing.T) {
	cases := map[string]func(ctx context.Context) (context.Context, []sqlretry.Option){
		"WithMaxAttempts(1)": func(ctx context.Context) (context.Context, []sqlretry.Option) {
			return ctx, []sqlretry.Option{sqlretry.WithMaxAttempts(1)}
		},
		"NoRetry(ctx)": func(ctx context.Context) (context.Context, []sqlretry.Option) {
			return sqlretry.NoRetry(ctx), nil
		},
		"WithMaxAttempts(2)": func(ctx context.Context) (context.Context, []sqlretry.Option) {
			return ctx, []sqlretry.Option{sqlretry.WithMaxAttempts(2)}
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			for _, on := range []bool{false, true} {
				plain := atkPlain(t, "pgx")
				tbl := a5Table(t, plain, 1)
				db := a5Open(t, atkPG, 4, sqlretry.WithShortLockWait(on))
				ctx := a5Ctx(t, 20*time.Second)
				// Another caller of the db meets a deadlock (replayed, commits).
				var k int
				if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					if k++; k == 1 {
						return a5FakeConflict(ctx, tx, "40P01")
					}
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				released := a5Holder(t, plain, tbl, 1, 300*time.Millisecond)
				cctx, opts := mk(ctx)
				var n atomic.Int32
				var lt string
				err := sqlretry.RunInTx(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					n.Add(1)
					lt, _ = a5Setting(ctx, tx, "lock_timeout")
					_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
					return err
				}, opts...)
				<-released
				code := ""
				var pe *pgconn.PgError
				if errors.As(err, &pe) {
					code = pe.Code
				}
				t.Logf("%s, short waits %v: attempts %d, lock_timeout %s, err %v", name, on, n.Load(), lt, err)
				if err != nil {
					if !on {
						t.Fatalf("without short waits: %v", err)
					}
					t.Errorf("DEFECT: %s within 2 s of another caller's deadlock, behind a 300 ms row lock: short lock waits bounded its attempt(s) (lock_timeout %s) and it failed with SQLSTATE %s after %d attempt(s) (%v); without short waits it waited and committed", name, lt, code, n.Load(), err)
				}
			}
		})
	}
}
