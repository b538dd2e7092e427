package integration

// Hostile tests (attack6), written from the README and go doc only: a lost
// COMMIT in every pgx query exec mode. The question before COMMIT now
// returns an xid8 and pg_lsn text parsed by the client; the text and binary
// formats and the simple protocol each deliver those values differently.

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

func TestAttack6LostCommitEveryExecMode(t *testing.T) {
	base := needPrivate(t, "pgx")
	for _, mode := range []string{"simple_protocol", "exec", "cache_describe", "describe_exec", "cache_statement"} {
		t.Run(mode, func(t *testing.T) {
			c := &cutter{isCommit: pgCommit}
			db := openCutPostgresAt(t, c, a5WithParam(base, "default_query_exec_mode="+mode))
			defer db.Close()
			// A few plain transactions first, so that the db knows the
			// server's version and asks with the proof (the first
			// transaction of a db asks without it).
			warm := table(t, db, "a6warm")
			mustExec(t, db, "CREATE TABLE "+warm+" (n int)")
			for range 3 {
				if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+warm+" VALUES ($1)", 1)
					return err
				}); err != nil {
					t.Fatalf("%s: warm-up transaction: %v", mode, err)
				}
			}
			calls, n, err := lostCommit(t, db, c, cutAfterSend, "$1")
			if err != nil || calls != 1 || n != 1 {
				t.Errorf("%s, server committed: err=%v calls=%d rows=%d; want success, 1 run, 1 row", mode, err, calls, n)
			}
			calls, n, err = lostCommit(t, db, c, cutMidMessage, "$1")
			if err != nil || calls != 2 || n != 1 {
				t.Errorf("%s, COMMIT never arrived: err=%v calls=%d rows=%d; want success after 1 replay, 1 row", mode, err, calls, n)
			}
			s, _ := sqlretry.StatsOf(db)
			if s.CommitsResolved != 2 || s.CommitsAmbiguous != 0 {
				t.Errorf("%s: resolved=%d ambiguous=%d, want 2 and 0", mode, s.CommitsResolved, s.CommitsAmbiguous)
			}
		})
	}
}

// TestAttack6LostCommitClosureSessionSettings: the closure changes settings
// that shape how values are written as text (TimeZone, DateStyle,
// IntervalStyle, extra_float_digits, bytea_output, search_path) with SET
// LOCAL or SET before the question runs; a COMMIT whose reply was lost must
// still be resolved as committed (1 run) and one cut mid-message replayed
// once, in the simple protocol (text results) and the default mode.
func TestAttack6LostCommitClosureSessionSettings(t *testing.T) {
	base := needPrivate(t, "pgx")
	sets := map[string]string{
		"timezone-datestyle-local": "SET LOCAL TimeZone = 'Pacific/Kiritimati'; SET LOCAL DateStyle = 'SQL, DMY'",
		"session-level":            "SET TimeZone = 'America/St_Johns'; SET DateStyle = 'German'; SET IntervalStyle = 'sql_standard'",
		"floats-bytea":             "SET LOCAL extra_float_digits = -15; SET LOCAL bytea_output = 'escape'",
		"search-path-empty":        "SET LOCAL search_path = ''",
		"lc-messages":              "SET LOCAL lc_messages = 'C'; SET LOCAL client_min_messages = 'debug5'",
	}
	for _, mode := range []string{"simple_protocol", "cache_statement"} {
		for name, set := range sets {
			t.Run(mode+"/"+name, func(t *testing.T) {
				c := &cutter{isCommit: pgCommit}
				db := openCutPostgresAt(t, c, a5WithParam(base, "default_query_exec_mode="+mode))
				defer db.Close()
				db.SetMaxOpenConns(2)
				tbl := table(t, db, "a6set")
				mustExec(t, db, "CREATE TABLE "+tbl+" (op text PRIMARY KEY)")
				run := func(op string, cut int32) (calls, rows int, err error) {
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					defer cancel()
					err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						calls++
						for _, q := range strings.Split(set, "; ") {
							if _, err := tx.ExecContext(ctx, q); err != nil {
								return err
							}
						}
						if calls == 1 {
							c.mode.Store(cut)
						}
						_, err := tx.ExecContext(ctx, "INSERT INTO public."+tbl+" VALUES ($1)", op)
						return err
					})
					c.mode.Store(0)
					if qerr := db.QueryRow("SELECT COUNT(*) FROM public."+tbl+" WHERE op = $1", op).Scan(&rows); qerr != nil {
						t.Fatal(qerr)
					}
					return calls, rows, err
				}
				for i := range 3 { // the db learns the server's version
					if _, _, err := run(fmt.Sprintf("warm-%d", i), 0); err != nil {
						t.Fatalf("warm-up: %v", err)
					}
				}
				calls, n, err := run("after-send", cutAfterSend)
				if c.fired.Swap(0) == 0 {
					t.Fatal("COMMIT not cut")
				}
				if err != nil || calls != 1 || n != 1 {
					t.Errorf("server committed: err=%v calls=%d rows=%d; want success, 1 run, 1 row", err, calls, n)
				}
				calls, n, err = run("mid-message", cutMidMessage)
				if c.fired.Swap(0) == 0 {
					t.Fatal("COMMIT not cut")
				}
				if err != nil || calls != 2 || n != 1 {
					t.Errorf("COMMIT never arrived: err=%v calls=%d rows=%d; want 1 replay, 1 row", err, calls, n)
				}
			})
		}
	}
}
