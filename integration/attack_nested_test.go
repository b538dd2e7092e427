package integration

import (
	"context"
	"database/sql"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// README: "If it runs COMMIT, ... or a nested RunInTx committed, part of its
// work may already be committed, so RunInTx never replays that attempt".
// The nested RunInTx commits its own transaction; then the outer transaction
// hits a serialization failure. A replay would commit the inner write twice.
func TestAttackPGNestedCommittedThenOuterConflict(t *testing.T) {
	plain := atkPlain(t, "pgx")
	for _, which := range []string{"same-db", "other-sqlretry-db", "plain-db", "same-db-own-ctx", "same-db-closure-ctx-other-goroutine", "other-sqlretry-db-own-ctx"} {
		t.Run(which, func(t *testing.T) {
			T := atkName("atk_ne")
			sub := func(s string) string { return strings.ReplaceAll(s, "{T}", T) }
			atkMust(t, plain, sub("CREATE TABLE {T} (id serial PRIMARY KEY, who text)"),
				sub(`CREATE FUNCTION {T}_conflict() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END $$`))
			t.Cleanup(func() { plain.Exec(sub("DROP TABLE {T}")); plain.Exec(sub("DROP FUNCTION {T}_conflict")) })
			db := atkOpenPG(t, nil)
			inner := db
			switch which {
			case "other-sqlretry-db", "other-sqlretry-db-own-ctx":
				inner = atkOpenPG(t, nil)
			case "plain-db":
				inner = plain
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			var runs atomic.Int32
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				r := runs.Add(1)
				if _, err := tx.ExecContext(ctx, sub("INSERT INTO {T}(who) VALUES ('outer')")); err != nil {
					return err
				}
				ictx := ctx
				if strings.HasSuffix(which, "own-ctx") {
					ictx = context.Background()
				}
				innerFn := func() error {
					return sqlretry.RunInTx(ictx, inner, nil, func(ctx context.Context, tx2 *sql.Tx) error {
						_, err := tx2.ExecContext(ctx, sub("INSERT INTO {T}(who) VALUES ('inner')"))
						return err
					})
				}
				var ierr error
				if strings.Contains(which, "other-goroutine") {
					ch := make(chan error)
					go func() { ch <- innerFn() }()
					ierr = <-ch
				} else {
					ierr = innerFn()
				}
				if ierr != nil {
					return ierr
				}
				if r == 1 {
					_, err := tx.ExecContext(ctx, sub("SELECT {T}_conflict()"))
					return err
				}
				return nil
			})
			inner1 := atkCount(t, plain, sub("SELECT count(*) FROM {T} WHERE who = 'inner'"))
			t.Logf("runs=%d inner rows=%d err=%v", runs.Load(), inner1, err)
			if inner1 > 1 {
				t.Errorf("DUPLICATE: the nested RunInTx committed, the outer was replayed after a conflict, and the inner write committed %d times", inner1)
			}
		})
	}
}

// The same with a real deadlock (40P01) instead of a raised 40001.
func TestAttackPGNestedOwnCtxRealDeadlockIsNotReplayed(t *testing.T) {
	plain := atkPlain(t, "pgx")
	T := atkName("atk_ne2")
	sub := func(s string) string { return strings.ReplaceAll(s, "{T}", T) }
	atkMust(t, plain, sub("CREATE TABLE {T} (id int PRIMARY KEY, v int)"), sub("INSERT INTO {T} VALUES (1,0),(2,0)"),
		sub("CREATE TABLE {T}_log (id serial PRIMARY KEY, who text)"))
	t.Cleanup(func() { plain.Exec(sub("DROP TABLE {T}, {T}_log")) })
	db := atkOpenPG(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var runs atomic.Int32
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		r := runs.Add(1)
		// an audit record in its own transaction, on the same db, own context
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
			_, err := tx2.ExecContext(ctx, sub("INSERT INTO {T}_log(who) VALUES ('audit')"))
			return err
		}); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, sub("UPDATE {T} SET v = v + 1 WHERE id = 1")); err != nil {
			return err
		}
		if r == 1 {
			other, _ := plain.BeginTx(ctx, nil)
			other.Exec(sub("UPDATE {T} SET v = v + 1 WHERE id = 2"))
			done := make(chan struct{})
			go func() {
				defer close(done)
				time.Sleep(200 * time.Millisecond)
				other.Exec(sub("UPDATE {T} SET v = v + 1 WHERE id = 1"))
				other.Commit()
			}()
			_, err := tx.ExecContext(ctx, sub("UPDATE {T} SET v = v + 1 WHERE id = 2"))
			if err != nil {
				go func() { <-done }()
				return err
			}
			<-done
		}
		return nil
	})
	n := atkCount(t, plain, sub("SELECT count(*) FROM {T}_log"))
	t.Logf("runs=%d audit rows=%d err=%v", runs.Load(), n, err)
	if n > 1 {
		t.Errorf("DUPLICATE: nested RunInTx (own context, same goroutine) committed, the outer was replayed after a deadlock: %d audit rows", n)
	}
}

// MariaDB: the same with a real deadlock (1213).
func TestAttackMyNestedOwnCtxRealDeadlockIsNotReplayed(t *testing.T) {
	plain := atkPlain(t, "mysql")
	T := atkName("atk_mne")
	sub := func(s string) string { return strings.ReplaceAll(s, "{T}", T) }
	atkMust(t, plain, sub("CREATE TABLE {T} (id int PRIMARY KEY, v int) ENGINE=InnoDB"), sub("INSERT INTO {T} VALUES (1,0),(2,0)"),
		sub("CREATE TABLE {T}_log (id int AUTO_INCREMENT PRIMARY KEY, who varchar(10)) ENGINE=InnoDB"),
		sub("CREATE TABLE {T}_bulk (id int PRIMARY KEY) ENGINE=InnoDB"))
	t.Cleanup(func() { plain.Exec(sub("DROP TABLE {T}, {T}_log, {T}_bulk")) })
	db := atkOpenMy(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var runs atomic.Int32
	err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		r := runs.Add(1)
		if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx2 *sql.Tx) error {
			_, err := tx2.ExecContext(ctx, sub("INSERT INTO {T}_log(who) VALUES ('audit')"))
			return err
		}); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, sub("UPDATE {T} SET v = v + 1 WHERE id = 1")); err != nil {
			return err
		}
		if r == 1 {
			other, _ := plain.BeginTx(ctx, nil)
			other.Exec(sub("INSERT INTO {T}_bulk SELECT seq FROM seq_1_to_2000"))
			other.Exec(sub("UPDATE {T} SET v = v + 1 WHERE id = 2"))
			done := make(chan struct{})
			go func() {
				defer close(done)
				time.Sleep(300 * time.Millisecond)
				other.Exec(sub("UPDATE {T} SET v = v + 1 WHERE id = 1"))
				time.Sleep(100 * time.Millisecond)
				other.Rollback()
			}()
			_, err := tx.ExecContext(ctx, sub("UPDATE {T} SET v = v + 1 WHERE id = 2"))
			<-done
			return err
		}
		return nil
	})
	n := atkCount(t, plain, sub("SELECT count(*) FROM {T}_log"))
	t.Logf("runs=%d audit rows=%d err=%v", runs.Load(), n, err)
	if n > 1 {
		t.Errorf("DUPLICATE: nested RunInTx (own context, same goroutine) committed, the outer was replayed after a deadlock: %d audit rows", n)
	}
}
