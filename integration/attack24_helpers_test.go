package integration

// Hostile tests of the replay spread (attack24), written from the README
// and go doc only: helpers.

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

// a24Open opens a sqlretry db on the shared MariaDB (own connector, so
// its own policy, p and contention control).
func a24Open(t testing.TB, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	cfg, err := mysql.ParseDSN(atkMySQL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(conn, opts...)
	t.Cleanup(func() { db.Close() })
	return db
}

type a24Ev struct {
	at time.Time
	e  sqlretry.Event
}

// a24Obs records sqlretry's events with the time they were seen.
type a24Obs struct {
	mu  sync.Mutex
	evs []a24Ev
}

func (o *a24Obs) Observe(ctx context.Context, e sqlretry.Event) {
	o.mu.Lock()
	o.evs = append(o.evs, a24Ev{time.Now(), e})
	o.mu.Unlock()
}

func (o *a24Obs) reset() {
	o.mu.Lock()
	o.evs = nil
	o.mu.Unlock()
}

func (o *a24Obs) retries() []a24Ev {
	o.mu.Lock()
	defer o.mu.Unlock()
	var r []a24Ev
	for _, e := range o.evs {
		if e.e.Kind == sqlretry.EventRetry {
			r = append(r, e)
		}
	}
	return r
}

// a24Hot creates a table of n rows (id 1..n, v 0) and drops it afterwards.
func a24Hot(t testing.TB, plain *sql.DB, n int) string {
	t.Helper()
	tbl := atkName("a24hot")
	atkMust(t.(*testing.T), plain, "CREATE TABLE "+tbl+" (id int primary key, v int not null) ENGINE=InnoDB")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + tbl) })
	for i := 1; i <= n; i++ {
		if _, err := plain.Exec("INSERT INTO "+tbl+" VALUES (?, 0)", i); err != nil {
			t.Fatal(err)
		}
	}
	return tbl
}

// a24Signal makes the server raise a deadlock (1213) in the transaction.
func a24Signal(ctx context.Context, tx *sql.Tx, errno string) error {
	_, err := tx.ExecContext(ctx, "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = "+errno+", MESSAGE_TEXT = 'attack24 fake conflict'")
	return err
}

// a24Gaps runs one RunInTx whose first `conflicts` attempts end in a fake
// deadlock after sleeping `hold` (so the attempt took that long); it
// returns the pauses between the end of each failed attempt and the start
// of the next, and the error.
func a24Gaps(ctx context.Context, db *sql.DB, conflicts int, hold time.Duration, errno string, opts ...sqlretry.Option) (gaps []time.Duration, attempts int, err error) {
	var lastEnd time.Time
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		attempts++
		if !lastEnd.IsZero() {
			gaps = append(gaps, time.Since(lastEnd))
		}
		if attempts <= conflicts {
			if hold > 0 {
				select {
				case <-time.After(hold):
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			err := a24Signal(ctx, tx, errno)
			lastEnd = time.Now()
			return err
		}
		return nil
	}, opts...)
	return gaps, attempts, err
}

// a24Prime runs n calls that each conflict k times, with the spread off
// for them (if per-call options work; else the spread slows priming).
func a24Prime(t testing.TB, db *sql.DB, n, k int, opts ...sqlretry.Option) {
	t.Helper()
	for i := 0; i < n; i++ {
		if _, _, err := a24Gaps(context.Background(), db, k, 0, "1213", opts...); err != nil {
			t.Fatalf("prime: %v", err)
		}
	}
}

func sprintf(f string, a ...any) string { return fmt.Sprintf(f, a...) }
