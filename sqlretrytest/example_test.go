package sqlretrytest_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/sqlretrytest"
)

// A closure that sends mail (here: appends to the mock mailer's outbox)
// sends it again on every replay. ReplayCheck aborts the first attempt at
// each statement in turn and compares what each run leaves behind with a
// clean run's. Against your own test database, use its connector, e.g.
// stdlib.GetConnector(cfg) or mysql.NewConnector(cfg).
func ExampleReplayCheck_unsafe() {
	db := newMemDB() // stands for the test database
	var mailed []string

	check := sqlretrytest.ReplayCheck{
		Connector: db.connector(),
		Reset: func(ctx context.Context, db *sql.DB) error {
			mailed = nil
			_, err := db.ExecContext(ctx, "DELETE FROM orders")
			return err
		},
		Rows: []string{"SELECT msg FROM orders ORDER BY msg"},
	}
	check.SideEffect("mail", func() any { return append([]string(nil), mailed...) })

	report, err := check.Run(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "INSERT INTO orders VALUES (?)", "order 1 paid"); err != nil {
			return err
		}
		mailed = append(mailed, "receipt for order 1") // not undone by a rollback
		_, err := tx.ExecContext(ctx, "INSERT INTO orders VALUES (?)", "order 1 shipped")
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(report)
	// Output:
	// NOT replay-safe: 2 differences over 3 points
	//   aborted at 2 (INSERT INTO orders VALUES (?)): side effect mail: clean run [receipt for order 1], with a replay [receipt for order 1 receipt for order 1]
	//   aborted at 3 (COMMIT): side effect mail: clean run [receipt for order 1], with a replay [receipt for order 1 receipt for order 1]
}

// The same closure made safe: the receipt goes into an outbox table in the
// same transaction (a sender mails it after the commit), so a rollback
// takes it back with everything else.
func ExampleReplayCheck_safe() {
	db := newMemDB()
	check := sqlretrytest.ReplayCheck{
		Connector: db.connector(),
		Reset: func(ctx context.Context, db *sql.DB) error {
			if _, err := db.ExecContext(ctx, "DELETE FROM orders"); err != nil {
				return err
			}
			_, err := db.ExecContext(ctx, "DELETE FROM outbox")
			return err
		},
		Rows: []string{"SELECT msg FROM orders ORDER BY msg", "SELECT msg FROM outbox ORDER BY msg"},
	}
	report, err := check.Run(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, "INSERT INTO orders VALUES (?)", "order 1 paid"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO outbox VALUES (?)", "receipt for order 1"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO orders VALUES (?)", "order 1 shipped")
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(report)
	// Output:
	// replay-safe: the same state after a replay from each of 4 points
}

// An Injector under sqlretry makes chosen statements fail as the driver
// would: here the second statement meets a deadlock, and RunInTx replays
// the transaction.
func ExampleInjector() {
	mem := newMemDB()
	inj := sqlretrytest.NewInjector(mem.connector(), sqlretrytest.FailNth(2, sqlretrytest.Deadlock))
	db := sqlretry.OpenDB(inj)
	defer db.Close()

	attempts := 0
	err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		attempts++
		if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "a"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "b")
		return err
	})
	fmt.Println("error:", err, "attempts:", attempts)
	for _, f := range inj.Injected() {
		fmt.Printf("statement %d (transaction %d, place %d): %v: %v\n", f.Statement.Seq, f.Statement.Tx, f.Statement.InTx, f.Fault, f.Err)
	}
	// Output:
	// error: <nil> attempts: 2
	// statement 2 (transaction 1, place 2): deadlock: ERROR: deadlock detected (SQLSTATE 40P01)
}

// A fake clock tests an application's own deadline around sqlretry
// without waiting: every backoff moves the clock instead of sleeping, and
// the deadline is read from the same clock.
func ExampleClock() {
	clock := sqlretrytest.NewClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	clock.SetAutoAdvance(true)

	inj := sqlretrytest.NewInjector(newMemDB().connector(), func(s sqlretrytest.Statement) sqlretrytest.Fault {
		return sqlretrytest.Deadlock // every attempt deadlocks
	})
	db := sqlretry.OpenDB(inj, sqlretry.WithClock(clock), sqlretry.WithoutBudget())
	defer db.Close()

	// The application gives the transfer 2 seconds.
	ctx, cancel := clock.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := clock.Now()
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "a")
		return err
	})
	fmt.Println("gave up within the deadline:", clock.Now().Sub(start) <= 2*time.Second)
	var pgErr interface{ SQLState() string }
	fmt.Println("last error is the deadlock:", errors.As(err, &pgErr) && pgErr.SQLState() == "40P01")
	// Output:
	// gave up within the deadline: true
	// last error is the deadlock: true
}
