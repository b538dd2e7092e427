// Command hotpathcg makes n calls of one operation on the no-I/O driver,
// raw or through sqlretry, for callgrind: the instructions of one call are
// the difference between two runs with different n, divided by the
// difference in n (scripts/hotpath-callgrind.sh). Instruction counts hold
// under load, where wall time on a shared machine does not.
//
// Usage: hotpathcg raw|sqlretry exec|query|prepared|tx|runintx|runintxbusy n
//
// runintx on raw is the hand-written transaction (BeginTx, the closure,
// Commit); runintxbusy is RunInTx while another caller's closure stays
// open, as under concurrency.
package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"runtime"
	"strconv"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/nopdriver"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: hotpathcg raw|sqlretry exec|query|prepared|tx|runintx|runintxbusy n")
		os.Exit(2)
	}
	variant, op := os.Args[1], os.Args[2]
	n, _ := strconv.Atoi(os.Args[3])
	var db *sql.DB
	if variant == "raw" {
		db = sql.OpenDB(nopdriver.Connector{})
	} else {
		db = sqlretry.OpenDB(nopdriver.Connector{})
	}
	db.SetMaxIdleConns(4)
	ctx := context.Background()
	fn := func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1")
		return err
	}
	stmt, err := db.Prepare("UPDATE t SET n = n + 1 WHERE id = 1")
	if err != nil {
		panic(err)
	}
	var x int
	// database/sql starts a goroutine per transaction (Tx.awaitDone); with
	// one P and no asynchronous preemption they wait in the run queue and
	// run in batches whenever the scheduler gets a turn, which made the
	// counts of transactions vary by hundreds of instructions between runs
	// (more than what sqlretry changed). Yielding after each transaction
	// runs its goroutine at once, the same for raw and sqlretry.
	sched := op == "tx" || op == "runintx" || op == "runintxbusy"
	if op == "runintxbusy" {
		// Another caller's closure stays open all along, as under concurrency.
		started, block := make(chan struct{}), make(chan struct{})
		go sqlretry.RunInTx(ctx, db, nil, func(context.Context, *sql.Tx) error { close(started); <-block; return nil })
		<-started
		op = "runintx"
	}
	for i := 0; i < n; i++ {
		switch op {
		case "exec":
			_, err = db.Exec("UPDATE t SET n = n + 1 WHERE id = 1")
		case "query":
			err = db.QueryRow("SELECT n FROM t WHERE id = 1").Scan(&x)
		case "prepared":
			_, err = stmt.Exec()
		case "tx":
			var tx *sql.Tx
			tx, err = db.BeginTx(ctx, nil)
			if err == nil {
				if _, err = tx.ExecContext(ctx, "SELECT n FROM t WHERE id = 1"); err == nil {
					err = tx.Commit()
				}
			}
		case "runintx":
			if variant == "raw" {
				var tx *sql.Tx
				tx, err = db.BeginTx(ctx, nil)
				if err == nil {
					if err = fn(ctx, tx); err != nil {
						tx.Rollback()
					} else {
						err = tx.Commit()
					}
				}
			} else {
				err = sqlretry.RunInTx(ctx, db, nil, fn)
			}
		}
		if err != nil {
			panic(err)
		}
		if sched {
			runtime.Gosched()
		}
	}
}
