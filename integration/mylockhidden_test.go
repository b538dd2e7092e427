package integration

import (
	"context"
	"database/sql"
	"testing"
	"time"
)

// A closure that locks tables through text sqlretry cannot read (the LOCK
// TABLES or FLUSH ... WITH READ LOCK comes from a user variable, run by
// EXECUTE IMMEDIATE or PREPARE/EXECUTE): the plain driver commits; the
// commit marker's INSERT is refused with 1100 (not locked with LOCK
// TABLES) or 1223 (a read lock is held), and the transaction must commit
// without its marker, as it does when the marker table is missing (1146),
// not fail.
func TestMySQLHiddenTableLockCommitsWithoutMarker(t *testing.T) {
	for _, tc := range []struct{ name, lock string }{
		{"lock-tables-immediate", "EXECUTE IMMEDIATE @s"},
		{"lock-tables-prepared", "PREPARE s FROM @s; EXECUTE s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			db.SetMaxOpenConns(1)
			body := func(ctx context.Context, tx *sql.Tx, op string) error {
				if _, err := tx.ExecContext(ctx, "SET @s = CONCAT('LOCK TABLES ', ?, ' WRITE')", tbl); err != nil {
					return err
				}
				for _, q := range splitStatements(tc.lock) {
					if _, err := tx.ExecContext(ctx, q); err != nil {
						return err
					}
				}
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op)
				return err
			}
			// The plain driver commits.
			{
				pc, err := plain.Conn(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				tx, err := pc.BeginTx(context.Background(), nil)
				if err != nil {
					t.Fatal(err)
				}
				berr := body(context.Background(), tx, "plain")
				cerr := tx.Commit()
				pc.ExecContext(context.Background(), "UNLOCK TABLES")
				pc.Close()
				if berr != nil || cerr != nil {
					t.Fatalf("the plain driver: body=%v commit=%v", berr, cerr)
				}
			}
			calls, err := a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				return body(ctx, tx, "hidden")
			})
			if _, uerr := db.ExecContext(a5Ctx(t, 5*time.Second), "UNLOCK TABLES"); uerr != nil {
				t.Logf("UNLOCK TABLES: %v", uerr)
			}
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'hidden'")
			if err != nil || rows != 1 || calls != 1 {
				t.Errorf("err=%v calls=%d rows=%d; the plain driver commits once with no error", err, calls, rows)
			}
		})
	}
}

func splitStatements(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == ';' {
			out = append(out, s[start:i])
			start = i + 2
		}
	}
	return append(out, s[start:])
}
