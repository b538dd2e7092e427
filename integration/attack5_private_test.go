package integration

import (
	"context"
	"database/sql"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// Role-, database- and server-level settings, a hostile search_path, a
// connection lost on the short-wait statements and a role that may not
// call set_config: on a private server of this test's own.
func TestAttack5PrivateServer(t *testing.T) {
	srv := ownServer(t, "pgx")
	admin := a5Plain(t, srv.DSN)
	as := func(user, db string) string {
		d := strings.Replace(srv.DSN, "postgres@", user+"@", 1)
		if db != "" {
			d = strings.Replace(d, "/postgres?", "/"+db+"?", 1)
		}
		return d
	}
	atkMust(t, admin,
		"CREATE ROLE a5low LOGIN", "ALTER ROLE a5low SET lock_timeout = '8ms'",
		"CREATE ROLE a5high LOGIN", "ALTER ROLE a5high SET lock_timeout = '2s'",
		"CREATE ROLE a5dl LOGIN", "ALTER ROLE a5dl SET deadlock_timeout = '15ms'",
		"CREATE ROLE a5dlhigh LOGIN", "ALTER ROLE a5dlhigh SET deadlock_timeout = '5s'",
		"CREATE ROLE a5app LOGIN",
		"CREATE DATABASE a5db", "ALTER DATABASE a5db SET lock_timeout = '11ms'",
	)
	replay := func(t *testing.T, d string) (seen []string, after string) {
		t.Helper()
		db := a5Open(t, d, 1)
		ctx := a5Ctx(t, 10*time.Second)
		seen, n, err := a5ReplaySeen(t, ctx, db)
		if err != nil || n != 2 {
			t.Fatalf("err %v attempts %d", err, n)
		}
		after, err = a5Setting(ctx, db, "lock_timeout")
		if err != nil {
			t.Fatal(err)
		}
		return seen, after
	}
	t.Run("role-lower", func(t *testing.T) {
		seen, after := replay(t, as("a5low", ""))
		if seen[1] != "8ms" || after != "8ms" {
			t.Errorf("DEFECT: ALTER ROLE SET lock_timeout='8ms': replay saw %s, after %s; want 8ms, 8ms", seen[1], after)
		}
	})
	t.Run("role-higher", func(t *testing.T) {
		seen, after := replay(t, as("a5high", ""))
		if !isShortBound(seen[1]) || after != "2s" {
			t.Errorf("role lock_timeout 2s: replay saw %s, after %s; want the bound (20ms or more), 2s", seen[1], after)
		}
	})
	t.Run("database", func(t *testing.T) {
		seen, after := replay(t, as("postgres", "a5db"))
		if seen[1] != "11ms" || after != "11ms" {
			t.Errorf("DEFECT: ALTER DATABASE SET lock_timeout='11ms': replay saw %s, after %s", seen[1], after)
		}
	})
	t.Run("role-deadlock_timeout-15ms", func(t *testing.T) {
		seen, _ := replay(t, as("a5dl", ""))
		if seen[1] != "0" {
			t.Errorf("DEFECT: role deadlock_timeout 15ms: the first bounded replay set lock_timeout %s (README: not set once it would reach deadlock_timeout)", seen[1])
		}
	})
	t.Run("role-deadlock_timeout-5s", func(t *testing.T) {
		seen, _ := replay(t, as("a5dlhigh", ""))
		if !isShortBound(seen[1]) {
			t.Errorf("role deadlock_timeout 5s: replay saw %s, want the bound (20ms or more)", seen[1])
		}
	})
	t.Run("alter-system-deadlock_timeout", func(t *testing.T) {
		atkMust(t, admin, "ALTER SYSTEM SET deadlock_timeout = '12ms'", "SELECT pg_reload_conf()")
		t.Cleanup(func() { admin.Exec("ALTER SYSTEM RESET deadlock_timeout"); admin.Exec("SELECT pg_reload_conf()") })
		time.Sleep(300 * time.Millisecond)
		seen, _ := replay(t, as("a5app", ""))
		if seen[1] != "0" {
			t.Errorf("DEFECT: server deadlock_timeout 12ms (ALTER SYSTEM): the first bounded replay set lock_timeout %s (README: not set once it would reach deadlock_timeout)", seen[1])
		}
	})
	// A schema ahead of pg_catalog on the search_path (the user's, or an
	// attacker's who may create functions there) with its own set_config
	// and current_setting: sqlretry's statement must still call the
	// server's, and never run the schema's functions.
	t.Run("search_path-shadow", func(t *testing.T) {
		atkMust(t, admin,
			"CREATE SCHEMA a5evil",
			"CREATE TABLE a5evil.calls (fn text)",
			`CREATE FUNCTION a5evil.set_config(text, text, boolean) RETURNS text LANGUAGE sql AS $$ INSERT INTO a5evil.calls VALUES ('set_config'); SELECT 'hijacked'::text $$`,
			`CREATE FUNCTION a5evil.current_setting(text) RETURNS text LANGUAGE sql AS $$ INSERT INTO a5evil.calls VALUES ('current_setting'); SELECT '0'::text $$`,
			`CREATE FUNCTION a5evil.current_setting(text, boolean) RETURNS text LANGUAGE sql AS $$ INSERT INTO a5evil.calls VALUES ('current_setting2'); SELECT '0'::text $$`,
		)
		db := a5Open(t, a5WithParam(srv.DSN, "search_path=a5evil,pg_catalog"), 1)
		ctx := a5Ctx(t, 10*time.Second)
		var n atomic.Int32
		var seen string
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			if n.Add(1) == 1 {
				return a5FakeConflict(ctx, tx, "40001")
			}
			return tx.QueryRowContext(ctx, probeQuery("lock_timeout")).Scan(&seen)
		})
		if err != nil {
			t.Fatal(err)
		}
		calls := atkCount(t, admin, "SELECT count(*) FROM a5evil.calls")
		if calls != 0 || !isShortBound(seen) {
			t.Errorf("DEFECT: search_path=a5evil,pg_catalog: sqlretry's short-wait statement called %d functions of schema a5evil (unqualified set_config/current_setting), bounded replay saw lock_timeout %q, want 20ms and no call", calls, seen)
		}
	})
	// The connection is cut right after the short-wait statement is sent:
	// a lost connection, not a refusal; the call commits and the feature
	// stays on for the db.
	t.Run("cut-on-statement", func(t *testing.T) {
		cfg, err := pgx.ParseConfig(srv.DSN)
		if err != nil {
			t.Fatal(err)
		}
		c := &atkCutter{}
		cfg.DialFunc = c.dial
		// Short lock waits on, as a5Open does (the replay's lock_timeout is
		// what the test reads). Their statements (SHOW, SET LOCAL) end in
		// the same comment, the needle.
		db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), sqlretry.WithShortLockWait(true))
		t.Cleanup(func() { db.Close() })
		db.SetMaxOpenConns(1)
		ctx := a5Ctx(t, 20*time.Second)
		c.mu.Lock()
		c.needle = []byte("/* sqlretry */")
		c.wait = 20 * time.Millisecond
		c.mu.Unlock()
		seen, n, err := a5ReplaySeen(t, ctx, db)
		t.Logf("cut: %d cuts, attempts %d, seen %v, err %v", c.cuts.Load(), n, seen, err)
		if c.cuts.Load() != 1 {
			t.Skipf("the needle never matched (statement not seen on the wire as expected)")
		}
		if err != nil {
			t.Fatalf("DEFECT: connection cut on the short-wait statement surfaced: %v", err)
		}
		seen, _, err = a5ReplaySeen(t, ctx, db)
		if err != nil || seen[1] == "0" {
			t.Errorf("DEFECT: after one connection lost on the short-wait statement, short waits are off for the db (replay saw %v, err %v)", seen, err)
		}
	})
	// A role that may not execute set_config (REVOKE from PUBLIC): the
	// bound's statements call no function (SHOW, SET LOCAL), so the replay
	// is bounded as for any role, the closure runs once per attempt, no
	// error. (When the bound was a SELECT of set_config, the db turned
	// short waits off and the replay ran without a bound.)
	t.Run("set_config-revoked", func(t *testing.T) {
		atkMust(t, admin, "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC")
		t.Cleanup(func() { admin.Exec("GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC") })
		db := a5Open(t, as("a5app", ""), 1)
		ctx := a5Ctx(t, 10*time.Second)
		for call := 1; call <= 3; call++ {
			seen, n, err := a5ReplaySeen(t, ctx, db)
			t.Logf("call %d: attempts %d seen %v err %v", call, n, seen, err)
			if err != nil || n != 2 || !isShortBound(seen[1]) {
				t.Errorf("DEFECT: set_config revoked, call %d: err %v, closure ran %d times (want 2), replay saw %v", call, err, n, seen)
			}
		}
		after, _ := a5Setting(ctx, db, "lock_timeout")
		if after != "0" {
			t.Errorf("after: %s", after)
		}
		st, _ := sqlretry.StatsOf(db)
		t.Logf("stats: %+v", st)
	})
}
