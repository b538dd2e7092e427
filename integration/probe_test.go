package integration

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// probeFunc reads lock_timeout (1) or deadlock_timeout (2) in the caller's
// transaction. A closure's statement that names a setting (SHOW,
// current_setting) is a touch: sqlretry runs a bounded attempt that ran
// one again unbounded (touchedRedo), and it would never see the bound.
// A function of the user's own is out of its sight, as the README says.
const probeFunc = "sqlretry_probe"

// probeRaise raises the SQLSTATE it is given: a fake conflict that is
// not a DO block.
const probeRaise = "sqlretry_probe_raise"

var probeMade sync.Map // dsn -> *sync.Once

// ensureProbe creates probeFunc on the PostgreSQL server at dsn, once per
// test process and server (under an advisory lock: tests create it on
// the shared server at the same time).
func ensureProbe(t testing.TB, dsn string) {
	t.Helper()
	once, _ := probeMade.LoadOrStore(dsn, new(sync.Once))
	once.(*sync.Once).Do(func() {
		// As the DSN's user, else (a role of a private server's test that
		// may not create in public) as the server's superusers.
		cfg, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		var last error
		for _, user := range []string{cfg.User, "root", "postgres"} {
			c := cfg.Copy()
			c.User = user
			if last = makeProbe(stdlib.OpenDB(*c)); last == nil {
				return
			}
			var pe *pgconn.PgError
			if errors.As(last, &pe) && pe.Code == "25006" {
				return // a standby: the primary's is replicated
			}
		}
		t.Fatalf("creating %s: %v", probeFunc, last)
	})
}

func makeProbe(db *sql.DB) error {
	defer db.Close()
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, q := range []string{"SELECT pg_advisory_xact_lock(730001)",
		"CREATE OR REPLACE FUNCTION public." + probeFunc + "(n int) RETURNS text LANGUAGE sql VOLATILE AS " +
			"$$ SELECT CASE n WHEN 1 THEN pg_catalog.current_setting('lock_timeout') ELSE pg_catalog.current_setting('deadlock_timeout') END $$",
		"GRANT EXECUTE ON FUNCTION public." + probeFunc + "(int) TO PUBLIC",
		"CREATE OR REPLACE FUNCTION public." + probeRaise + "(code text) RETURNS void LANGUAGE plpgsql AS " +
			"$$BEGIN RAISE EXCEPTION 'fake conflict' USING ERRCODE = code; END$$",
		"GRANT EXECUTE ON FUNCTION public." + probeRaise + "(text) TO PUBLIC"} {
		if _, err := tx.Exec(q); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// probeQuery is the statement that reads the setting name through
// probeFunc.
func probeQuery(name string) string {
	if name == "lock_timeout" {
		return "SELECT public." + probeFunc + "(1)"
	}
	return "SELECT public." + probeFunc + "(2)"
}

// probeSetting reads the setting name in tx, through probeFunc for the
// two the short waits bound.
func probeSetting(ctx context.Context, tx *sql.Tx, name string) (string, error) {
	q := "SELECT current_setting('" + name + "')"
	if name == "lock_timeout" || name == "deadlock_timeout" {
		q = probeQuery(name)
	}
	var s string
	err := tx.QueryRowContext(ctx, q).Scan(&s)
	return s, err
}

// isShortBound says whether s, a lock_timeout or deadlock_timeout a
// replay read (SHOW's text), is a bound of sqlretry's: shortWaitFactor (4)
// times a recent commit's duration, at least 20ms, under the server's
// deadlock_timeout (1s here). On a loaded machine a commit of more than
// 5 ms makes it 40ms or more (CI rehearsal 2026-12-02: "40ms" where a
// test wanted "20ms").
func isShortBound(s string) bool {
	d, err := time.ParseDuration(s)
	return err == nil && d >= 20*time.Millisecond && d < time.Second
}
