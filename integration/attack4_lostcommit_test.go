package integration

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// (1e) The marker's COMMIT reply is lost after odd closures (own COMMIT,
// own ROLLBACK + autocommit write, CALL of a writing procedure, a write by
// a function via DO). Never two rows; success only with the row there.
func TestAttack4MyLostMarkerCommitAfterOddClosures(t *testing.T) {
	plain := atkPlain(t, "mysql")
	db := atkOpenMy(t)
	tbl := atkName("a4lc")
	proc := atkName("a4lcp")
	fn := atkName("a4lcf")
	atkMust(t, plain,
		"CREATE TABLE "+tbl+" (id int AUTO_INCREMENT PRIMARY KEY, tag varchar(40)) ENGINE=InnoDB",
		"CREATE PROCEDURE "+proc+"(x varchar(40)) BEGIN INSERT INTO "+tbl+" (tag) VALUES (x); END",
		"CREATE FUNCTION "+fn+"(x varchar(40)) RETURNS int MODIFIES SQL DATA BEGIN INSERT INTO "+tbl+" (tag) VALUES (x); RETURN 1; END",
	)
	t.Cleanup(func() {
		plain.Exec("DROP TABLE IF EXISTS " + tbl)
		plain.Exec("DROP PROCEDURE IF EXISTS " + proc)
		plain.Exec("DROP FUNCTION IF EXISTS " + fn)
	})
	// warm up (marker table exists, connection info known)
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" (tag) VALUES ('warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]string{
		"plain":          {"INSERT INTO " + tbl + " (tag) VALUES ('plain')"},
		"owncommit":      {"INSERT INTO " + tbl + " (tag) VALUES ('owncommit')", "COMMIT", "INSERT INTO " + tbl + " (tag) VALUES ('owncommit')"},
		"ownrollback":    {"ROLLBACK", "INSERT INTO " + tbl + " (tag) VALUES ('ownrollback')"},
		"call":           {"CALL " + proc + "('call')"},
		"do":             {"DO " + fn + "('do')"},
		"startagain":     {"START TRANSACTION", "INSERT INTO " + tbl + " (tag) VALUES ('startagain')"},
		"setautocommit0": {"SET autocommit = 0", "INSERT INTO " + tbl + " (tag) VALUES ('setautocommit0')"},
	}
	want := map[string]int{"owncommit": 2}
	for name, qs := range cases {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			calls := 0
			atkMyCutter.mu.Lock()
			atkMyCutter.needle, atkMyCutter.wait = nil, 0
			atkMyCutter.mu.Unlock()
			before := atkMyCutter.cuts.Load()
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				for _, q := range qs {
					if _, err := tx.ExecContext(ctx, q); err != nil {
						return err
					}
				}
				if calls == 1 {
					atkMyCutter.mu.Lock()
					atkMyCutter.needle, atkMyCutter.wait = []byte("COMMIT"), 300*time.Millisecond
					atkMyCutter.mu.Unlock()
				}
				return nil
			})
			atkMyCutter.mu.Lock()
			atkMyCutter.needle = nil
			atkMyCutter.mu.Unlock()
			cuts := atkMyCutter.cuts.Load() - before
			var rows int
			plain.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE tag = ?", name).Scan(&rows)
			w := want[name]
			if w == 0 {
				w = 1
			}
			t.Logf("%s: cuts=%d calls=%d rows=%d (want %d) err=%v", name, cuts, calls, rows, w, err)
			switch {
			case rows > w:
				t.Errorf("DOUBLED: %d rows, want %d", rows, w)
			case err == nil && rows != w:
				t.Errorf("success reported, %d rows, want %d", rows, w)
			case err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit):
				t.Errorf("unexpected error: %v", err)
			}
		})
	}
}
