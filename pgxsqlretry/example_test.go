package pgxsqlretry_test

import (
	"context"
	"database/sql"
	"log"

	_ "github.com/jackc/pgx/v5/stdlib" // registers "pgx"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/pgxsqlretry"
)

// The question sqlretry asks before COMMIT travels with the COMMIT: on a
// slow link a writing transaction takes no more round trips than through
// the plain driver.
func ExampleCommitInOneFlight() {
	db, err := sqlretry.Open("pgx", "postgres://app@db/app", pgxsqlretry.CommitInOneFlight())
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	err = sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "UPDATE account SET balance = balance - 10 WHERE id = 1")
		return err
	})
	if err != nil {
		log.Print(err) // errors.Is(err, sqlretry.ErrAmbiguousCommit): the reply was lost before the question's answer
	}
}
