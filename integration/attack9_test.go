package integration

// Hostile tests (attack9), from the README and the public API only:
// MariaDB lost COMMITs (the reply cut after the COMMIT went out, or the
// COMMIT cut in half so the server never ran it) combined with odd but
// legal things inside the closure: statements that commit implicitly,
// autocommit switches, prepared statements and anonymous blocks, compound
// statements, SET STATEMENT, temporary tables, LOCK TABLES, session
// settings; the marker table dropped, locked or its sentinel tampered
// with; KILL storms; lock waits at the marker.
//
// Tests named in a "DEFECT" comment fail on the defect and are skipped
// unless ATTACK9_DEFECTS=1.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

func a9Defect(t *testing.T) {
	t.Helper()
	if os.Getenv("ATTACK9_DEFECTS") != "1" {
		t.Skip("known defect; run with ATTACK9_DEFECTS=1")
	}
}

// a9MyDB: a database of its own on the shared MariaDB, a table w (op), a
// sqlretry db whose connections go through c, warmed up (marker checked).
func a9MyDB(t *testing.T, c *cutter, dsnParams string, opts ...sqlretry.Option) (db, plain *sql.DB, dbName, tbl string) {
	t.Helper()
	return a9MyDBAt(t, "", c, dsnParams, opts...)
}

// a9MyDBAt: as a9MyDB on the server of dsn (the shared one when empty).
func a9MyDBAt(t *testing.T, dsn string, c *cutter, dsnParams string, opts ...sqlretry.Option) (db, plain *sql.DB, dbName, tbl string) {
	t.Helper()
	addr, user := "127.0.0.1:3306", "root"
	if dsn == "" {
		plain = atkPlain(t, "mysql")
	} else {
		cfg, err := mysql.ParseDSN(dsn)
		if err != nil {
			t.Fatal(err)
		}
		addr, user = cfg.Addr, cfg.User
		p, err := sql.Open("mysql", dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		plain = p
	}
	dbName = atkName("a9")
	atkMust(t, plain, "CREATE DATABASE "+dbName)
	t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
	tbl = dbName + ".w"
	atkMust(t, plain, "CREATE TABLE "+tbl+" (op varchar(40)) ENGINE=InnoDB")
	netName := atkName("a9net")
	mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return c.dial(ctx, "tcp", addr) })
	t.Cleanup(func() { mysql.DeregisterDialContext(netName) })
	if dsnParams == "" {
		dsnParams = "parseTime=true&multiStatements=true"
	}
	cfg, err := mysql.ParseDSN(user + "@" + netName + "(" + addr + ")/" + dbName + "?" + dsnParams)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db = sqlretry.OpenDB(conn, opts...)
	t.Cleanup(func() { db.Close() })
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return db, plain, dbName, tbl
}

// a9Outcome checks the contract after one RunInTx whose first COMMIT was
// cut: the op at most once, an acknowledged op exactly once, and no error
// but ErrAmbiguousCommit.
func a9Outcome(t *testing.T, what string, err error, calls, rows int) {
	t.Helper()
	if rows > 1 {
		t.Errorf("%s: the committed write ran %d times (calls=%d, err=%v)", what, rows, calls, err)
	}
	if err == nil && rows != 1 {
		t.Errorf("%s: acknowledged with %d rows (calls=%d)", what, rows, calls)
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
		t.Errorf("%s: %v, want nil or ErrAmbiguousCommit (calls=%d rows=%d)", what, err, calls, rows)
	}
}

// a9CutRun runs one RunInTx that inserts op, then runs stmts (with %d
// replaced by the attempt number), and has its first COMMIT cut by mode.
func a9CutRun(t *testing.T, db *sql.DB, c *cutter, tbl, op string, mode int32, stmts ...string) (calls int, err error) {
	t.Helper()
	err = sqlretry.RunInTx(a5Ctx(t, 12*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op); err != nil {
			return err
		}
		for _, s := range stmts {
			if strings.Contains(s, "%d") {
				s = fmt.Sprintf(s, calls)
			}
			if _, err := tx.ExecContext(ctx, s); err != nil {
				return fmt.Errorf("%s: %w", s, err)
			}
		}
		if calls == 1 {
			c.mode.Store(mode)
		}
		return nil
	})
	c.mode.Store(0)
	return calls, err
}

// a9ImplicitCase: the closure inserts op, then runs stmts ("|" between
// them, " w" naming the test's table); the final COMMIT is cut in half, so
// the server never ran it (nor the marker that travels with it).
func a9ImplicitCase(t *testing.T, name, stmtText string) {
	c := &cutter{isCommit: mysqlCommit}
	db, plain, _, tbl := a9MyDB(t, c, "")
	stmts := strings.Split(stmtText, "|")
	for i, s := range stmts {
		stmts[i] = strings.ReplaceAll(s, " w", " "+tbl)
	}
	op := "ic-" + name
	calls, err := a9CutRun(t, db, c, tbl, op, cutMidMessage, stmts...)
	rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
	t.Logf("%s: err=%v calls=%d rows=%d fired=%d", name, err, calls, rows, c.fired.Load())
	if c.fired.Load() == 0 {
		t.Fatalf("COMMIT not cut (err=%v)", err)
	}
	a9Outcome(t, name, err, calls, rows)
}

// HOLDS: a statement inside the closure commits the transaction so far
// (implicitly, or a hand-run BEGIN / autocommit switch, also hidden in
// executed comments, SET lists, prepared statements and anonymous
// blocks); then the final COMMIT is cut in half. The first INSERT is
// committed all the same: a replay would write it twice. sqlretry returns
// ErrAmbiguousCommit after one run, as the README says.
func TestAttack9ImplicitCommitThenLostCommit(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"create", "CREATE TABLE t%d (a int)"},
		{"analyze", "ANALYZE TABLE w"},
		{"optimize", "OPTIMIZE TABLE w"},
		{"check", "CHECK TABLE w"},
		{"repair", "REPAIR TABLE w"},
		{"flush", "FLUSH TABLES w"},
		{"cacheindex", "CACHE INDEX w IN DEFAULT"},
		{"loadindex", "LOAD INDEX INTO CACHE w"},
		{"locktable", "LOCK TABLE w READ|UNLOCK TABLES"},
		{"starttx", "START TRANSACTION"},
		{"beginwork", "BEGIN WORK"},
		{"setlist", "SET @a9 = 0, autocommit = 0|SET @a9 = 1, autocommit = 1"},
		{"setsession", "SET @@session.autocommit = 0|SET @@session.autocommit = 1"},
		{"setlocal", "SET LOCAL autocommit = OFF|SET LOCAL autocommit = ON"},
		{"execcomment", "/*!SET autocommit=0*/|/*!SET autocommit=1*/"},
		{"execcommentbegin", "/*!BEGIN */"},
		{"execcommentstart", "/*!START TRANSACTION */"},
		{"mcommentbegin", "/*M!100000 BEGIN */"},
		{"execcommentchain", "/*!COMMIT AND CHAIN*/"},
		{"mcommentddl", "/*M!100000 CREATE TABLE m%d (a int) */"},
		{"mcommentauto", "/*M!100000 SET autocommit=0 */|/*M!100000 SET autocommit=1 */"},
		{"commitworkspace", "COMMIT  WORK"},
		{"commitcomment", "COMMIT /* x */"},
		{"leadcomment", "/* x */ COMMIT"},
		{"hashcomment", "# x\nCOMMIT"},
		{"dashcomment", "-- x\nCOMMIT"},
		{"multi", "DO 1; COMMIT"},
		{"prepare", "PREPARE s%d FROM 'CREATE TABLE p (a int)'|EXECUTE s1"},
		{"immediate", "EXECUTE IMMEDIATE 'CREATE TABLE i%d (a int)'"},
		{"block", "BEGIN NOT ATOMIC CREATE TABLE b%d (a int); END"},
		{"sequence", "CREATE SEQUENCE q%d"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCase(t, tc.name, tc.stmts) })
	}
}

// FIXED (was DEFECT): a COMMIT inside an executed comment (/*! ... */, /*!50000 ... */,
// /*M! ... */, /*M!100000 ... */) commits the closure's INSERT, but
// sqlretry does not see it (it does see BEGIN, START TRANSACTION, SET
// autocommit and DDL in the same comments): when the final COMMIT is then
// cut in half, the marker is not found, the attempt is replayed and the
// INSERT is committed twice; RunInTx returns nil. The README says the
// reader executes /*! */ and /*M! */ comments and that a closure that ran
// COMMIT is never replayed.
func TestAttack9CommitInExecutedCommentReplayed(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"excl", "/*!COMMIT*/"},
		{"exclver", "/*!50000 COMMIT */"},
		{"m", "/*M! COMMIT */"},
		{"mver", "/*M!100000 COMMIT */"},
		{"mverwork", "/*M!100000 COMMIT WORK */"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCase(t, tc.name, tc.stmts) })
	}
}

// a9Run runs one RunInTx with the closure body f; when cut is not 0 the
// first attempt's COMMIT is cut that way.
func a9Run(t *testing.T, db *sql.DB, c *cutter, cut int32, opts *sql.TxOptions, f func(ctx context.Context, tx *sql.Tx, calls int) error) (calls int, err error) {
	t.Helper()
	err = sqlretry.RunInTx(a5Ctx(t, 12*time.Second), db, opts, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if err := f(ctx, tx, calls); err != nil {
			return err
		}
		if calls == 1 && cut != 0 {
			c.mode.Store(cut)
		}
		return nil
	})
	c.mode.Store(0)
	return calls, err
}

// DEFECT: a temporary table of the marker's name in the marker's database, made by
// the closure (CREATE TEMPORARY TABLE commits nothing; the README says
// MySQL temporary tables are fine in a closure) shadows the marker table
// for that session: the marker row goes into it and dies with the session.
// After a COMMIT whose reply alone was lost, the lookup (another session)
// finds no marker but the sentinel: the committed write must not be
// replayed.
func TestAttack9TempTableShadowsMarker(t *testing.T) {
	a9Defect(t)
	c := &cutter{isCommit: mysqlCommit}
	db, plain, dbName, tbl := a9MyDB(t, c, "")
	var create string
	if err := plain.QueryRow("SHOW CREATE TABLE "+dbName+".sqlretry_commit_marker").Scan(new(string), &create); err != nil {
		t.Fatal(err)
	}
	create = strings.Replace(create, "CREATE TABLE `sqlretry_commit_marker`", "CREATE TEMPORARY TABLE IF NOT EXISTS "+dbName+".sqlretry_commit_marker", 1)
	calls, err := a9Run(t, db, c, cutAfterSend, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
		if _, err := tx.ExecContext(ctx, create); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('tmp')")
		return err
	})
	rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'tmp'")
	t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
	if c.fired.Load() == 0 {
		t.Fatal("COMMIT not cut")
	}
	a9Outcome(t, "temporary marker", err, calls, rows)
}

// DEFECT: LOCK TABLES w WRITE inside the closure (it commits implicitly; the README
// says such an attempt is never replayed), no UNLOCK: the plain driver
// commits (COMMIT is allowed under LOCK TABLES). sqlretry's marker INSERT
// names a table that is not locked (1100). Outcome: the write once, and
// no error the plain driver would not give.
func TestAttack9LockTablesLeftLocked(t *testing.T) {
	// Was a defect (attack9); fixed.
	c := &cutter{isCommit: mysqlCommit}
	db, plain, _, tbl := a9MyDB(t, c, "")
	// the plain driver, same transaction
	{
		pc, err := plain.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		tx, err := pc.BeginTx(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err1 := tx.Exec("LOCK TABLES " + tbl + " WRITE")
		_, err2 := tx.Exec("INSERT INTO " + tbl + " VALUES ('plain')")
		err3 := tx.Commit()
		pc.ExecContext(context.Background(), "UNLOCK TABLES")
		pc.Close()
		t.Logf("plain driver: lock=%v insert=%v commit=%v", err1, err2, err3)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatal("the plain driver fails too")
		}
	}
	db.SetMaxOpenConns(1)
	calls, err := a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
		if _, err := tx.ExecContext(ctx, "LOCK TABLES "+tbl+" WRITE"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('lk')")
		return err
	})
	// the one pooled connection may still hold the lock
	if _, uerr := db.ExecContext(a5Ctx(t, 5*time.Second), "UNLOCK TABLES"); uerr != nil {
		t.Logf("UNLOCK TABLES: %v", uerr)
	}
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'lk'")
	t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
	if rows != 1 || err != nil {
		t.Errorf("LOCK TABLES in the closure: err=%v calls=%d rows=%d; the plain driver commits once with no error", err, calls, rows)
	}
}

// The closure switches the session to sql_mode=ORACLE (legal on MariaDB,
// and it stays on the pooled connection). The plain driver commits; the
// MariaDB marker block (BEGIN NOT ATOMIC ...) is not Oracle syntax.
// Outcome: one run, one row, no error; and with the reply of the first
// COMMIT lost, never two rows.
func TestAttack9OracleSQLMode(t *testing.T) {
	for _, cut := range []int32{0, cutAfterSend, cutMidMessage} {
		t.Run(fmt.Sprint("cut", cut), func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			db.SetMaxOpenConns(1)
			op := fmt.Sprint("ora", cut)
			calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				if _, err := tx.ExecContext(ctx, "SET SESSION sql_mode = 'ORACLE'"); err != nil {
					return err
				}
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op)
				return err
			})
			rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
			if cut == 0 {
				if err != nil || rows != 1 || calls != 1 {
					t.Errorf("sql_mode=ORACLE: err=%v calls=%d rows=%d; the plain driver commits once", err, calls, rows)
				}
			} else {
				a9Outcome(t, "oracle", err, calls, rows)
			}
			// the next transaction on the same (Oracle-mode) connection
			calls, err = a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op+"next")
				return err
			})
			rows = a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op+"next")
			if err != nil || rows != 1 {
				t.Errorf("next transaction: err=%v calls=%d rows=%d", err, calls, rows)
			}
		})
	}
}

func a9Count(t *testing.T, db *sql.DB, q string, args ...any) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int
	if err := db.QueryRowContext(ctx, q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// HOLDS: the transaction's only write is inside an executed comment (the README
// says the reader executes /*! */ and /*M! */ comments). Its COMMIT's
// reply is lost (the server committed): it must not be taken for a
// read-only transaction and replayed.
func TestAttack9WriteInExecutedCommentLostReply(t *testing.T) {
	for _, q := range []string{
		"/*!INSERT INTO %s VALUES ('%s')*/",
		"/*!50000 INSERT INTO %s VALUES ('%s')*/",
		"/*M!100000 INSERT INTO %s VALUES ('%s')*/",
		"SELECT 1; INSERT INTO %s VALUES ('%s')",
		"SELECT 1 /*!, (SELECT 1) */; INSERT INTO %s VALUES ('%s')",
	} {
		t.Run(q, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			op := atkName("wc")
			text := fmt.Sprintf(q, tbl, op)
			calls, err := a9Run(t, db, c, cutAfterSend, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				rows, err := tx.QueryContext(ctx, text)
				if err != nil {
					return err
				}
				for rows.Next() {
				}
				for rows.NextResultSet() {
					for rows.Next() {
					}
				}
				if err := rows.Err(); err != nil {
					return err
				}
				return rows.Close()
			})
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", text, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, text, err, calls, rows)
		})
	}
}

// Another session holds the marker table's rows and gaps (SELECT ... FOR
// UPDATE), so the marker INSERT that travels with the COMMIT waits on a
// lock (innodb_lock_wait_timeout 50 s on the shared server). The caller's
// deadline is 3 s: RunInTx must return by then (no hang), with an error
// that says the COMMIT was cut (ErrAmbiguousCommit and DeadlineExceeded)
// or one that is true: if it says nothing about ambiguity, the write must
// not show up once the lock is released.
func TestAttack9MarkerInsertWaitsPastDeadline(t *testing.T) {
	c := &cutter{isCommit: mysqlCommit}
	db, plain, dbName, tbl := a9MyDB(t, c, "")
	pc, err := plain.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ptx, err := pc.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ptx.Rollback()
	if _, err := ptx.Exec("SELECT * FROM " + dbName + ".sqlretry_commit_marker FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('mw')")
		return err
	})
	took := time.Since(start)
	ptx.Rollback()
	time.Sleep(1500 * time.Millisecond)
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'mw'")
	t.Logf("err=%v took=%v calls=%d rows=%d", err, took, calls, rows)
	if took > 4*time.Second {
		t.Errorf("RunInTx took %v past a 3 s deadline", took)
	}
	if err == nil && rows != 1 {
		t.Errorf("acknowledged with %d rows", rows)
	}
	if rows > 1 {
		t.Errorf("written %d times", rows)
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) && rows != 0 {
		t.Errorf("error %v says nothing of an unknown outcome, yet the write committed", err)
	}
}

// HOLDS: an administrator's KILL QUERY (or KILL CONNECTION) lands on sessions of
// the db at random moments, some of them inside the COMMIT block (the
// marker INSERT and COMMIT). Each transaction writes 300 rows for its op.
// Contract: no op committed twice, every acknowledged op committed, errors
// only the server's own (1317, ...) or ErrAmbiguousCommit. Private server.
func TestAttack9KillStorm(t *testing.T) {
	for _, kind := range []string{"QUERY", "CONNECTION"} {
		t.Run(kind, func(t *testing.T) { a9KillStorm(t, kind, false) })
	}
}

func a9KillStorm(t *testing.T, kind string, plainDriver bool) {
	dsn := needPrivate(t, "mysql")
	admin, err := sql.Open("mysql", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	dbName := atkName("a9ks")
	atkMust(t, admin, "CREATE DATABASE "+dbName, "CREATE TABLE "+dbName+".w (op varchar(40), n int) ENGINE=InnoDB",
		"SET GLOBAL innodb_flush_log_at_trx_commit = 1")
	t.Cleanup(func() { admin.Exec("DROP DATABASE IF EXISTS " + dbName) })
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DBName = dbName
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var db *sql.DB
	if plainDriver {
		db = sql.OpenDB(conn)
	} else {
		db = sqlretry.OpenDB(conn)
	}
	defer db.Close()
	db.SetMaxOpenConns(4)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	var mu sync.Mutex
	ids := map[int64]bool{}
	ok := map[string]bool{}
	failed := map[string]string{}
	errs := map[string]int{}
	var kills atomic.Int32
	go func() {
		for ctx.Err() == nil {
			time.Sleep(time.Duration(200+rand.IntN(1500)) * time.Microsecond)
			mu.Lock()
			var list []int64
			for id := range ids {
				list = append(list, id)
			}
			mu.Unlock()
			if len(list) == 0 {
				continue
			}
			if _, err := admin.Exec(fmt.Sprintf("KILL %s %d", kind, list[rand.IntN(len(list))])); err == nil {
				kills.Add(1)
			}
		}
	}()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				op := fmt.Sprintf("g%d-%d", g, i)
				cctx, ccancel := context.WithTimeout(context.Background(), 6*time.Second)
				run := sqlretry.RunInTx
				if plainDriver {
					run = a9PlainTx
				}
				err := run(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					var id int64
					if err := tx.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&id); err != nil {
						return err
					}
					mu.Lock()
					ids[id] = true
					mu.Unlock()
					_, err := tx.ExecContext(ctx, "INSERT INTO w SELECT ?, seq FROM seq_1_to_300", op)
					return err
				})
				ccancel()
				mu.Lock()
				if err == nil {
					ok[op] = true
				} else {
					msg := err.Error()
					if len(msg) > 160 {
						msg = msg[:160]
					}
					errs[msg]++
					failed[op] = err.Error()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	counts := map[string]int{}
	rows, err := admin.Query("SELECT op, COUNT(*) FROM " + dbName + ".w GROUP BY op")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var op string
		var n int
		rows.Scan(&op, &n)
		counts[op] = n
	}
	rows.Close()
	t.Logf("kind=%s kills=%d acknowledged=%d ops in table=%d errors=%v", kind, kills.Load(), len(ok), len(counts), errs)
	for op, n := range counts {
		if n != 300 {
			t.Errorf("%s: %d rows (300 per commit)", op, n)
		}
	}
	for op := range ok {
		if counts[op] != 300 {
			t.Errorf("%s acknowledged, %d rows", op, counts[op])
		}
	}
	for op, e := range failed {
		if counts[op] != 0 {
			t.Logf("%s failed (%s), yet committed (%d rows)", op, e, counts[op])
		}
	}
	for msg := range errs {
		if !strings.Contains(msg, "1317") && !strings.Contains(msg, "ambiguous") && !strings.Contains(msg, "1927") && !strings.Contains(msg, "invalid connection") {
			t.Logf("unexpected kind of error: %s", msg)
		}
	}
}

// a9PlainTx: what the plain driver does for one transaction (no retries).
func a9PlainTx(ctx context.Context, db *sql.DB, opts *sql.TxOptions, fn func(context.Context, *sql.Tx) error, _ ...sqlretry.Option) error {
	tx, err := db.BeginTx(ctx, opts)
	if err != nil {
		return err
	}
	if err := fn(ctx, tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// The same storm of KILL QUERY through the plain driver, for comparison:
// it too returns 1317 for COMMITs that committed (4 of ~3,500 in one run;
// sqlretry's marker block 1 of ~3,300), so sqlretry's 1317 after a commit is
// the plain driver's behaviour, not a defect.
func TestAttack9KillQueryStormPlainDriver(t *testing.T) {
	a9KillStorm(t, "QUERY", true)
}

// HOLDS: session settings the closure may change, on a connection sqlretry
// has not asked anything yet (it asks the connection id once per
// connection, on the transaction's own session): the plain driver commits
// once; so does sqlretry, and a lost COMMIT reply is resolved.
func TestAttack9SessionSettingsInClosure(t *testing.T) {
	a9SessionSettings(t, []string{
		"SET SESSION sql_mode = 'ANSI_QUOTES,NO_BACKSLASH_ESCAPES,PIPES_AS_CONCAT,ONLY_FULL_GROUP_BY'",
		"SET NAMES binary",
		"SET SESSION character_set_results = NULL",
		"SET SESSION sql_auto_is_null = 1",
		"SET SESSION div_precision_increment = 0",
		"SET SESSION group_concat_max_len = 4",
		"SET SESSION sql_select_limit = 1",
	})
}

// DEFECT: SET SESSION sql_select_limit = 0 in the closure (a legal session
// setting: SELECTs return no rows) on a connection sqlretry has not asked
// its connection id yet: the plain driver commits; sqlretry's own
// "SELECT CONNECTION_ID()" on that session returns no row and the
// transaction fails as permanent ("asking for the connection id before
// COMMIT: sqlretry: no row"), nothing committed.
func TestAttack9SelectLimitZeroFailsCommit(t *testing.T) {
	// Was a defect (attack9); fixed.
	a9SessionSettings(t, []string{"SET SESSION sql_select_limit = 0"})
}

func a9SessionSettings(t *testing.T, sets []string) {
	for _, set := range sets {
		for _, cut := range []int32{0, cutAfterSend} {
			t.Run(fmt.Sprintf("%s/cut%d", set, cut), func(t *testing.T) {
				c := &cutter{isCommit: mysqlCommit}
				db, plain, _, tbl := a9MyDB(t, c, "")
				db.SetMaxIdleConns(0) // every transaction on a new session
				op := atkName("ss")
				calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
					if _, err := tx.ExecContext(ctx, set); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op)
					return err
				})
				rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
				t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
				if cut == 0 {
					if err != nil || rows != 1 {
						t.Errorf("%s: err=%v calls=%d rows=%d; the plain driver commits once", set, err, calls, rows)
					}
				} else {
					a9Outcome(t, set, err, calls, rows)
					// No row for CONNECTION_ID() in that session: the
					// transaction commits without a marker, and a lost reply
					// is ErrAmbiguousCommit (not resolved, never replayed).
					if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
						t.Errorf("%s: a lost reply of a COMMIT that took effect: %v, want nil or ErrAmbiguousCommit", set, err)
					}
				}
			})
		}
	}
}

// DEFECT: two replicas (two sqlretry dbs) share the default marker table. A's
// COMMIT (with its marker) takes effect, its reply is lost. Before A looks
// the token up, an administrator drops the marker table (A's marker row
// goes with it) and B keeps writing: B's next transaction meets the missing
// table (1146), commits without a marker, and the one after checks the
// table again: B creates it and puts a new sentinel in. A's lookup then
// finds a sentinel and no token. A's write committed: it must not be
// replayed.
func TestAttack9MarkerDroppedReplicaRechecksBeforeLookup(t *testing.T) {
	// Was a defect (attack9); fixed.
	for _, who := range []string{"replica", "samedb"} {
		t.Run(who, func(t *testing.T) { a9DroppedRecheck(t, who) })
	}
}

func a9DroppedRecheck(t *testing.T, who string) {
	plain := atkPlain(t, "mysql")
	dbName := atkName("a9rc")
	atkMust(t, plain, "CREATE DATABASE "+dbName)
	t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
	tbl := dbName + ".w"
	marker := dbName + ".sqlretry_commit_marker"
	atkMust(t, plain, "CREATE TABLE "+tbl+" (op varchar(40)) ENGINE=InnoDB")
	openB := func() *sql.DB {
		cfg, err := mysql.ParseDSN("root@tcp(127.0.0.1:3306)/" + dbName + "?parseTime=true")
		if err != nil {
			t.Fatal(err)
		}
		conn, err := mysql.NewConnector(cfg)
		if err != nil {
			t.Fatal(err)
		}
		db := sqlretry.OpenDB(conn)
		t.Cleanup(func() { db.Close() })
		return db
	}
	dbB := openB()
	var dbA *sql.DB
	writeB := func(op string) error {
		w := dbB
		if who == "samedb" {
			w = dbA
		}
		return sqlretry.RunInTx(a5Ctx(t, 5*time.Second), w, nil, func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op)
			return err
		})
	}
	if err := sqlretry.RunInTx(a5Ctx(t, 5*time.Second), dbB, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('b-warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c := &cutter{isCommit: mysqlCommit}
	var armed atomic.Bool
	var hookLog []string
	dial := afterCommitSentBy(mysqlCommit, c.dial, func() {
		if !armed.Swap(false) {
			return
		}
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			var n int
			if plain.QueryRow("SELECT COUNT(*) FROM " + tbl + " WHERE op = 'a'").Scan(&n); n > 0 {
				break
			}
		}
		_, err := plain.Exec("DROP TABLE " + marker)
		hookLog = append(hookLog, fmt.Sprintf("drop: %v", err))
		for i := range 3 {
			err := writeB(fmt.Sprintf("b%d", i))
			var n int
			qerr := plain.QueryRow("SELECT COUNT(*) FROM " + marker + " WHERE token >= 'sqlretry:' AND token < 'sqlretry;'").Scan(&n)
			hookLog = append(hookLog, fmt.Sprintf("B write %d: %v; sentinel rows %d (%v)", i, err, n, qerr))
		}
	})
	netName := atkName("a9rcnet")
	mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) })
	defer mysql.DeregisterDialContext(netName)
	cfg, err := mysql.ParseDSN("root@" + netName + "(127.0.0.1:3306)/" + dbName + "?parseTime=true")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dbA = sqlretry.OpenDB(conn)
	defer dbA.Close()
	if err := sqlretry.RunInTx(context.Background(), dbA, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('a-warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	calls := 0
	err = sqlretry.RunInTx(a5Ctx(t, 15*time.Second), dbA, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('a')"); err != nil {
			return err
		}
		if calls == 1 {
			armed.Store(true)
			c.mode.Store(cutAfterSend)
		}
		return nil
	})
	c.mode.Store(0)
	armed.Store(false)
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'a'")
	t.Logf("err=%v calls=%d rows=%d fired=%d hook=%q", err, calls, rows, c.fired.Load(), hookLog)
	if c.fired.Load() == 0 {
		t.Fatal("COMMIT not cut")
	}
	a9Outcome(t, "dropped, rechecked by "+who, err, calls, rows)
}

// HOLDS: a user-named marker table in another database, created by an
// administrator, that the application user may only SELECT, INSERT and
// DELETE (README: all it needs); the user may not CREATE anything. A
// COMMIT whose reply is lost is resolved (committed: success; never
// reached the server: replayed), one row each. Private server (users).
func TestAttack9NamedMarkerOtherDBLimitedUser(t *testing.T) {
	dsn := needPrivate(t, "mysql")
	admin, err := sql.Open("mysql", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	app, mk, user := atkName("a9app"), atkName("a9mk"), fmt.Sprintf("u%d", rand.IntN(1000000))
	atkMust(t, admin, "CREATE DATABASE "+app, "CREATE DATABASE "+mk,
		"CREATE TABLE "+app+".w (op varchar(40)) ENGINE=InnoDB",
		"CREATE TABLE "+mk+".markers (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB",
		"CREATE USER '"+user+"'@'%' IDENTIFIED BY 'pw'",
		"GRANT SELECT, INSERT ON "+app+".* TO '"+user+"'@'%'",
		"GRANT SELECT, INSERT, DELETE ON "+mk+".markers TO '"+user+"'@'%'")
	t.Cleanup(func() {
		admin.Exec("DROP USER '" + user + "'@'%'")
		admin.Exec("DROP DATABASE IF EXISTS " + app)
		admin.Exec("DROP DATABASE IF EXISTS " + mk)
	})
	acfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{isCommit: mysqlCommit}
	netName := atkName("a9nmnet")
	mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return c.dial(ctx, "tcp", addr) })
	defer mysql.DeregisterDialContext(netName)
	cfg := mysql.NewConfig()
	cfg.User, cfg.Passwd, cfg.Net, cfg.Addr, cfg.DBName = user, "pw", netName, acfg.Addr, app
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(conn, sqlretry.WithMySQLCommitMarker(mk+".markers"))
	defer db.Close()
	if err := sqlretry.RunInTx(a5Ctx(t, 5*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO w VALUES ('warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, cut := range []int32{cutAfterSend, cutMidMessage} {
		op := fmt.Sprint("nm", cut)
		calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO w VALUES (?)", op)
			return err
		})
		rows := a9Count(t, admin, "SELECT COUNT(*) FROM "+app+".w WHERE op = ?", op)
		markers := a9Count(t, admin, "SELECT COUNT(*) FROM "+mk+".markers")
		t.Logf("cut=%d err=%v calls=%d rows=%d fired=%d marker rows=%d", cut, err, calls, rows, c.fired.Load(), markers)
		a9Outcome(t, op, err, calls, rows)
		if err != nil {
			t.Errorf("cut=%d: not resolved: %v", cut, err)
		}
	}
}

// HOLDS: a procedure that COMMITs inside (its caller's INSERT with it), called
// from the closure in several spellings; then the final COMMIT is cut in
// half. The README says a closure that ran CALL is never replayed.
func TestAttack9CallCommitsThenLostCommit(t *testing.T) {
	cases := []struct{ name, call string }{
		{"call", "CALL pc()"},
		{"immediate", "EXECUTE IMMEDIATE 'CALL pc()'"},
		{"block", "BEGIN NOT ATOMIC CALL pc(); END"},
		{"excl", "/*!CALL pc()*/"},
		{"mver", "/*M!100000 CALL pc() */"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, dbName, tbl := a9MyDB(t, c, "")
			atkMust(t, plain, "CREATE PROCEDURE "+dbName+".pc() BEGIN COMMIT; END")
			op := "call-" + tc.name
			calls, err := a9CutRun(t, db, c, tbl, op, cutMidMessage, tc.call)
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", tc.call, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, tc.call, err, calls, rows)
		})
	}
}

// FIXED (was DEFECT; no network fault needed): the closure's COMMIT in an executed
// comment (or under SET STATEMENT ... FOR, or inside REPEAT) commits its INSERT; a later statement then waits for a row lock
// another session holds and gets 1205 (innodb_lock_wait_timeout = 1).
// The plain driver returns the 1205 with the INSERT committed once;
// sqlretry takes the attempt for one that committed nothing, replays it
// when the lock is gone, and the INSERT is committed twice (RunInTx nil).
func TestAttack9CommitInCommentThenLockTimeoutReplayed(t *testing.T) {
	for _, hidden := range []string{"/*!COMMIT*/", "SET STATEMENT sql_mode='' FOR COMMIT", "REPEAT COMMIT; UNTIL 1 END REPEAT"} {
		t.Run(hidden, func(t *testing.T) { a9HiddenCommitLockTimeout(t, hidden) })
	}
}

func a9HiddenCommitLockTimeout(t *testing.T, hidden string) {
	c := &cutter{isCommit: mysqlCommit}
	db, plain, dbName, tbl := a9MyDB(t, c, "")
	atkMust(t, plain, "CREATE TABLE "+dbName+".x (id int PRIMARY KEY, n int) ENGINE=InnoDB", "INSERT INTO "+dbName+".x VALUES (1, 0)")
	pc, err := plain.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ptx, err := pc.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ptx.Exec("SELECT * FROM " + dbName + ".x WHERE id = 1 FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(1500 * time.Millisecond); ptx.Rollback() }()
	var errs []string
	calls, err := a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
		if _, err := tx.ExecContext(ctx, "SET SESSION innodb_lock_wait_timeout = 1"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('lt')"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, hidden); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "UPDATE "+dbName+".x SET n = n + 1 WHERE id = 1")
		if err != nil {
			errs = append(errs, err.Error())
		}
		return err
	})
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'lt'")
	t.Logf("err=%v calls=%d rows=%d closure errors=%q", err, calls, rows, errs)
	if rows > 1 {
		t.Errorf("the committed INSERT ran %d times (calls=%d, err=%v)", rows, calls, err)
	}
}

// HOLDS (by the contract; note: writes wait on the marker lock where the
// plain driver would commit): an administrator holds LOCK TABLES WRITE on the marker table (a
// backup tool, a migration). The db has not checked the table yet (first
// writing transaction), or it has and a COMMIT's reply is then lost (the
// lookup must read the table). The caller's deadline is 3 s: RunInTx must
// return by then (metadata lock waits default to a day), and never with
// a write run twice.
func TestAttack9MarkerTableLockedByAdmin(t *testing.T) {
	for _, phase := range []string{"check", "lookup"} {
		t.Run(phase, func(t *testing.T) {
			plain := atkPlain(t, "mysql")
			dbName := atkName("a9lk")
			atkMust(t, plain, "CREATE DATABASE "+dbName, "CREATE TABLE "+dbName+".w (op varchar(40)) ENGINE=InnoDB",
				"CREATE TABLE "+dbName+".sqlretry_commit_marker (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB")
			t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
			tbl := dbName + ".w"
			c := &cutter{isCommit: mysqlCommit}
			var locked atomic.Bool
			pc, err := plain.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			defer pc.ExecContext(context.Background(), "UNLOCK TABLES")
			lock := func() {
				if _, err := pc.ExecContext(context.Background(), "LOCK TABLES "+dbName+".sqlretry_commit_marker WRITE"); err != nil {
					t.Error(err)
				}
				locked.Store(true)
			}
			dial := afterCommitSentBy(mysqlCommit, c.dial, func() {
				if phase == "lookup" && !locked.Load() && c.fired.Load() > 0 {
					// the COMMIT block went out whole; let it run, then lock
					time.Sleep(200 * time.Millisecond)
					lock()
				}
			})
			netName := atkName("a9lknet")
			mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) })
			defer mysql.DeregisterDialContext(netName)
			cfg, err := mysql.ParseDSN("root@" + netName + "(127.0.0.1:3306)/" + dbName + "?parseTime=true")
			if err != nil {
				t.Fatal(err)
			}
			conn, err := mysql.NewConnector(cfg)
			if err != nil {
				t.Fatal(err)
			}
			db := sqlretry.OpenDB(conn)
			defer db.Close()
			cut := int32(0)
			if phase == "check" {
				lock()
			} else {
				if err := sqlretry.RunInTx(a5Ctx(t, 5*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm')")
					return err
				}); err != nil {
					t.Fatal(err)
				}
				cut = cutAfterSend
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			start := time.Now()
			calls := 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('lk')"); err != nil {
					return err
				}
				if calls == 1 && cut != 0 {
					c.mode.Store(cut)
				}
				return nil
			})
			took := time.Since(start)
			c.mode.Store(0)
			pc.ExecContext(context.Background(), "UNLOCK TABLES")
			time.Sleep(500 * time.Millisecond)
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'lk'")
			t.Logf("%s: err=%v took=%v calls=%d rows=%d fired=%d locked=%v", phase, err, took, calls, rows, c.fired.Load(), locked.Load())
			if took > 4*time.Second {
				t.Errorf("RunInTx took %v past a 3 s deadline", took)
			}
			if rows > 1 {
				t.Errorf("written %d times", rows)
			}
			if err == nil && rows != 1 {
				t.Errorf("acknowledged with %d rows", rows)
			}
		})
	}
}

// The closure shortens its session's innodb_lock_wait_timeout to 1 s (a
// common setting); another session holds the marker table's rows and gaps
// for 2.5 s, so the marker INSERT in the COMMIT block times out (1205)
// once or twice. The plain driver commits (its COMMIT inserts nothing).
// Outcome: one row, and success (a replay once the lock is gone) or at
// worst an error that leaves nothing committed.
func TestAttack9MarkerInsertLockTimeout(t *testing.T) {
	c := &cutter{isCommit: mysqlCommit}
	db, plain, dbName, tbl := a9MyDB(t, c, "")
	pc, err := plain.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ptx, err := pc.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ptx.Exec("SELECT * FROM " + dbName + ".sqlretry_commit_marker FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(2500 * time.Millisecond); ptx.Rollback() }()
	calls, err := a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
		if _, err := tx.ExecContext(ctx, "SET SESSION innodb_lock_wait_timeout = 1"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('mt')")
		return err
	})
	time.Sleep(1500 * time.Millisecond)
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'mt'")
	t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
	if rows > 1 {
		t.Errorf("written %d times", rows)
	}
	if err == nil && rows != 1 {
		t.Errorf("acknowledged with %d rows", rows)
	}
	if err != nil && rows != 0 {
		t.Errorf("error %v, yet committed", err)
	}
}

// FIXED (was DEFECT): a ROLLBACK hidden in an executed comment ends the transaction;
// the closure's next INSERT then runs in autocommit and commits at once.
// The final COMMIT (with the marker) is cut in half: the marker is not
// found and the attempt is replayed, so the autocommitted INSERT is
// committed twice (RunInTx nil). A plain ROLLBACK is seen (README: a
// closure that ran ROLLBACK is never replayed); one in /*! */ or /*M! */
// is not.
func TestAttack9RollbackInExecutedCommentReplayed(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"excl", "/*!ROLLBACK*/|INSERT INTO w VALUES ('after')"},
		{"mver", "/*M!100000 ROLLBACK */|INSERT INTO w VALUES ('after')"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			stmts := strings.Split(tc.stmts, "|")
			for i, s := range stmts {
				stmts[i] = strings.ReplaceAll(s, " w", " "+tbl)
			}
			op := "hr-" + tc.name
			calls, err := a9CutRun(t, db, c, tbl, op, cutMidMessage, stmts...)
			after := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'after'")
			t.Logf("%s: err=%v calls=%d after=%d fired=%d", tc.name, err, calls, after, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, tc.name, err, calls, after)
		})
	}
}

// A READ ONLY transaction (sql.TxOptions{ReadOnly: true}: no marker, and
// the README says a lost COMMIT of a transaction that only read is
// replayed) whose closure ends the transaction itself (COMMIT, DDL, a
// procedure that commits) and then writes in autocommit, which the server
// allows once the READ ONLY transaction is over. Its final COMMIT is lost:
// the autocommitted write must not be run twice.
func TestAttack9ReadOnlyTxEndedThenWrites(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"commit", "COMMIT|INSERT INTO w VALUES ('ro')"},
		{"ddl", "CREATE TABLE t%d (a int)|INSERT INTO w VALUES ('ro')"},
		{"call", "CALL pc()|INSERT INTO w VALUES ('ro')"},
		{"begin", "BEGIN|INSERT INTO w VALUES ('ro')"},
	}
	for _, tc := range cases {
		for _, cut := range []int32{cutAfterSend, cutMidMessage} {
			t.Run(fmt.Sprintf("%s/cut%d", tc.name, cut), func(t *testing.T) {
				c := &cutter{isCommit: mysqlCommit}
				db, plain, dbName, tbl := a9MyDB(t, c, "")
				atkMust(t, plain, "CREATE PROCEDURE "+dbName+".pc() BEGIN COMMIT; END")
				stmts := strings.Split(tc.stmts, "|")
				calls, err := a9Run(t, db, c, cut, &sql.TxOptions{ReadOnly: true}, func(ctx context.Context, tx *sql.Tx, calls int) error {
					for _, s := range stmts {
						s = strings.ReplaceAll(s, " w", " "+tbl)
						if strings.Contains(s, "%d") {
							s = fmt.Sprintf(s, calls)
						}
						if _, err := tx.ExecContext(ctx, s); err != nil {
							return fmt.Errorf("%s: %w", s, err)
						}
					}
					return nil
				})
				rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'ro'")
				t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
				if c.fired.Load() == 0 {
					t.Fatalf("COMMIT not cut (err=%v)", err)
				}
				a9Outcome(t, tc.name, err, calls, rows)
			})
		}
	}
}

// HOLDS: more spellings of COMMIT, ROLLBACK, autocommit switches, and
// statements that commit implicitly, in executed comments, blocks and
// prepared statements: seen, ErrAmbiguousCommit after one run.
func TestAttack9TxControlSpellings(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"semicolon", "COMMIT;"},
		{"lower", "commit"},
		{"newline", "\nCOMMIT\n"},
		{"release", "COMMIT RELEASE"},
		{"rbwork", "ROLLBACK WORK|INSERT INTO w VALUES ('ic-rbwork')"},
		{"atat", "SET @@autocommit=0|SET @@autocommit=1"},
		{"globalish", "SET @@SESSION.AUTOCOMMIT=0|SET @@SESSION.AUTOCOMMIT=1"},
		{"lockcomment", "/*!LOCK TABLES w READ*/|/*!UNLOCK TABLES*/"},
		{"truncomment", "/*!TRUNCATE TABLE w2*/"},
		{"renamecomment", "/*!RENAME TABLE w2 TO w3%d*/"},
		{"grantcomment", "/*!GRANT SELECT ON w TO root@localhost*/"},
		{"analyzecomment", "/*!ANALYZE TABLE w*/"},
		{"beginblockcommit", "BEGIN NOT ATOMIC COMMIT; END"},
		{"execimmcommit", "EXECUTE IMMEDIATE 'COMMIT'"},
		{"preparecommit", "PREPARE s FROM 'COMMIT'|EXECUTE s"},
		{"execimmconcat", "EXECUTE IMMEDIATE CONCAT('COM', 'MIT')"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCaseSetup(t, tc.name, tc.stmts) })
	}
}

// FIXED (was DEFECT): MariaDB's SET STATEMENT var=value FOR <statement> hides the
// statement from sqlretry's reader: FOR COMMIT, FOR ROLLBACK (then an
// autocommitted INSERT), FOR CREATE TABLE, FOR CALL of a procedure that
// commits. The closure's INSERT is committed by it; the final COMMIT is cut
// in half; the marker is not found and the attempt is replayed: the
// INSERT is committed twice and RunInTx returns nil.
func TestAttack9SetStatementHidesTxControl(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"commit", "SET STATEMENT sql_mode='' FOR COMMIT"},
		{"ddl", "SET STATEMENT sql_mode='' FOR CREATE TABLE t%d (a int)"},
		{"call", "SET STATEMENT sql_mode='' FOR CALL pc()"},
		{"rollback", "SET STATEMENT sql_mode='' FOR ROLLBACK|INSERT INTO w VALUES ('ic-rollback')"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCaseSetup(t, tc.name, tc.stmts) })
	}
	// private server: a GRANT
	t.Run("grant", func(t *testing.T) {
		a9AdminCases(t, []struct{ name, stmts string }{{"grant", "SET STATEMENT sql_mode='' FOR GRANT SELECT ON *.* TO a9g"}})
	})
}

func a9ImplicitCaseSetup(t *testing.T, name, stmtText string) {
	c := &cutter{isCommit: mysqlCommit}
	db, plain, dbName, tbl := a9MyDB(t, c, "")
	atkMust(t, plain, "CREATE TABLE "+dbName+".w2 (a int)", "CREATE PROCEDURE "+dbName+".pc() BEGIN COMMIT; END")
	stmts := strings.Split(stmtText, "|")
	for i, s := range stmts {
		s = strings.ReplaceAll(s, " w2", " "+dbName+".w2")
		s = strings.ReplaceAll(s, " w3", " "+dbName+".w3")
		stmts[i] = strings.ReplaceAll(s, " w ", " "+tbl+" ")
		if strings.HasSuffix(stmts[i], " w") {
			stmts[i] = strings.TrimSuffix(stmts[i], " w") + " " + tbl
		}
		stmts[i] = strings.ReplaceAll(stmts[i], " w*/", " "+tbl+"*/")
	}
	op := "ic-" + name
	calls, err := a9CutRun(t, db, c, tbl, op, cutMidMessage, stmts...)
	rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
	t.Logf("%s: %q err=%v calls=%d rows=%d fired=%d", name, stmts, err, calls, rows, c.fired.Load())
	if c.fired.Load() == 0 {
		t.Fatalf("COMMIT not cut (err=%v)", err)
	}
	a9Outcome(t, name, err, calls, rows)
}

// HOLDS: a write under SET STATEMENT ... FOR is a write: its lost COMMIT
// reply is resolved, not replayed.
func TestAttack9SetStatementWriteResolved(t *testing.T) {
	for _, q := range []string{
		"SET STATEMENT sql_mode='' FOR INSERT INTO %s VALUES ('%s')",
		"SET STATEMENT max_statement_time=100 FOR INSERT INTO %s VALUES ('%s')",
	} {
		t.Run(q, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			op := atkName("sw")
			text := fmt.Sprintf(q, tbl, op)
			calls, err := a9Run(t, db, c, cutAfterSend, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				_, err := tx.ExecContext(ctx, text)
				return err
			})
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", text, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, text, err, calls, rows)
		})
	}
}

// HOLDS: outside a transaction, a write whose reply is lost after it was sent
// (the server ran it, autocommit) must not be run again (README: a write
// is returned as ErrAmbiguousCommit). Spellings the reader may not know.
func TestAttack9AutocommitWriteLostReply(t *testing.T) {
	a9AutocommitLost(t, false, []string{
		"INSERT INTO %s VALUES ('%s')",
		"SET STATEMENT sql_mode='' FOR INSERT INTO %s VALUES ('%s')",
		"/*!INSERT INTO %s VALUES ('%s')*/",
		"/*M!100000 INSERT INTO %s VALUES ('%s')*/",
		"SET STATEMENT sql_mode='' FOR CALL %[1]s_p('%[2]s')",
	})
}

// DEFECT (minor, the README's word): outside a transaction, a CALL, an
// EXECUTE IMMEDIATE or an anonymous block that writes, whose reply is lost
// after it was sent (the server ran it): not run twice, but the error is
// the driver's bare "invalid connection", which does not match
// ErrAmbiguousCommit, where the README says a write lost after it was sent
// "is returned as an error that matches ErrAmbiguousCommit" (an INSERT,
// even under SET STATEMENT ... FOR CALL, does). A caller that resubmits on
// errors that are not ambiguous writes twice.
func TestAttack9AutocommitProcedureLostNotAmbiguous(t *testing.T) {
	// Was a defect (attack9); fixed.
	a9AutocommitLost(t, true, []string{
		"EXECUTE IMMEDIATE 'INSERT INTO %s VALUES (''%s'')'",
		"CALL %[1]s_p('%[2]s')",
		"BEGIN NOT ATOMIC INSERT INTO %s VALUES ('%s'); END",
	})
}

func a9AutocommitLost(t *testing.T, wantAmbiguous bool, texts []string) {
	for _, q := range texts {
		t.Run(q, func(t *testing.T) {
			var text string
			c := &cutter{isCommit: func(p []byte) bool { return text != "" && strings.HasSuffix(string(p), text) }}
			db, plain, _, tbl := a9MyDB(t, c, "")
			atkMust(t, plain, "CREATE PROCEDURE "+tbl+"_p(o varchar(40)) INSERT INTO "+tbl+" VALUES (o)")
			op := atkName("aw")
			text = fmt.Sprintf(q, tbl, op)
			c.mode.Store(cutAfterSend)
			_, err := db.ExecContext(a5Ctx(t, 10*time.Second), text)
			c.mode.Store(0)
			time.Sleep(300 * time.Millisecond)
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v ambiguous=%v rows=%d fired=%d", text, err, errors.Is(err, sqlretry.ErrAmbiguousCommit), rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("not cut (err=%v)", err)
			}
			if rows > 1 {
				t.Errorf("the write ran %d times (err=%v)", rows, err)
			}
			if err == nil && rows != 1 {
				t.Errorf("acknowledged with %d rows", rows)
			}
			if wantAmbiguous && rows == 1 && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
				t.Errorf("%s: the write ran, its reply was lost: %v, does not match ErrAmbiguousCommit", text, err)
			}
		})
	}
}

// HOLDS: MariaDB compound statements outside stored programs (IF, CASE,
// WHILE, FOR, an Oracle-mode block) that commit, roll back, run DDL or
// CALL a committing procedure: seen, ErrAmbiguousCommit after one run.
func TestAttack9CompoundStatements(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"if", "IF 1 = 1 THEN COMMIT; END IF"},
		{"ifddl", "IF 1 = 1 THEN CREATE TABLE t%d (a int); END IF"},
		{"ifcall", "IF 1 = 1 THEN CALL pc(); END IF"},
		{"case", "CASE WHEN 1 = 1 THEN COMMIT; END CASE"},
		{"while", "WHILE @a9w IS NULL DO SET @a9w = 1; COMMIT; END WHILE"},
		{"for", "FOR i IN 1..1 DO COMMIT; END FOR"},
		{"forddl", "FOR i IN 1..1 DO CREATE TABLE f%d (a int); END FOR"},
		{"ifrollback", "IF 1 = 1 THEN ROLLBACK; END IF|INSERT INTO w VALUES ('ic-ifrollback')"},
		{"oracle", "SET sql_mode = ORACLE|DECLARE v INT; BEGIN COMMIT; END"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCaseSetup(t, tc.name, tc.stmts) })
	}
}

// FIXED (was DEFECT): a REPEAT ... UNTIL ... END REPEAT compound statement (legal
// outside stored programs on MariaDB, like IF, CASE, WHILE and FOR, which
// are seen) hides what it runs: COMMIT, DDL, a CALL of a procedure that
// commits, ROLLBACK (then an autocommitted INSERT), SET autocommit. The
// closure's INSERT is committed by it; the final COMMIT is cut in half;
// the attempt is replayed and the INSERT committed twice (RunInTx nil).
func TestAttack9RepeatHidesTxControl(t *testing.T) {
	cases := []struct{ name, stmts string }{
		{"commit", "REPEAT COMMIT; UNTIL 1 END REPEAT"},
		{"ddl", "REPEAT CREATE TABLE t%d (a int); UNTIL 1 END REPEAT"},
		{"call", "REPEAT CALL pc(); UNTIL 1 END REPEAT"},
		{"rollback", "REPEAT ROLLBACK; UNTIL 1 END REPEAT|INSERT INTO w VALUES ('ic-rollback')"},
		{"autocommit", "REPEAT SET autocommit = 0; UNTIL 1 END REPEAT|REPEAT SET autocommit = 1; UNTIL 1 END REPEAT"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { a9ImplicitCaseSetup(t, tc.name, tc.stmts) })
	}
}

// HOLDS: a write inside REPEAT or FOR is a write: in a transaction its
// lost COMMIT reply is resolved; in autocommit it is ErrAmbiguousCommit.
func TestAttack9CompoundWriteResolved(t *testing.T) {
	for _, q := range []string{
		"REPEAT INSERT INTO %s VALUES ('%s'); UNTIL 1 END REPEAT",
		"FOR i IN 1..1 DO INSERT INTO %s VALUES ('%s'); END FOR",
	} {
		t.Run("tx/"+q, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDB(t, c, "")
			op := atkName("rw")
			text := fmt.Sprintf(q, tbl, op)
			calls, err := a9Run(t, db, c, cutAfterSend, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				_, err := tx.ExecContext(ctx, text)
				return err
			})
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", text, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, text, err, calls, rows)
		})
	}
	a9AutocommitLost(t, false, []string{
		"REPEAT INSERT INTO %s VALUES ('%s'); UNTIL 1 END REPEAT",
	})
}

// HOLDS: the same with a visible COMMIT: RunInTx returns the 1205 after one
// run, the INSERT committed once.
func TestAttack9VisibleCommitThenLockTimeout(t *testing.T) {
	a9HiddenCommitLockTimeout(t, "COMMIT")
}

// HOLDS for BEGIN and /*!BEGIN*/; was DEFECT (fixed) for SET STATEMENT ... FOR BEGIN
// and REPEAT START TRANSACTION; ... END REPEAT (TestAttack9HandTxHiddenBeginDeadlockDefect).
// A transaction opened by hand on a pinned connection (README: followed
// through the whole text; no statement is retried inside it), with the
// BEGIN spelled so the reader may miss it. Its second UPDATE is the victim
// of a deadlock (1213): InnoDB rolls the whole transaction back. Retrying
// that UPDATE alone would run it in autocommit: half a transfer committed.
// The plain driver returns the 1213 and nothing of the transfer commits.
func TestAttack9HandTxHiddenBeginDeadlock(t *testing.T) {
	a9HandTxDeadlock(t, "BEGIN", "/*!BEGIN*/")
}

// FIXED (was DEFECT; no network fault needed): a hand-opened transaction whose BEGIN is
// SET STATEMENT ... FOR BEGIN or inside REPEAT: the deadlock victim's
// UPDATE is retried alone in autocommit and returns nil; the COMMIT
// succeeds; half the transfer is committed (n1=100 n2=101, the -1 lost).
func TestAttack9HandTxHiddenBeginDeadlockDefect(t *testing.T) {
	a9HandTxDeadlock(t, "SET STATEMENT sql_mode='' FOR BEGIN", "REPEAT START TRANSACTION; UNTIL 1 END REPEAT")
}

func a9HandTxDeadlock(t *testing.T, begins ...string) {
	for _, begin := range begins {
		t.Run(begin, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, dbName, _ := a9MyDB(t, c, "")
			x := dbName + ".x"
			atkMust(t, plain, "CREATE TABLE "+x+" (id int PRIMARY KEY, n int) ENGINE=InnoDB", "INSERT INTO "+x+" VALUES (1, 0), (2, 0)",
				"CREATE TABLE "+dbName+".heavy (id int PRIMARY KEY) ENGINE=InnoDB")
			ctx := a5Ctx(t, 15*time.Second)
			conn, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			must := func(q string) {
				if _, err := conn.ExecContext(ctx, q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			must(begin)
			must("UPDATE " + x + " SET n = n - 1 WHERE id = 1")
			// the other session: heavier (the deadlock's survivor), holds row 2, then waits for row 1
			pc, err := plain.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			ptx, err := pc.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ptx.Exec("INSERT INTO " + dbName + ".heavy SELECT seq FROM seq_1_to_2000"); err != nil {
				t.Fatal(err)
			}
			if _, err := ptx.Exec("UPDATE " + x + " SET n = n + 100 WHERE id = 2"); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := ptx.Exec("UPDATE " + x + " SET n = n + 100 WHERE id = 1")
				if err == nil {
					time.Sleep(300 * time.Millisecond)
					err = ptx.Commit()
				} else {
					ptx.Rollback()
				}
				done <- err
			}()
			time.Sleep(300 * time.Millisecond)
			_, err2 := conn.ExecContext(ctx, "UPDATE "+x+" SET n = n + 1 WHERE id = 2")
			_, err3 := conn.ExecContext(ctx, "COMMIT")
			perr := <-done
			var n1, n2 int
			plain.QueryRow("SELECT n FROM " + x + " WHERE id = 1").Scan(&n1)
			plain.QueryRow("SELECT n FROM " + x + " WHERE id = 2").Scan(&n2)
			t.Logf("%s: second UPDATE: %v; COMMIT: %v; other session: %v; n1=%d n2=%d", begin, err2, err3, perr, n1, n2)
			if perr != nil {
				t.Fatalf("the other session was the victim: %v", perr)
			}
			// the other session added 100 to each; ours is -1/+1 or nothing
			if !(n1 == 100 && n2 == 100) && !(n1 == 99 && n2 == 101) {
				t.Errorf("half a transfer committed: n1=%d n2=%d (want 100/100 or 99/101)", n1, n2)
			}
		})
	}
}

// A transaction opened by hand on a pinned connection; a plain read in it
// loses its connection after it was sent. The hand transaction died with
// the session: the read must not be retried on a new session as if it
// were in autocommit (README: no statement is retried inside a hand
// transaction), or the caller's later INSERT autocommits, its COMMIT
// succeeds, and the write made before the read is lost with every call
// having returned nil.
func TestAttack9HandTxReadLost(t *testing.T) {
	t.Run("pinned", func(t *testing.T) {
		a9HandTxReadLost(t, true, "BEGIN", "/*!BEGIN*/", "SET STATEMENT sql_mode='' FOR BEGIN", "REPEAT START TRANSACTION; UNTIL 1 END REPEAT")
	})
	t.Run("oneconn", func(t *testing.T) { a9HandTxReadLost(t, false, "BEGIN", "/*!BEGIN*/") })
}

// FIXED (was DEFECT; oneconn: a *sql.DB with SetMaxOpenConns(1), the hand transaction
// run through db.Exec): with the BEGIN under SET STATEMENT ... FOR or
// inside REPEAT, the read is retried on a new session and returns its
// row; INSERT b autocommits; COMMIT succeeds; INSERT a, acknowledged, is
// lost. (On a pinned *sql.Conn the caller gets the error: holds.)
func TestAttack9HandTxHiddenBeginReadLost(t *testing.T) {
	a9HandTxReadLost(t, false, "SET STATEMENT sql_mode='' FOR BEGIN", "REPEAT START TRANSACTION; UNTIL 1 END REPEAT")
}

type a9Execer interface {
	ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error)
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
}

func a9HandTxReadLost(t *testing.T, pinned bool, begins ...string) {
	for _, begin := range begins {
		t.Run(begin, func(t *testing.T) {
			c := &cutter{isCommit: func(p []byte) bool { return strings.HasSuffix(string(p), "SELECT 'a9probe'") }}
			db, plain, _, tbl := a9MyDB(t, c, "")
			ctx := a5Ctx(t, 15*time.Second)
			var conn a9Execer = db
			if pinned {
				pc, err := db.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				defer pc.Close()
				conn = pc
			} else {
				db.SetMaxOpenConns(1)
			}
			var errs []error
			step := func(q string) {
				_, err := conn.ExecContext(ctx, q)
				errs = append(errs, err)
			}
			step(begin)
			step("INSERT INTO " + tbl + " VALUES ('ha')")
			c.mode.Store(cutAfterSend)
			var s string
			rerr := conn.QueryRowContext(ctx, "SELECT 'a9probe'").Scan(&s)
			c.mode.Store(0)
			step("INSERT INTO " + tbl + " VALUES ('hb')")
			step("COMMIT")
			a := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'ha'")
			b := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'hb'")
			t.Logf("%s: read err=%v fired=%d; begin, insert a, insert b, commit: %v; rows a=%d b=%d", begin, rerr, c.fired.Load(), errs, a, b)
			if c.fired.Load() == 0 {
				t.Fatal("read not cut")
			}
			allNil := rerr == nil
			for _, e := range errs {
				allNil = allNil && e == nil
			}
			if allNil && a != 1 {
				t.Errorf("every call returned nil, yet INSERT a is not committed (a=%d b=%d)", a, b)
			}
			if rerr == nil {
				t.Errorf("the read inside the hand transaction was retried on another session")
			}
		})
	}
}

// HOLDS: the sentinel row deleted or its token changed by someone after the
// check, then a COMMIT's reply lost: committed (its marker is there) is
// success; never reached the server is ErrAmbiguousCommit or a replay,
// never two rows.
func TestAttack9SentinelTamperedThenLostCommit(t *testing.T) {
	for _, how := range []string{"delete", "update"} {
		for _, cut := range []int32{cutAfterSend, cutMidMessage} {
			t.Run(fmt.Sprintf("%s/cut%d", how, cut), func(t *testing.T) {
				c := &cutter{isCommit: mysqlCommit}
				db, plain, dbName, tbl := a9MyDB(t, c, "")
				marker := dbName + ".sqlretry_commit_marker"
				q := "DELETE FROM " + marker + " WHERE token >= 'sqlretry:' AND token < 'sqlretry;'"
				if how == "update" {
					q = "UPDATE " + marker + " SET token = UNHEX(MD5(RAND())) WHERE token >= 'sqlretry:' AND token < 'sqlretry;'"
				}
				atkMust(t, plain, q)
				op := "st-" + how
				calls, err := a9CutRun(t, db, c, tbl, op, cut)
				rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
				t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
				if c.fired.Load() == 0 {
					t.Fatal("COMMIT not cut")
				}
				a9Outcome(t, op, err, calls, rows)
				// the db keeps working afterwards
				if _, err := a9CutRun(t, db, c, tbl, op+"-next", 0); err != nil {
					t.Errorf("next transaction: %v", err)
				}
			})
		}
	}
}

// HOLDS: outside a transaction, a text that runs several statements, each in
// autocommit (a compound statement, a procedure), whose second statement
// times out on a lock (1205) after the first committed. README: only a
// text that is provably one atomic statement is retried; the plain driver
// returns the 1205 with the first INSERT committed once.
func TestAttack9AutocommitCompoundLockTimeout(t *testing.T) {
	for _, q := range []string{
		"BEGIN NOT ATOMIC INSERT INTO %[1]s VALUES ('%[3]s'); UPDATE %[2]s SET n = n + 1 WHERE id = 1; END",
		"IF 1 = 1 THEN INSERT INTO %[1]s VALUES ('%[3]s'); UPDATE %[2]s SET n = n + 1 WHERE id = 1; END IF",
		"WHILE @a9c IS NULL DO SET @a9c = 1; INSERT INTO %[1]s VALUES ('%[3]s'); UPDATE %[2]s SET n = n + 1 WHERE id = 1; END WHILE",
		"REPEAT INSERT INTO %[1]s VALUES ('%[3]s'); UPDATE %[2]s SET n = n + 1 WHERE id = 1; UNTIL 1 END REPEAT",
		"FOR i IN 1..1 DO INSERT INTO %[1]s VALUES ('%[3]s'); UPDATE %[2]s SET n = n + 1 WHERE id = 1; END FOR",
		"CALL %[1]s_p('%[3]s')",
		"SET STATEMENT sql_mode='' FOR CALL %[1]s_p('%[3]s')",
		"EXECUTE IMMEDIATE 'CALL %[1]s_p(''%[3]s'')'",
	} {
		t.Run(q, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, dbName, tbl := a9MyDB(t, c, "")
			x := dbName + ".x"
			atkMust(t, plain, "CREATE TABLE "+x+" (id int PRIMARY KEY, n int) ENGINE=InnoDB", "INSERT INTO "+x+" VALUES (1, 0)",
				"CREATE PROCEDURE "+tbl+"_p(o varchar(40)) BEGIN INSERT INTO "+tbl+" VALUES (o); UPDATE "+x+" SET n = n + 1 WHERE id = 1; END")
			db.SetMaxOpenConns(1)
			ctx := a5Ctx(t, 15*time.Second)
			if _, err := db.ExecContext(ctx, "SET SESSION innodb_lock_wait_timeout = 1"); err != nil {
				t.Fatal(err)
			}
			pc, err := plain.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			ptx, err := pc.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ptx.Exec("SELECT * FROM " + x + " WHERE id = 1 FOR UPDATE"); err != nil {
				t.Fatal(err)
			}
			go func() { time.Sleep(1200 * time.Millisecond); ptx.Rollback() }()
			op := atkName("cl")
			text := fmt.Sprintf(q, tbl, x, op)
			_, err = db.ExecContext(ctx, text)
			time.Sleep(1300 * time.Millisecond)
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v rows=%d", text, err, rows)
			if rows > 1 {
				t.Errorf("the first INSERT committed %d times (err=%v)", rows, err)
			}
		})
	}
}

// HOLDS: savepoints rolled back to, a trigger that writes into another
// database's table, and an XA statement the server refuses inside the
// transaction, each with the COMMIT's reply lost (or the COMMIT cut in
// half): the committed state once, never twice; XA START's own error
// after one run, as the plain driver gives it.
func TestAttack9SavepointTriggerXA(t *testing.T) {
	for _, cut := range []int32{cutAfterSend, cutMidMessage} {
		t.Run(fmt.Sprint("savepoint-trigger/cut", cut), func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, dbName, tbl := a9MyDB(t, c, "")
			other := atkName("a9au")
			atkMust(t, plain, "CREATE DATABASE "+other, "CREATE TABLE "+other+".audit (op varchar(40)) ENGINE=InnoDB",
				"CREATE TRIGGER "+dbName+".wt AFTER INSERT ON "+tbl+" FOR EACH ROW INSERT INTO "+other+".audit VALUES (NEW.op)")
			t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + other) })
			calls, err := a9Run(t, db, c, cut, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
				for _, q := range []string{
					"INSERT INTO " + tbl + " VALUES ('sa')", "SAVEPOINT s1", "INSERT INTO " + tbl + " VALUES ('sb')",
					"ROLLBACK TO SAVEPOINT s1", "INSERT INTO " + tbl + " VALUES ('sc')",
				} {
					if _, err := tx.ExecContext(ctx, q); err != nil {
						return err
					}
				}
				return nil
			})
			a := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'sa'")
			b := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'sb'")
			cc := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'sc'")
			au := a9Count(t, plain, "SELECT COUNT(*) FROM "+other+".audit WHERE op IN ('sa', 'sb', 'sc')")
			t.Logf("err=%v calls=%d a=%d b=%d c=%d audit=%d fired=%d", err, calls, a, b, cc, au, c.fired.Load())
			a9Outcome(t, "savepoint", err, calls, a)
			if b != 0 || cc != a || au != a+cc {
				t.Errorf("state: a=%d b=%d c=%d audit=%d", a, b, cc, au)
			}
		})
	}
	t.Run("xa", func(t *testing.T) {
		c := &cutter{isCommit: mysqlCommit}
		db, plain, _, tbl := a9MyDB(t, c, "")
		var perr error
		{
			ptx, err := plain.Begin()
			if err != nil {
				t.Fatal(err)
			}
			ptx.Exec("INSERT INTO " + tbl + " VALUES ('xp')")
			_, perr = ptx.Exec("XA START 'a9x'")
			ptx.Rollback()
		}
		calls, err := a9Run(t, db, c, 0, nil, func(ctx context.Context, tx *sql.Tx, calls int) error {
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('xa')"); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, "XA START 'a9x'")
			return err
		})
		rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'xa'")
		t.Logf("plain: %v; sqlretry: err=%v calls=%d rows=%d", perr, err, calls, rows)
		var me *mysql.MySQLError
		if calls != 1 || rows != 0 || !errors.As(err, &me) {
			t.Errorf("XA START in a transaction: err=%v calls=%d rows=%d; the plain driver: %v", err, calls, rows, perr)
		}
	})
}

// HOLDS: statements that commit implicitly and change server-wide state
// (users, grants, roles, caches, servers), inside the closure, then the
// final COMMIT cut in half: ErrAmbiguousCommit after one run. Private server.
func TestAttack9ImplicitCommitAdminStatements(t *testing.T) {
	a9AdminCases(t, []struct{ name, stmts string }{
		{"createuser", "CREATE USER a9u%d"},
		{"grant", "GRANT SELECT ON *.* TO a9g"},
		{"revoke", "REVOKE SELECT ON *.* FROM a9r"},
		{"setpassword", "SET PASSWORD FOR a9p = PASSWORD('x')"},
		{"renameuser", "RENAME USER a9n TO a9n%d"},
		{"resetqc", "RESET QUERY CACHE"},
		{"flushprivs", "FLUSH PRIVILEGES"},
		{"alteruser", "ALTER USER a9a ACCOUNT LOCK"},
		{"createrole", "CREATE ROLE a9role%d"},
		{"droprole", "DROP ROLE a9dr"},
		{"alterdb", "ALTER DATABASE CHARACTER SET utf8mb4"},
		{"createserver", "CREATE SERVER a9s%d FOREIGN DATA WRAPPER mysql OPTIONS (HOST '127.0.0.1')"},
	})
}

// FIXED (was DEFECT): SET DEFAULT ROLE ... FOR ... commits implicitly on MariaDB (it
// writes the privilege tables) and is not seen: the closure's INSERT is
// committed by it, the final COMMIT is cut in half, the attempt is
// replayed, the INSERT committed twice (RunInTx nil). Private server.
func TestAttack9SetDefaultRoleReplayed(t *testing.T) {
	a9AdminCases(t, []struct{ name, stmts string }{
		{"defaultrole", "SET DEFAULT ROLE a9role FOR a9d"},
		{"defaultrolenone", "SET DEFAULT ROLE NONE FOR a9d"},
	})
}

func a9AdminCases(t *testing.T, cases []struct{ name, stmts string }) {
	dsn := needPrivate(t, "mysql")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &cutter{isCommit: mysqlCommit}
			db, plain, _, tbl := a9MyDBAt(t, dsn, c, "")
			n := rand.IntN(1000000)
			for _, u := range []string{"a9g", "a9r", "a9p", "a9n", "a9d", "a9a", "a9dr"} {
				plain.Exec("DROP USER IF EXISTS " + u)
				plain.Exec("DROP ROLE IF EXISTS " + u)
			}
			plain.Exec("DROP ROLE IF EXISTS a9role")
			atkMust(t, plain, "CREATE USER a9g", "CREATE USER a9r", "GRANT SELECT ON *.* TO a9r", "CREATE USER a9p", "CREATE USER a9n",
				"CREATE USER a9d", "CREATE ROLE a9role", "GRANT a9role TO a9d", "CREATE USER a9a", "CREATE ROLE a9dr")
			stmt := strings.ReplaceAll(tc.stmts, "%d", fmt.Sprint(n)+"_%d")
			stmts := strings.Split(stmt, "|")
			for i := range stmts {
				if strings.HasSuffix(stmts[i], " w") {
					stmts[i] = strings.TrimSuffix(stmts[i], " w") + " " + tbl
				}
			}
			op := "adm-" + tc.name
			calls, err := a9CutRun(t, db, c, tbl, op, cutMidMessage, stmts...)
			rows := a9Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d", stmt, err, calls, rows, c.fired.Load())
			if c.fired.Load() == 0 {
				t.Fatalf("COMMIT not cut (err=%v)", err)
			}
			a9Outcome(t, tc.name, err, calls, rows)
		})
	}
}

// HOLDS: more server-wide statements (BACKUP STAGE, BACKUP LOCK, INSTALL
// SONAME, SET PASSWORD, CREATE OR REPLACE USER, ALTER SERVER) are seen;
// SET ROLE (no commit) is replayed, one row. Private server.
func TestAttack9ImplicitCommitAdminStatements2(t *testing.T) {
	a9AdminCases(t, []struct{ name, stmts string }{
		{"backupstage", "BACKUP STAGE START|BACKUP STAGE END"},
		{"backuplock", "BACKUP LOCK w|BACKUP UNLOCK"},
		{"installsoname", "INSTALL SONAME 'ha_blackhole'|UNINSTALL SONAME 'ha_blackhole'"},
		{"setpasswordself", "SET PASSWORD = PASSWORD('')"},
		{"createorreplaceuser", "CREATE OR REPLACE USER a9c%d"},
		{"alterserver", "CREATE SERVER IF NOT EXISTS a9srv FOREIGN DATA WRAPPER mysql OPTIONS (HOST '127.0.0.1')|ALTER SERVER a9srv OPTIONS (USER 'x')"},
		{"setrole", "SET ROLE a9role|SET ROLE NONE"},
	})
}
