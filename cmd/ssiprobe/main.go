// Command ssiprobe runs transfers under SERIALIZABLE on PostgreSQL through
// the plain driver, without retries, each worker on a pair of rows of its
// own, and counts how many fail to serialize although no two transactions
// touch a common row: PostgreSQL's predicate locks are per tuple, page or
// relation, and on a small table that the planner reads by a sequential
// scan (after ANALYZE) every transfer locks the whole relation.
//
//	cd cmd && go run ./ssiprobe -rows 8            # index scans
//	cd cmd && go run ./ssiprobe -rows 8 -analyze   # sequential scans
//	cd cmd && go run ./ssiprobe -rows 100000
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib"
)

func main() {
	rows := flag.Int("rows", 8, "rows in the table")
	analyze := flag.Bool("analyze", false, "ANALYZE first")
	dur := flag.Duration("d", 3*time.Second, "duration")
	pairs := flag.Int("pairs", 4, "workers, each on its own pair of hot rows")
	dsn := flag.String("dsn", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "PostgreSQL server")
	flag.Parse()
	db, err := sql.Open("pgx", *dsn)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	db.Exec("DROP TABLE IF EXISTS ssiprobe")
	must(db.Exec("CREATE TABLE ssiprobe (id int PRIMARY KEY, balance int NOT NULL)"))
	must(db.Exec("INSERT INTO ssiprobe SELECT g, 1000 FROM generate_series(1, $1) g", *rows))
	if *analyze {
		must(db.Exec("ANALYZE ssiprobe"))
	}
	// 2*pairs hot ids spread evenly over the table.
	hot := make([]int, 2**pairs)
	for i := range hot {
		hot[i] = 1 + i*(*rows/len(hot))
	}
	var commits, ser, other atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(*dur)
	for w := 0; w < *pairs; w++ {
		a, b := hot[2*w], hot[2*w+1]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(end); i++ {
				src, dst := a, b
				if i%2 == 1 {
					src, dst = b, a
				}
				err := func() error {
					tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelSerializable})
					if err != nil {
						return err
					}
					defer tx.Rollback()
					var bal int
					if err := tx.QueryRow("SELECT balance FROM ssiprobe WHERE id = $1", src).Scan(&bal); err != nil {
						return err
					}
					if _, err := tx.Exec("UPDATE ssiprobe SET balance = balance - 1 WHERE id = $1", src); err != nil {
						return err
					}
					if _, err := tx.Exec("UPDATE ssiprobe SET balance = balance + 1 WHERE id = $1", dst); err != nil {
						return err
					}
					return tx.Commit()
				}()
				var pe *pgconn.PgError
				switch {
				case err == nil:
					commits.Add(1)
				case errors.As(err, &pe) && pe.Code == "40001":
					ser.Add(1)
				default:
					other.Add(1)
					fmt.Println(err)
				}
			}
		}()
	}
	wg.Wait()
	var plan string
	db.QueryRow("EXPLAIN SELECT balance FROM ssiprobe WHERE id = 1").Scan(&plan)
	fmt.Printf("rows=%d analyze=%v pairs=%d: commits %d, 40001 %d (%.1f%% of attempts), other %d; plan now: %s\n",
		*rows, *analyze, *pairs, commits.Load(), ser.Load(), 100*float64(ser.Load())/float64(commits.Load()+ser.Load()), other.Load(), plan)
	db.Exec("DROP TABLE ssiprobe")
}

func must(_ sql.Result, err error) {
	if err != nil {
		panic(err)
	}
}
