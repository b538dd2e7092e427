package integration

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// Attack 5 (attack3): a transaction that sqlretry's reader might take for
// "only plain reads" is replayed after a lost COMMIT without asking. Each
// case below writes through a built-in (no function of the user's own,
// which the README says it cannot see); the COMMIT reaches the server and
// commits, its reply is lost. Right: the transaction is resolved
// (committed: one run). Wrong: a second run, a doubled write.
func TestAttack3HiddenWritesAreNotReplayedAsReads(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "hidden")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)", "CREATE SEQUENCE "+tbl+"_seq")
	los := "SELECT count(*) FROM pg_largeobject_metadata"
	rowsQ := "SELECT count(*) FROM " + tbl
	seqQ := "SELECT last_value FROM " + tbl + "_seq"
	cases := []struct {
		name  string
		stmts []string
		count string // how much was written
	}{
		{"explain analyze insert", []string{"EXPLAIN ANALYZE INSERT INTO " + tbl + " VALUES ('x')"}, rowsQ},
		{"explain (analyze) insert", []string{"EXPLAIN (ANALYZE, COSTS OFF) INSERT INTO " + tbl + " VALUES ('x')"}, rowsQ},
		{"explain analyze select nextval", []string{"EXPLAIN ANALYZE SELECT nextval('" + tbl + "_seq')"}, seqQ},
		{"lo_from_bytea", []string{"SELECT lo_from_bytea(0, 'x')"}, los},
		{"lo_create qualified", []string{"SELECT pg_catalog.lo_create(0)"}, los},
		{"lo_creat", []string{"SELECT lo_creat(-1)"}, los},
		{"lo_create in VALUES", []string{"VALUES (lo_create(0))"}, los},
		{"quoted nextval", []string{`SELECT "nextval"('` + tbl + `_seq')`}, seqQ},
		{"nextval with comment", []string{"SELECT nextval/**/('" + tbl + "_seq')"}, seqQ},
		{"prepare and execute", []string{"PREPARE a3p AS INSERT INTO " + tbl + " VALUES ('x')", "EXECUTE a3p"}, rowsQ},
		{"cursor over nextval", []string{"DECLARE a3c CURSOR FOR SELECT nextval('" + tbl + "_seq') FROM generate_series(1, 3)", "FETCH ALL FROM a3c"}, seqQ},
		{"cursor over lo_create", []string{"DECLARE a3c CURSOR FOR SELECT lo_create(0)", "FETCH ALL FROM a3c"}, los},
		{"select into", []string{"SELECT 1 AS n INTO a3_into_" + strings.TrimPrefix(tbl, "hidden_")}, "SELECT count(*) FROM pg_class WHERE relname LIKE 'a3_into_%'"},
		{"setval", []string{"SELECT setval('" + tbl + "_seq', (SELECT last_value + 1 FROM " + tbl + "_seq))"}, seqQ},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := &commitHook{after: func() {}}
			db := openHooked(t, h, srv.DSN)
			warmUp(t, db, tbl)
			var before, after int64
			if err := plain.QueryRow(c.count).Scan(&before); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			calls := 0
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if calls == 1 {
					h.armed.Store(true)
				}
				for _, s := range c.stmts {
					rows, err := tx.QueryContext(ctx, s)
					if err != nil {
						return err
					}
					for rows.Next() {
					}
					rows.Close()
					if err := rows.Err(); err != nil {
						return err
					}
				}
				return nil
			})
			h.armed.Store(false)
			if h.fired.Load() == 0 {
				t.Fatalf("the COMMIT was never cut (err %v)", err)
			}
			// Wait for the first run's commit to be visible (it is cut, the
			// server commits it on its own).
			time.Sleep(200 * time.Millisecond)
			if err := plain.QueryRow(c.count).Scan(&after); err != nil {
				t.Fatal(err)
			}
			t.Logf("calls %d, err %v, written %d", calls, err, after-before)
			if err == nil && calls > 1 {
				t.Errorf("DOUBLED WRITE: a committed transaction was run again (%d runs, %d written; want 1 run)", calls, after-before)
			}
			if err != nil && !errorsIsAmbiguous(err) {
				t.Errorf("unexpected error %v", err)
			}
		})
	}
}

func errorsIsAmbiguous(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "ambiguous") || errors.Is(err, sqlretry.ErrAmbiguousCommit))
}
