package sqlretry_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry"
)

// The one-line change: sqlretry.Open instead of sql.Open.
func ExampleOpen() {
	db, err := sqlretry.Open("pgx", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil {
		fmt.Println("no database here:", err != nil)
		return
	}
	fmt.Println(one)
}

// A transfer that sqlretry replays on serialization failures and deadlocks.
// The closure must do nothing outside the transaction that cannot repeat.
func ExampleRunInTx() {
	db, err := sqlretry.Open("pgx", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = sqlretry.RunInTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable},
		func(ctx context.Context, tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - 10 WHERE id = 1"); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance + 10 WHERE id = 2")
			return err
		})
	switch {
	case errors.Is(err, sqlretry.ErrAmbiguousCommit):
		log.Print("the transfer may or may not have happened: reconcile before retrying")
	case errors.Is(err, sqlretry.ErrCircuitOpen):
		log.Print("the database is down: failing fast")
	case err != nil:
		log.Print(err)
	}
}

// Register a wrapped driver under a new name, for code that calls sql.Open.
func ExampleRegister() {
	if err := sqlretry.Register("pgx+retry", stdlib.GetDefaultDriver(), sqlretry.WithMaxAttempts(5)); err != nil {
		log.Fatal(err)
	}
	db, err := sql.Open("pgx+retry", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
}

// Wrap a connector, here go-sql-driver/mysql's, with a logger and the
// opt-in resolution of lost COMMITs on MySQL.
func ExampleOpenDB() {
	cfg := mysql.NewConfig()
	cfg.User, cfg.Net, cfg.Addr, cfg.DBName = "root", "tcp", "127.0.0.1:3306", "test"
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		log.Fatal(err)
	}
	db := sqlretry.OpenDB(connector,
		sqlretry.WithObserver(sqlretry.SlogObserver(slog.New(slog.NewTextHandler(os.Stderr, nil)))),
		sqlretry.WithMySQLCommitMarker("sqlretry_commit_marker"))
	defer db.Close()
	stats, _ := sqlretry.StatsOf(db)
	fmt.Println(stats.Breaker)
	// Output: closed
}
