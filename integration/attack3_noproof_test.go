package integration

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// Attack 10 (attack3): a role that may not run pg_logical_emit_message
// (revoked from PUBLIC, as a hardened server may do). The README: sqlretry
// replays that transaction once, then asks without the proof. A plain
// BeginTx/Commit caller has no closure to replay: its transaction is
// aborted by the refused question; Commit must not report success for a
// write that is not there. No fault is injected at all. (Found: the first
// plain Commit that carries the proof on a fresh connection fails with
// the refusal, 42501, on a healthy server: an error, not a wrong answer.)
func TestAttack3ProofRefusedPlainCommit(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "noproof")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
		"REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
		"CREATE ROLE app3 LOGIN", "GRANT ALL ON "+tbl+" TO app3")
	dsn := strings.Replace(srv.DSN, "postgres@", "app3@", 1)
	db, err := sqlretry.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	db.SetMaxIdleConns(8)
	for i := 0; i < 4; i++ {
		// Plain transactions first, on several connections at once (each
		// connection's first transaction).
		txs := make([]*sql.Tx, 3)
		for j := range txs {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", fmt.Sprintf("plain-%d-%d", i, j)); err != nil {
				t.Fatal(err)
			}
			txs[j] = tx
		}
		for j, tx := range txs {
			op := fmt.Sprintf("plain-%d-%d", i, j)
			cerr := tx.Commit()
			rows := countRows(t, plain, tbl, op)
			t.Logf("BeginTx/Commit %d/%d: err %v, rows %d", i, j, cerr, rows)
			if cerr == nil && rows != 1 {
				t.Errorf("LOST WRITE: Commit returned nil, %d rows", rows)
			}
		}
		op := fmt.Sprintf("runintx-%d", i)
		calls := 0
		rerr := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
			return err
		})
		rows := countRows(t, plain, tbl, op)
		t.Logf("RunInTx %d: calls %d, err %v, rows %d", i, calls, rerr, rows)
		if rerr == nil && rows != 1 {
			t.Errorf("RunInTx: success with %d rows", rows)
		}
	}
}
