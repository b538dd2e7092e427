package integration

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/sqlretry/sqlretry"
)

// Shadow mode on a real PostgreSQL (issue 11): a transaction that hits a
// serialization failure gets the driver's own error after one run, as a
// plain *sql.DB gives it, and the replay enforcement would have made is
// reported.
func TestShadowModeLikeThePlainDriverOnASerializationFailure(t *testing.T) {
	d := need(t, "pgx")
	plain, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	var mu sync.Mutex
	var shadowEvents []sqlretry.Event
	shadow, err := sqlretry.Open("pgx", d, sqlretry.WithShadow(true), sqlretry.WithObserver(sqlretry.ObserverFunc(func(_ context.Context, e sqlretry.Event) {
		if e.Shadow {
			mu.Lock()
			shadowEvents = append(shadowEvents, e)
			mu.Unlock()
		}
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer shadow.Close()
	tbl := table(t, plain, "shadow")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (id int PRIMARY KEY, n int NOT NULL)", "INSERT INTO "+tbl+" VALUES (1, 0)")
	ctx := context.Background()
	repeatable := &sql.TxOptions{Isolation: sql.LevelRepeatableRead}

	// fn reads the row, lets another session update it, then updates it
	// itself: PostgreSQL answers 40001 under REPEATABLE READ.
	runs := 0
	fn := func(ctx context.Context, tx *sql.Tx) error {
		runs++
		var n int
		if err := tx.QueryRowContext(ctx, "SELECT n FROM "+tbl+" WHERE id = 1").Scan(&n); err != nil {
			return err
		}
		if _, err := plain.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 1 WHERE id = 1"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+tbl+" SET n = n + 10 WHERE id = 1")
		return err
	}

	// The plain driver, with the begin/fn/commit a caller writes by hand.
	tx, err := plain.BeginTx(ctx, repeatable)
	if err != nil {
		t.Fatal(err)
	}
	plainErr := fn(ctx, tx)
	_ = tx.Rollback()

	shadowErr := sqlretry.RunInTx(ctx, shadow, repeatable, fn)

	var pe, se *pgconn.PgError
	if !errors.As(plainErr, &pe) || pe.Code != "40001" {
		t.Fatalf("plain driver: %v, want a serialization failure", plainErr)
	}
	if !errors.As(shadowErr, &se) || se.Code != pe.Code || se.Message != pe.Message {
		t.Fatalf("shadow: %v, want the plain driver's %v", shadowErr, plainErr)
	}
	if errors.As(shadowErr, new(*sqlretry.Error)) {
		t.Errorf("shadow: the error is wrapped by sqlretry: %v", shadowErr)
	}
	if runs != 2 {
		t.Errorf("fn ran %d times (plain + shadow), want 2: shadow mode replayed", runs)
	}
	var n int
	if err := plain.QueryRow("SELECT n FROM " + tbl + " WHERE id = 1").Scan(&n); err != nil || n != 2 {
		t.Errorf("n = %d (%v), want 2: the two outside increments only", n, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(shadowEvents) != 1 || shadowEvents[0].Kind != sqlretry.EventRetry || shadowEvents[0].Op != "tx" {
		t.Errorf("shadow events %+v, want one replay of the transaction", shadowEvents)
	}
	if s, _ := sqlretry.StatsOf(shadow); s.RetriesTransaction != 0 || s.ShadowDecisions != 1 {
		t.Errorf("stats: transaction retries %d, shadow decisions %d; want 0, 1", s.RetriesTransaction, s.ShadowDecisions)
	}
}

// The swap-in transparency transcript (transparency_test.go) through
// sqlretry in shadow mode is the raw driver's: shadow mode changes nothing
// the application can see.
func TestSwapInTransparencyInShadowMode(t *testing.T) {
	apps := map[string]func(*testing.T, *sql.DB, string) string{"pgx": pgApp, "mysql": mysqlApp}
	for _, driver := range []string{"pgx", "mysql"} {
		t.Run(driver, func(t *testing.T) {
			d := need(t, driver)
			var got [2]string
			for i, shadowed := range []bool{false, true} {
				open := sql.Open
				if shadowed {
					open = func(name, dsn string) (*sql.DB, error) { return sqlretry.Open(name, dsn, sqlretry.WithShadow(true)) }
				}
				db, err := open(driver, d)
				if err != nil {
					t.Fatal(err)
				}
				tbl := table(t, db, "swapshadow")
				got[i] = strings.ReplaceAll(apps[driver](t, db, tbl), tbl, "T")
				db.Close()
			}
			if got[0] != got[1] {
				t.Errorf("raw driver and sqlretry in shadow mode differ:\n%s", diffLines(got[0], got[1]))
			}
			if !strings.Contains(got[1], "duplicate key: ") {
				t.Error("the transcript did not reach its errors")
			}
		})
	}
}
