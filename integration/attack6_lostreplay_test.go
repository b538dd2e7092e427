package integration

// Hostile tests (attack6): a lost COMMIT on a bounded replay (the attempt
// that carries the short lock wait statement), and on a transaction whose
// closure switched to an unprivileged role with SET LOCAL ROLE, so that the
// question before COMMIT runs as that role.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

func TestAttack6LostCommitOnBoundedReplay(t *testing.T) {
	base := needPrivate(t, "pgx")
	ensureProbe(t, base) // a5Setting reads the bound through it (run alone, no other test had made it)
	for _, mode := range []string{"simple_protocol", "cache_statement", "exec"} {
		for _, cut := range []int32{cutAfterSend, cutMidMessage} {
			t.Run(fmt.Sprintf("%s/cut%d", mode, cut), func(t *testing.T) {
				c := &cutter{isCommit: pgCommit}
				db := openCutPostgresAt(t, c, a5WithParam(base, "default_query_exec_mode="+mode), sqlretry.WithShortLockWait(true))
				defer db.Close()
				tbl := table(t, db, "a6br")
				mustExec(t, db, "CREATE TABLE "+tbl+" (op text, attempt int)")
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				defer cancel()
				calls := 0
				var lt []string
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					s, err := a5Setting(ctx, tx, "lock_timeout")
					if err != nil {
						return err
					}
					lt = append(lt, s)
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x', $1)", calls); err != nil {
						return err
					}
					switch calls {
					case 1:
						return a5FakeConflict(ctx, tx, "40001")
					case 2:
						c.mode.Store(cut)
					}
					return nil
				})
				c.mode.Store(0)
				var rows int
				db.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&rows)
				t.Logf("err=%v calls=%d rows=%d lock_timeout per attempt %v cut=%d", err, calls, rows, lt, c.fired.Load())
				if c.fired.Load() == 0 {
					t.Fatal("COMMIT not cut")
				}
				want := 2
				if cut == cutMidMessage {
					want = 3
				}
				if err != nil || calls != want || rows != 1 {
					t.Errorf("lost COMMIT of a bounded replay (%s): err=%v calls=%d rows=%d; want success, %d runs, 1 row", mode, err, calls, rows, want)
				}
			})
		}
	}
}

func TestAttack6LostCommitUnderSetLocalRole(t *testing.T) {
	base := needPrivate(t, "pgx")
	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	tbl := table(t, admin, "a6role")
	admin.Exec("CREATE ROLE a6_lowly NOLOGIN")
	mustExec(t, admin, "CREATE TABLE "+tbl+" (op text)", "GRANT ALL ON "+tbl+" TO a6_lowly")
	c := &cutter{isCommit: pgCommit}
	db := openCutPostgresAt(t, c, base, sqlretry.WithShortLockWait(true))
	defer db.Close()
	run := func(op string, cut int32) (calls, rows int, err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "SET LOCAL ROLE a6_lowly"); err != nil {
				return err
			}
			if calls == 1 {
				c.mode.Store(cut)
			}
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
			return err
		})
		c.mode.Store(0)
		admin.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op).Scan(&rows)
		return
	}
	for i := range 3 {
		calls, rows, err := run(fmt.Sprintf("warm-%d", i), 0)
		t.Logf("warm-up %d: err=%v calls=%d rows=%d", i, err, calls, rows)
		if err != nil || rows != 1 {
			t.Errorf("a transaction under SET LOCAL ROLE (no lost COMMIT): err=%v calls=%d rows=%d; want success, 1 row", err, calls, rows)
		}
	}
	calls, rows, err := run("after-send", cutAfterSend)
	t.Logf("after send: err=%v calls=%d rows=%d cut=%d", err, calls, rows, c.fired.Swap(0))
	if rows != 1 {
		t.Errorf("server committed under SET LOCAL ROLE: err=%v calls=%d rows=%d; never a second row", err, calls, rows)
	}
	if err != nil || calls != 1 {
		t.Errorf("server committed under SET LOCAL ROLE: err=%v calls=%d (ambiguous=%v); want it resolved as committed, 1 run", err, calls, errors.Is(err, sqlretry.ErrAmbiguousCommit))
	}
	calls, rows, err = run("mid", cutMidMessage)
	t.Logf("mid message: err=%v calls=%d rows=%d cut=%d", err, calls, rows, c.fired.Swap(0))
	if err != nil || rows != 1 {
		t.Errorf("COMMIT never arrived under SET LOCAL ROLE: err=%v calls=%d rows=%d; want a replay, 1 row", err, calls, rows)
	}
}
