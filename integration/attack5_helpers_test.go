package integration

// Hostile tests of short lock waits (attack5), written from the README and
// go doc only.

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

// a5Open opens a sqlretry db on the PostgreSQL DSN d (extra DSN params
// appended), one connection unless conns says otherwise.
func a5Open(t *testing.T, d string, conns int, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	ensureProbe(t, d)
	cfg, err := pgx.ParseConfig(d)
	if err != nil {
		t.Fatal(err)
	}
	// Short lock waits on (off by default since attack8): these hostile
	// tests were written against them; a test's own option wins.
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg), append([]sqlretry.Option{sqlretry.WithShortLockWait(true)}, opts...)...)
	if conns > 0 {
		db.SetMaxOpenConns(conns)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func a5Plain(t *testing.T, d string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// a5WithParam appends a runtime parameter to a URL DSN.
func a5WithParam(d, kv string) string {
	if strings.Contains(d, "?") {
		return d + "&" + kv
	}
	return d + "?" + kv
}

// a5FakeConflict makes the server raise SQLSTATE code in the transaction
// (what a real serialization failure or deadlock looks like on the wire).
func a5FakeConflict(ctx context.Context, tx *sql.Tx, code string) error {
	_, err := tx.ExecContext(ctx, `DO $$BEGIN RAISE EXCEPTION 'attack5 fake conflict' USING ERRCODE = '`+code+`'; END$$`)
	return err
}

// a5FakeConflictFn is a5FakeConflict through a function (probe_test.go;
// the db opened with a5Open), not a DO block: a DO block is a touch of
// the bound's setting, after which sqlretry runs the attempt again
// unbounded and the later replays too (touchedRedo), where a test looks
// at the bounds of several replays.
func a5FakeConflictFn(ctx context.Context, tx *sql.Tx, code string) error {
	_, err := tx.ExecContext(ctx, "SELECT public."+probeRaise+"($1::text)", code)
	return err
}

func a5Setting(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, name string) (string, error) {
	if tx, ok := q.(*sql.Tx); ok {
		return probeSetting(ctx, tx, name) // in a closure: not a touch (probe_test.go)
	}
	var s string
	err := q.QueryRowContext(ctx, "SELECT current_setting('"+name+"')").Scan(&s)
	return s, err
}

// a5ReplaySeen runs one RunInTx whose first attempt fails with a fake
// serialization failure and whose later attempts record lock_timeout as
// the closure sees it; then body (if any) runs on the second attempt.
func a5ReplaySeen(t *testing.T, ctx context.Context, db *sql.DB, opts ...sqlretry.Option) (seen []string, attempts int, err error) {
	t.Helper()
	var n atomic.Int32
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		k := n.Add(1)
		s, err := a5Setting(ctx, tx, "lock_timeout")
		if err != nil {
			return err
		}
		seen = append(seen, s)
		if k == 1 {
			return a5FakeConflictFn(ctx, tx, "40001")
		}
		return nil
	}, opts...)
	return seen, int(n.Load()), err
}

func a5Ctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestAttack5Probe: the mechanism the other attacks rely on: a replay of a
// serialization failure is bounded (lock_timeout 20ms-ish on attempt 2).
func TestAttack5Probe(t *testing.T) {
	db := a5Open(t, atkPG, 1)
	seen, n, err := a5ReplaySeen(t, a5Ctx(t, 10*time.Second), db)
	t.Logf("attempts %d, lock_timeout seen %v, err %v", n, seen, err)
	if err != nil || n != 2 {
		t.Fatalf("err %v attempts %d", err, n)
	}
	if seen[1] == seen[0] {
		t.Fatalf("the replay was not bounded: %v", seen)
	}
}
