package integration

// Hostile tests (attack10), written from the README and the public API only.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

func a10Defect(t *testing.T) {
	t.Helper()
	if os.Getenv("ATTACK10_DEFECTS") != "1" {
		t.Skip("known defect; run with ATTACK10_DEFECTS=1")
	}
}

// a10Hold: another session locks row id 1 of tbl and holds it for d.
func a10Hold(t *testing.T, plain *sql.DB, tbl string, d time.Duration) {
	t.Helper()
	ctx := context.Background()
	tx, err := plain.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("SELECT 1 FROM " + tbl + " WHERE id = 1 FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(d); tx.Commit() }()
}

func a10Is55P03(err error) bool { return err != nil && strings.Contains(err.Error(), "55P03") }

// PostgreSQL, short lock waits on: attempt 1 meets a deadlock (40P01),
// attempt 2 (bounded) waits on a row another session holds for 400 ms, and
// the closure handles a lock timeout its own way. The plain driver would
// wait and write "done": a committed "busy" or a surfaced 55P03 is a defect.
func TestAttack10PGBoundAfterDeadlockHandled(t *testing.T) {
	modes := []string{"savepoint", "ownerr", "selfcommit", "selfrollback", "panic", "setiso", "userlocal5s", "setiso+savepoint"}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			if mode == "panic" {
				a10Defect(t)
			}
			plain := a5Plain(t, atkPG)
			tbl, lg := atkName("a10t"), atkName("a10l")
			atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key)", "INSERT INTO "+tbl+" VALUES (1)", "CREATE TABLE "+lg+" (op text)")
			t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl + ", " + lg) })
			db := a5Open(t, atkPG, 2)
			calls, saw55 := 0, 0
			var panicked any
			err := func() (err error) {
				defer func() { panicked = recover() }()
				return sqlretry.RunInTx(a5Ctx(t, 15*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					if strings.HasPrefix(mode, "setiso") {
						if _, err := tx.ExecContext(ctx, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"); err != nil {
							return err
						}
					}
					if mode == "userlocal5s" {
						if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '5s'"); err != nil {
							return err
						}
					}
					if calls == 1 {
						return a5FakeConflict(ctx, tx, "40P01")
					}
					if calls == 2 {
						a10Hold(t, plain, tbl, 400*time.Millisecond)
					}
					sp := mode == "savepoint" || mode == "setiso+savepoint"
					if sp {
						if _, err := tx.ExecContext(ctx, "SAVEPOINT s"); err != nil {
							return err
						}
					}
					_, err := tx.ExecContext(ctx, "SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE")
					if a10Is55P03(err) {
						saw55++
						switch {
						case sp:
							if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
								return err
							}
							_, err := tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('busy')")
							return err
						case mode == "ownerr":
							return errors.New("busy, try later")
						case mode == "selfcommit":
							return tx.Commit()
						case mode == "selfrollback":
							return tx.Rollback()
						case mode == "panic":
							panic("busy")
						}
						return err
					}
					if err != nil {
						return err
					}
					_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('done')")
					return err
				})
			}()
			busy := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'busy'")
			done := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'done'")
			t.Logf("mode=%s err=%v panic=%v calls=%d saw55P03=%d busy=%d done=%d", mode, err, panicked, calls, saw55, busy, done)
			if panicked != nil {
				t.Errorf("a panic on a bound the user did not configure reached the caller: %v", panicked)
			}
			if err != nil {
				t.Errorf("error the plain driver would not give: %v", err)
			}
			if busy != 0 || done != 1 {
				t.Errorf("busy=%d done=%d, want 0 and 1", busy, done)
			}
		})
	}
}

// The user's own short SET LOCAL lock_timeout: their 55P03 is theirs, the
// "busy" branch commits as with the plain driver.
func TestAttack10PGUserLocalShortIsTheirs(t *testing.T) {
	plain := a5Plain(t, atkPG)
	tbl, lg := atkName("a10t"), atkName("a10l")
	atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key)", "INSERT INTO "+tbl+" VALUES (1)", "CREATE TABLE "+lg+" (op text)")
	t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl + ", " + lg) })
	db := a5Open(t, atkPG, 2)
	calls := 0
	err := sqlretry.RunInTx(a5Ctx(t, 15*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			return a5FakeConflict(ctx, tx, "40P01")
		}
		if _, err := tx.ExecContext(ctx, "SET LOCAL lock_timeout = '50ms'"); err != nil {
			return err
		}
		if calls == 2 {
			a10Hold(t, plain, tbl, 1500*time.Millisecond)
		}
		tx.ExecContext(ctx, "SAVEPOINT s")
		_, err := tx.ExecContext(ctx, "SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE")
		if a10Is55P03(err) {
			tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s")
			_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('busy')")
			return err
		}
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('done')")
		return err
	})
	busy := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'busy'")
	done := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'done'")
	t.Logf("err=%v calls=%d busy=%d done=%d", err, calls, busy, done)
	if err != nil || busy+done != 1 {
		t.Errorf("err=%v busy=%d done=%d", err, busy, done)
	}
}

// MariaDB marker confusion with a lost COMMIT reply.
func TestAttack10MyMarkerConfusion(t *testing.T) {
	type tc struct {
		name, params string
		shared       bool
		cut          int32
		sentinel     string // SQL run by an admin (plain) inside the closure; %s = marker table
		lock         bool
	}
	cases := []tc{
		{name: "shared/after", shared: true, cut: cutAfterSend},
		{name: "shared/mid", shared: true, cut: cutMidMessage},
		{name: "shared-sentinel-deleted/after", shared: true, cut: cutAfterSend, sentinel: "DELETE FROM %s WHERE token LIKE 'sqlretry:%%'"},
		{name: "shared-sentinel-deleted/mid", shared: true, cut: cutMidMessage, sentinel: "DELETE FROM %s WHERE token LIKE 'sqlretry:%%'"},
		{name: "sentinel-deleted/after", cut: cutAfterSend, sentinel: "DELETE FROM %s WHERE token LIKE 'sqlretry:%%'"},
		{name: "sentinel-deleted/mid", cut: cutMidMessage, sentinel: "DELETE FROM %s WHERE token LIKE 'sqlretry:%%'"},
		{name: "sentinel-altered/after", cut: cutAfterSend, sentinel: "UPDATE %s SET token = CONCAT(LEFT(token, CHAR_LENGTH(token)-1), IF(RIGHT(token,1)='z','y','z')) WHERE token LIKE 'sqlretry:%%'"},
		{name: "sentinel-altered/mid", cut: cutMidMessage, sentinel: "UPDATE %s SET token = CONCAT(LEFT(token, CHAR_LENGTH(token)-1), IF(RIGHT(token,1)='z','y','z')) WHERE token LIKE 'sqlretry:%%'"},
		{name: "autocommit0/after", params: "parseTime=true&multiStatements=true&autocommit=0", cut: cutAfterSend},
		{name: "autocommit0/mid", params: "parseTime=true&multiStatements=true&autocommit=0", cut: cutMidMessage},
		{name: "autocommit0-sentinel-deleted/mid", params: "parseTime=true&multiStatements=true&autocommit=0", cut: cutMidMessage, sentinel: "DELETE FROM %s WHERE token LIKE 'sqlretry:%%'"},
		{name: "locktables-unlock/after", cut: cutAfterSend, lock: true},
		{name: "locktables-unlock/mid", cut: cutMidMessage, lock: true},
	}
	for _, k := range cases {
		t.Run(k.name, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			var opts []sqlretry.Option
			marker := ""
			if k.shared {
				p := atkPlain(t, "mysql")
				sdb := atkName("a10s")
				atkMust(t, p, "CREATE DATABASE "+sdb)
				t.Cleanup(func() { p.Exec("DROP DATABASE IF EXISTS " + sdb) })
				marker = sdb + ".sqlretry_commit_marker"
				opts = append(opts, sqlretry.WithMySQLCommitMarker(marker))
				// a second db shares the table
				c2 := &cutter{isCommit: mysqlCommit}
				a9MyDB(t, c2, "", opts...)
			}
			db, plain, dbName, tbl := a9MyDB(t, c, k.params, opts...)
			if marker == "" {
				marker = dbName + ".sqlretry_commit_marker"
			}
			calls, err := a9Run(t, db, c, k.cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				if k.lock {
					if _, err := tx.ExecContext(ctx, "LOCK TABLES "+tbl+" WRITE"); err != nil {
						return err
					}
				}
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')"); err != nil {
					return err
				}
				if k.lock {
					if _, err := tx.ExecContext(ctx, "UNLOCK TABLES"); err != nil {
						return err
					}
				}
				if calls == 1 && k.sentinel != "" {
					if _, err := plain.ExecContext(ctx, fmt.Sprintf(k.sentinel, marker)); err != nil {
						return fmt.Errorf("admin: %w", err)
					}
				}
				return nil
			})
			rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'x'")
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", k.name, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatal("COMMIT not cut")
			}
			a9Outcome(t, k.name, err, calls, rows)
			// and the db still works afterwards
			err2 := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('y')")
				return err
			})
			if err2 != nil || a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'y'") != 1 {
				t.Errorf("next transaction: %v", err2)
			}
		})
	}
}

// A deadlock in one call of the db, then, within 2 s, another transaction
// of the same db that waits 400 ms on a row: as a fresh RunInTx handling
// the 55P03 with a savepoint, as a plain db.BeginTx transaction, as an
// autocommit db.Exec. The plain driver waits and succeeds.
func TestAttack10PGWindowAfterDeadlock(t *testing.T) {
	for _, mode := range []string{"runintx-savepoint", "begintx", "exec"} {
		t.Run(mode, func(t *testing.T) {
			plain := a5Plain(t, atkPG)
			tbl, lg := atkName("a10t"), atkName("a10l")
			atkMust(t, plain, "CREATE TABLE "+tbl+" (id int primary key)", "INSERT INTO "+tbl+" VALUES (1)", "CREATE TABLE "+lg+" (op text)")
			t.Cleanup(func() { plain.Exec("DROP TABLE " + tbl + ", " + lg) })
			db := a5Open(t, atkPG, 2)
			ctx := a5Ctx(t, 15*time.Second)
			n := 0
			if err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				n++
				if n == 1 {
					return a5FakeConflict(ctx, tx, "40P01")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			a10Hold(t, plain, tbl, 400*time.Millisecond)
			var err error
			calls := 0
			switch mode {
			case "runintx-savepoint":
				err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					tx.ExecContext(ctx, "SAVEPOINT s")
					_, err := tx.ExecContext(ctx, "SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE")
					if a10Is55P03(err) {
						tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT s")
						_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('busy')")
						return err
					}
					if err != nil {
						return err
					}
					_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('done')")
					return err
				})
			case "begintx":
				var tx *sql.Tx
				tx, err = db.BeginTx(ctx, nil)
				if err == nil {
					_, err = tx.ExecContext(ctx, "SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE")
					if err == nil {
						_, err = tx.ExecContext(ctx, "INSERT INTO "+lg+" VALUES ('done')")
					}
					if err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback()
					}
				}
			case "exec":
				_, err = db.ExecContext(ctx, "WITH l AS (SELECT 1 FROM "+tbl+" WHERE id = 1 FOR UPDATE) INSERT INTO "+lg+" SELECT 'done' FROM l")
			}
			busy := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'busy'")
			done := a7Count(t, plain, "SELECT count(*) FROM "+lg+" WHERE op = 'done'")
			t.Logf("mode=%s err=%v calls=%d busy=%d done=%d", mode, err, calls, busy, done)
			if err != nil || busy != 0 || done != 1 {
				t.Errorf("err=%v busy=%d done=%d, want nil 0 1", err, busy, done)
			}
		})
	}
}

// Two dbs share one marker table; the first to use it (creating it and
// its sentinel) has autocommit=0 in its DSN. Then the other's COMMIT reply
// is lost. The sentinel must be committed (visible to others), and the
// second db's lost COMMIT resolved without a replay; each db's next
// transaction must work.
func TestAttack10MySharedMarkerAutocommit0First(t *testing.T) {
	for _, cut := range []int32{cutAfterSend, cutMidMessage} {
		t.Run(fmt.Sprint(cut), func(t *testing.T) {
			p := atkPlain(t, "mysql")
			sdb := atkName("a10s")
			atkMust(t, p, "CREATE DATABASE "+sdb)
			t.Cleanup(func() { p.Exec("DROP DATABASE IF EXISTS " + sdb) })
			marker := sdb + ".sqlretry_commit_marker"
			opts := []sqlretry.Option{sqlretry.WithMySQLCommitMarker(marker)}
			c2 := &cutter{isCommit: mysqlCommit}
			db2, _, _, tbl2 := a9MyDB(t, c2, "parseTime=true&multiStatements=true&autocommit=0", opts...)
			var sentinels int
			p.QueryRow("SELECT COUNT(*) FROM " + marker + " WHERE token LIKE 'sqlretry:%'").Scan(&sentinels)
			t.Logf("sentinels visible to another session after the autocommit=0 db's check: %d", sentinels)
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "", opts...)
			calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')")
				return err
			})
			rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'x'")
			t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatal("COMMIT not cut")
			}
			a9Outcome(t, "shared autocommit=0", err, calls, rows)
			for i, d := range []*sql.DB{db, db2} {
				tb := []string{tbl, tbl2}[i]
				if err := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), d, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tb+" VALUES ('y')")
					return err
				}); err != nil {
					t.Errorf("db%d next transaction: %v", i+1, err)
				}
			}
		})
	}
}

// a10Conn: when armed, the next COMMIT write is delivered whole, the
// socket closed, and hook run before the driver sees anything.
type a10Conn struct {
	net.Conn
	armed *atomic.Bool
	fired *atomic.Int32
	hook  func()
}

func (cc *a10Conn) Write(p []byte) (int, error) {
	if mysqlCommit(p) && cc.armed.Swap(false) {
		n, err := cc.Conn.Write(p)
		time.Sleep(50 * time.Millisecond)
		cc.Conn.Close()
		cc.fired.Add(1)
		if cc.hook != nil {
			cc.hook()
		}
		return n, err
	}
	return cc.Conn.Write(p)
}

// Two dbs share one marker table. db1's COMMIT reply is lost; before its
// lookup, db2 runs many writing transactions (its marker rows and their
// clean-up), after a pause that ages db1's marker row. db1 must not replay.
func TestAttack10MySharedMarkerOtherDbCleansUp(t *testing.T) {
	for _, pause := range []time.Duration{0, 2 * time.Second} {
		t.Run(pause.String(), func(t *testing.T) {
			p := atkPlain(t, "mysql")
			sdb := atkName("a10s")
			atkMust(t, p, "CREATE DATABASE "+sdb)
			t.Cleanup(func() { p.Exec("DROP DATABASE IF EXISTS " + sdb) })
			marker := sdb + ".sqlretry_commit_marker"
			opts := []sqlretry.Option{sqlretry.WithMySQLCommitMarker(marker)}
			c2 := &cutter{isCommit: mysqlCommit}
			db2, _, _, tbl2 := a9MyDB(t, c2, "", opts...)
			var armed atomic.Bool
			var fired atomic.Int32
			hook := func() {
				time.Sleep(pause)
				for i := 0; i < 200; i++ {
					if err := sqlretry.RunInTx(context.Background(), db2, nil, func(ctx context.Context, tx *sql.Tx) error {
						_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl2+" VALUES ('z')")
						return err
					}); err != nil {
						t.Errorf("db2: %v", err)
						return
					}
				}
				var n int
				p.QueryRow("SELECT COUNT(*) FROM " + marker).Scan(&n)
				t.Logf("marker rows after db2's 200 transactions: %d", n)
			}
			plain := p
			dbName := atkName("a10")
			atkMust(t, plain, "CREATE DATABASE "+dbName)
			t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
			tbl := dbName + ".w"
			atkMust(t, plain, "CREATE TABLE "+tbl+" (op varchar(40)) ENGINE=InnoDB")
			netName := atkName("a10net")
			mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) {
				conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				if err != nil {
					return nil, err
				}
				return &a10Conn{Conn: conn, armed: &armed, fired: &fired, hook: hook}, nil
			})
			t.Cleanup(func() { mysql.DeregisterDialContext(netName) })
			cfg, err := mysql.ParseDSN("root@" + netName + "(127.0.0.1:3306)/" + dbName + "?parseTime=true&multiStatements=true")
			if err != nil {
				t.Fatal(err)
			}
			conn, err := mysql.NewConnector(cfg)
			if err != nil {
				t.Fatal(err)
			}
			db := sqlretry.OpenDB(conn, opts...)
			t.Cleanup(func() { db.Close() })
			calls := 0
			err = sqlretry.RunInTx(a5Ctx(t, 30*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')"); err != nil {
					return err
				}
				if calls == 1 {
					armed.Store(true)
				}
				return nil
			})
			armed.Store(false)
			rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'x'")
			t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, fired.Load())
			if fired.Load() == 0 {
				t.Fatal("COMMIT not cut")
			}
			a9Outcome(t, "shared, other db cleans up", err, calls, rows)
		})
	}
}

// LOCK TABLES in the closure, spelled in ways a text check may miss, no
// UNLOCK (the plain driver commits). Then with the COMMIT reply lost.
func TestAttack10MyLockTablesSpellings(t *testing.T) {
	spellings := map[string]string{
		"singular":          "LOCK TABLE %s WRITE",
		"comment":           "/* hi */ LOCK TABLES %s WRITE",
		"multi":             "SELECT 1; LOCK TABLES %s WRITE",
		"execute-immediate": "EXECUTE IMMEDIATE 'LOCK TABLES %s WRITE'",
		"prepared":          "PREPARE s FROM 'LOCK TABLES %s WRITE'; EXECUTE s",
		"lowercase-tab":     "lock\ttables %s write",
	}
	for name, q := range spellings {
		for _, cut := range []int32{0, cutAfterSend} {
			t.Run(fmt.Sprintf("%s/%d", name, cut), func(t *testing.T) {
				c := &cutter{isCommit: mysqlCommit}
				db, plain, _, tbl := a9MyDB(t, c, "")
				calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
					if _, err := tx.ExecContext(ctx, fmt.Sprintf(q, tbl)); err != nil {
						return fmt.Errorf("lock: %w", err)
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')")
					return err
				})
				db.Close() // releases the tables the closure left locked
				rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'x'")
				t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
				if cut == 0 && (err != nil || rows != 1) {
					t.Errorf("plain driver commits; got err=%v rows=%d", err, rows)
				}
				if cut != 0 {
					a9Outcome(t, name, err, calls, rows)
				}
			})
		}
	}
}
