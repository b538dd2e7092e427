//go:build distsql

// Live tests against a distributed SQL engine's server. They are not part
// of `make test`: no such server can be installed by the CI script (see
// the README's "Distributed SQL engines"). Run them by hand against a
// running vtgate:
//
//	SQLRETRY_VITESS_DSN='root@tcp(127.0.0.1:PORT)/ks' go test -tags distsql -run TestVitess -v ./integration
package integration

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

func vitessDSN(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv("SQLRETRY_VITESS_DSN")
	if dsn == "" {
		// Built only with -tags distsql, so asked for: never skip.
		t.Fatal("SQLRETRY_VITESS_DSN is not set (a vtgate's MySQL DSN)")
	}
	return dsn
}

// Two RunInTx callers lock two rows in opposite orders through vtgate:
// InnoDB kills one with a deadlock, which vtgate sends as 1213 (40001)
// inside its own text; sqlretry replays it and both commit once.
func TestVitessDeadlockIsReplayed(t *testing.T) {
	db, err := sqlretry.Open("mysql", vitessDSN(t), sqlretry.WithDialect(sqlretry.DialectMySQL))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, _ = db.ExecContext(ctx, "DROP TABLE IF EXISTS dl")
	if _, err := db.ExecContext(ctx, "CREATE TABLE dl (id INT PRIMARY KEY, n INT)"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "INSERT INTO dl VALUES (1, 0), (2, 0)"); err != nil {
		t.Fatal(err)
	}
	var deadlocks sync.Map
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			first, second := 1+w, 2-w
			errs[w] = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				if _, err := tx.ExecContext(ctx, "UPDATE dl SET n = n + 1 WHERE id = ?", first); err != nil {
					return err
				}
				time.Sleep(300 * time.Millisecond)
				_, err := tx.ExecContext(ctx, "UPDATE dl SET n = n + 1 WHERE id = ?", second)
				var me *mysql.MySQLError
				if errors.As(err, &me) && me.Number == 1213 {
					deadlocks.Store(w, me.Message)
				}
				return err
			})
		}(w)
	}
	wg.Wait()
	for w, err := range errs {
		if err != nil {
			t.Errorf("worker %d: %v", w, err)
		}
	}
	var n1, n2 int
	if err := db.QueryRowContext(ctx, "SELECT (SELECT n FROM dl WHERE id = 1), (SELECT n FROM dl WHERE id = 2)").Scan(&n1, &n2); err != nil {
		t.Fatal(err)
	}
	if n1 != 2 || n2 != 2 {
		t.Errorf("rows = %d, %d; want 2, 2 (each transfer once)", n1, n2)
	}
	deadlocks.Range(func(k, v any) bool { t.Logf("worker %v got vtgate's 1213: %v", k, v); return true })
	if s, _ := sqlretry.StatsOf(db); s.RetriesTransaction < 1 {
		t.Errorf("RetriesTransaction = %d, want a replay of the deadlocked transaction", s.RetriesTransaction)
	}
}

// vttablet ends a transaction that outlives its transaction timeout (the
// vttestserver above runs with --queryserver-config-transaction-timeout
// 2s); vtgate answers the next statement with 1317 and the COMMIT with
// success, committing nothing. A closure that swallows the 1317 must not
// be told its work committed: RunInTx runs it again.
func TestVitessEndedTransactionIsReplayed(t *testing.T) {
	db, err := sqlretry.Open("mysql", vitessDSN(t), sqlretry.WithDialect(sqlretry.DialectMySQL))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, _ = db.ExecContext(ctx, "DROP TABLE IF EXISTS ended")
	if _, err := db.ExecContext(ctx, "CREATE TABLE ended (id INT PRIMARY KEY, n INT)"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "INSERT INTO ended VALUES (1, 0), (2, 0)"); err != nil {
		t.Fatal(err)
	}
	calls := 0
	var swallowed error
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "UPDATE ended SET n = n + 100 WHERE id = 2"); err != nil {
			return err
		}
		if calls == 1 {
			time.Sleep(4 * time.Second) // past the transaction timeout
		}
		if _, err := tx.ExecContext(ctx, "UPDATE ended SET n = n + 1 WHERE id = 1"); err != nil && swallowed == nil {
			swallowed = err
		}
		return nil // the closure swallows it
	})
	if err != nil {
		t.Fatalf("RunInTx: %v", err)
	}
	var me *mysql.MySQLError
	if !errors.As(swallowed, &me) || me.Number != 1317 {
		t.Fatalf("the first run got %v, want vtgate's 1317 (is the transaction timeout 2s?)", swallowed)
	}
	var n int
	if err := db.QueryRowContext(ctx, "SELECT n FROM ended WHERE id = 2").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if calls != 2 || n != 100 {
		t.Errorf("calls = %d, row = %d; want 2 runs and the work committed once (100)", calls, n)
	}
}
