package integration

import (
	"context"
	"database/sql"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// Behind PgBouncer in transaction mode, server sessions are shared by all
// clients: a bound of sqlretry's must never reach another client's
// statements. sqlretry callers make bounded replays through the pooler
// while a plain client (not sqlretry) keeps asking SHOW lock_timeout and
// runs transactions that wait 150 ms for a row: it must see 0 and never a
// lock timeout.
func TestAttack5PgBouncerNoLeak(t *testing.T) {
	if dbserver.PgBouncerBinary() == "" {
		unavailable(t, "no pgbouncer binary")
	}
	srv := ownServer(t, "pgx")
	bouncer, err := dbserver.StartPgBouncer(dsnPort(t, srv.DSN))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bouncer.Stop)
	admin := a5Plain(t, srv.DSN)
	atkMust(t, admin, "CREATE TABLE a5b (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO a5b SELECT g, 0 FROM generate_series(1, 10) g")
	for _, mode := range []string{"exec", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			through := bouncer.DSN + "&default_query_exec_mode=" + mode
			db := a5Open(t, through, 6)
			other := a5Plain(t, through)
			other.SetMaxOpenConns(6)
			ctx := a5Ctx(t, 30*time.Second)
			stop := time.Now().Add(2 * time.Second)
			var wg sync.WaitGroup
			var bounded, calls, leaks, timeouts, othersOK atomic.Int64
			var firstErr atomic.Value
			fail := func(err error) {
				firstErr.CompareAndSwap(nil, err.Error())
			}
			for range 6 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Now().Before(stop) {
						var n int
						err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
							if n++; n == 1 {
								return a5FakeConflict(ctx, tx, "40001")
							}
							if s, err := a5Setting(ctx, tx, "lock_timeout"); err != nil {
								return err
							} else if s != "0" {
								bounded.Add(1)
							}
							_, err := tx.ExecContext(ctx, "UPDATE a5b SET n = n + 1 WHERE id = 5")
							return err
						})
						if err != nil {
							fail(err)
							return
						}
						calls.Add(1)
					}
				}()
			}
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Now().Before(stop) {
						var s string
						if err := other.QueryRowContext(ctx, "SHOW lock_timeout").Scan(&s); err != nil {
							fail(err)
							return
						}
						if s != "0" {
							leaks.Add(1)
						}
						// A transaction that waits ~150 ms for a row held by the admin.
						hold, err := admin.BeginTx(ctx, nil)
						if err != nil {
							fail(err)
							return
						}
						id := 1 + int(time.Now().UnixNano()%4)
						if _, err := hold.ExecContext(ctx, "UPDATE a5b SET n = n WHERE id = $1", id); err != nil {
							hold.Rollback()
							fail(err)
							return
						}
						time.AfterFunc(150*time.Millisecond, func() { hold.Rollback() })
						tx, err := other.BeginTx(ctx, nil)
						if err != nil {
							fail(err)
							return
						}
						_, err = tx.ExecContext(ctx, "UPDATE a5b SET n = n WHERE id = $1", id)
						if err != nil {
							timeouts.Add(1)
							tx.Rollback()
							t.Logf("plain client's transaction: %v", err)
							continue
						}
						tx.Commit()
						othersOK.Add(1)
					}
				}()
			}
			wg.Wait()
			t.Logf("%s: %d sqlretry calls (%d bounded replays), plain client: %d SHOWs not 0, %d waits ended in error, %d ok", mode, calls.Load(), bounded.Load(), leaks.Load(), timeouts.Load(), othersOK.Load())
			if v := firstErr.Load(); v != nil {
				t.Errorf("error: %v", v)
			}
			if bounded.Load() == 0 {
				t.Errorf("no bounded replay seen through the pooler")
			}
			if leaks.Load() != 0 || timeouts.Load() != 0 {
				t.Errorf("DEFECT: sqlretry's lock_timeout leaked to another client through PgBouncer: %d SHOWs not 0, %d lock waits ended in error", leaks.Load(), timeouts.Load())
			}
		})
	}
}
