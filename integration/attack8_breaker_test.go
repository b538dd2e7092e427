package integration

// attack8: sqlretry's own 55P03 through the breaker's stop and WithFallback.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// a8Flaky refuses dials while fail is set (a server that went away).
type a8Flaky struct {
	inner driver.Connector
	fail  atomic.Bool
}

func (c *a8Flaky) Connect(ctx context.Context) (driver.Conn, error) {
	if c.fail.Load() {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{}}
	}
	return c.inner.Connect(ctx)
}

func (c *a8Flaky) Driver() driver.Driver { return c.inner.Driver() }

// While a bounded replay waits behind a batch job's row lock (700 ms),
// new dials start failing (a server refusing new connections, "too many
// clients", say) and the breaker opens. Without short waits the attempt
// waits on its live connection and commits, as the plain driver would.
// With them the replay's bound runs out (sqlretry's own 55P03), the next
// replay needs a connection the open breaker refuses (the live one,
// opened before the breaker opened, is discarded), and the caller gets
// ErrCircuitOpen: a failure short waits made. The own 55P03 is not in the
// error's chain nor in the fallback's reason (that part holds).
func TestAttack8BreakerOpenDuringBoundedReplay(t *testing.T) {
	for _, on := range []bool{false, true} {
		for _, fb := range []bool{false, true} {
			plain := atkPlain(t, "pgx")
			tbl := a5Table(t, plain, 2)
			cfg, err := pgx.ParseConfig(atkPG)
			if err != nil {
				t.Fatal(err)
			}
			fl := &a8Flaky{inner: stdlib.GetConnector(*cfg)}
			opts := []sqlretry.Option{
				sqlretry.WithShortLockWait(on),
				sqlretry.WithBreaker(sqlretry.Breaker{ConsecutiveDialFailures: 2, OpenTimeout: 10 * time.Second, ProbeInterval: 10 * time.Second}),
			}
			var reason error
			if fb {
				opts = append(opts, sqlretry.WithFallback(func(ctx context.Context, r error) error {
					reason = r
					return r
				}))
			}
			db := sqlretry.OpenDB(fl, opts...)
			released := a5Holder(t, plain, tbl, 1, 700*time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			k := 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if k++; k == 1 {
					return a5FakeConflict(ctx, tx, "40001")
				}
				if k == 2 {
					fl.fail.Store(true)
					for range 3 {
						pctx, pcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
						c, err := db.Conn(pctx)
						if err == nil {
							c.Close()
						}
						pcancel()
					}
				}
				_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
				return err
			})
			cancel()
			<-released
			fl.fail.Store(false)
			n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
			st, _ := sqlretry.StatsOf(db)
			db.Close()
			t.Logf("short waits %v fallback %v: attempts %d row %d ErrorCode %q circuit %v err %v; reason %v; breaker %v", on, fb, k, n, sqlretry.ErrorCode(err), errors.Is(err, sqlretry.ErrCircuitOpen), err, reason, st.Breaker)
			if a8Code(err) == "55P03" || sqlretry.ErrorCode(err) == "55P03" || a8Code(reason) == "55P03" {
				t.Errorf("the breaker's stop carries a 55P03 (fallback %v): err %v; fallback reason %v", fb, err, reason)
			}
			if !on && (err != nil || n != 1001) {
				t.Fatalf("without short waits: err %v row %d", err, n)
			}
			if on && (err != nil || n != 1001) {
				a8Defects(t)
				t.Errorf("DEFECT: short waits turned a commit on a live connection into %v (fallback %v, reason %v), row %d; without them the same call committed", err, fb, reason, n)
			}
		}
	}
}

// The same with a real refusal: the role's CONNECTION LIMIT is reached
// (53300 "too many connections for role" at connect), so the other
// callers' dials fail and the breaker opens while a bounded replay waits
// behind a 700 ms row lock.
func TestAttack8BreakerOpenByConnectionLimitDuringBoundedReplay(t *testing.T) {
	plain := atkPlain(t, "pgx")
	for _, on := range []bool{false, true} {
		role := atkName("a8lim")
		atkMust(t, plain, "CREATE ROLE "+role+" LOGIN CONNECTION LIMIT 1")
		tbl := a5Table(t, plain, 2)
		atkMust(t, plain, "GRANT ALL ON "+tbl+" TO "+role)
		t.Cleanup(func() { plain.Exec("DROP OWNED BY " + role); plain.Exec("DROP ROLE IF EXISTS " + role) })
		dsn := "postgres://" + role + "@127.0.0.1:5432/test?sslmode=disable"
		db := a5Open(t, dsn, 0, sqlretry.WithShortLockWait(on),
			sqlretry.WithBreaker(sqlretry.Breaker{ConsecutiveDialFailures: 2, OpenTimeout: 10 * time.Second, ProbeInterval: 10 * time.Second}))
		released := a5Holder(t, plain, tbl, 1, 700*time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		k := 0
		var dialErr error
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if k++; k == 1 {
				return a5FakeConflict(ctx, tx, "40001")
			}
			if k == 2 {
				// Other callers of the db need connections meanwhile.
				for range 3 {
					pctx, pcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
					c, err := db.Conn(pctx)
					if err == nil {
						c.Close()
					} else {
						dialErr = err
					}
					pcancel()
				}
			}
			_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1")
			return err
		})
		cancel()
		<-released
		n := atkCount(t, plain, "SELECT n FROM "+tbl+" WHERE id = 1")
		st, _ := sqlretry.StatsOf(db)
		db.Close()
		t.Logf("short waits %v: attempts %d row %d err %v; other callers' dial error %v; breaker %v", on, k, n, err, dialErr, st.Breaker)
		if !on && (err != nil || n != 1001) {
			t.Fatalf("without short waits: err %v row %d", err, n)
		}
		if on && (err != nil || n != 1001) {
			a8Defects(t)
			t.Errorf("DEFECT: role at its connection limit, breaker open: short waits turned the commit the live connection would make into %v, row %d", err, n)
		}
	}
}
