package integration

import (
	"context"
	"database/sql"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// (3) A closure nests RunInTx with a context of its own (several shapes),
// the nested one commits an audit row, then the outer meets a lock timeout.
// The outer must not be replayed: the audit row would double.
func a4Nested(t *testing.T, driverName string, db, plain *sql.DB) {
	audit := atkName("a4audit")
	lk := atkName("a4nlock")
	atkMust(t, plain,
		"CREATE TABLE "+audit+" (tag varchar(40) NOT NULL)",
		"CREATE TABLE "+lk+" (id int PRIMARY KEY, n int)",
		"INSERT INTO "+lk+" VALUES (1,0)")
	t.Cleanup(func() { plain.Exec("DROP TABLE IF EXISTS " + audit); plain.Exec("DROP TABLE IF EXISTS " + lk) })
	a4HoldRow(t, plain, lk)
	ins, setTO := "INSERT INTO "+audit+" VALUES (?)", "SET SESSION innodb_lock_wait_timeout = 1"
	if driverName == "pgx" {
		ins, setTO = "INSERT INTO "+audit+" VALUES ($1)", "SET LOCAL lock_timeout = '700ms'"
	}
	type key struct{}
	nop := func() {}
	shapes := map[string]func(ctx context.Context) (context.Context, context.CancelFunc){
		"background": func(context.Context) (context.Context, context.CancelFunc) { return context.Background(), nop },
		"withoutcancel": func(ctx context.Context) (context.Context, context.CancelFunc) {
			return context.WithoutCancel(ctx), nop
		},
		"timeout": func(context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 5*time.Second)
		},
		"value": func(context.Context) (context.Context, context.CancelFunc) {
			return context.WithValue(context.TODO(), key{}, 1), nop
		},
		"derived": func(ctx context.Context) (context.Context, context.CancelFunc) { return context.WithCancel(ctx) },
	}
	for name, mk := range shapes {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var calls atomic.Int32
			done := make(chan error, 1)
			go func() {
				done <- sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls.Add(1)
					if _, err := tx.ExecContext(ctx, setTO); err != nil {
						return err
					}
					nctx, ncancel := mk(ctx)
					defer ncancel()
					if err := sqlretry.RunInTx(nctx, db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
						_, err := tx2.ExecContext(ctx, ins, name)
						return err
					}); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "UPDATE "+lk+" SET n = n + 1 WHERE id = 1")
					return err
				})
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(12 * time.Second):
				t.Fatalf("HANG")
			}
			var rows int
			plain.QueryRow("SELECT COUNT(*) FROM " + audit + " WHERE tag = '" + name + "'").Scan(&rows)
			t.Logf("%s/%s: calls=%d audit rows=%d err=%v", driverName, name, calls.Load(), rows, err)
			if rows != 1 || calls.Load() != 1 {
				t.Errorf("outer replayed after nested commit: calls=%d audit=%d", calls.Load(), rows)
			}
			if err == nil {
				t.Errorf("success though outer UPDATE timed out")
			}
		})
	}
}

func TestAttack4NestedOwnCtxPG(t *testing.T) {
	a4Nested(t, "pgx", atkOpenPG(t, nil), atkPlain(t, "pgx"))
}

func TestAttack4NestedOwnCtxMy(t *testing.T) {
	a4Nested(t, "mysql", atkOpenMy(t), atkPlain(t, "mysql"))
}
