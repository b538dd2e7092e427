package integration

// Hostile tests (attack7), from the README and the public API only:
// a lost COMMIT while the old backend is still running a deferred trigger
// in its COMMIT; shadow mode flipped while deadlock-prone transfers run
// with short lock waits engaged; the MariaDB commit marker dropped and
// recreated while writing transactions run.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/sqlretry/sqlretry"
)

// The COMMIT's reply is lost while the old backend is still in its COMMIT,
// running a deferred constraint trigger that sleeps and writes a side row.
// sqlretry must wait for it (not end it, not replay): success, one row,
// one trigger side effect.
func TestAttack7LostCommitDuringDeferredTrigger(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	db := openCutPostgresAt(t, c, atkPG)
	defer db.Close()
	tbl := table(t, db, "a7dt")
	side := table(t, db, "a7side")
	fn := tbl + "_f"
	t.Cleanup(func() { db.Exec("DROP FUNCTION IF EXISTS " + fn + "() CASCADE") })
	mustExec(t, db,
		"CREATE TABLE "+tbl+" (op text)",
		"CREATE TABLE "+side+" (op text)",
		"CREATE FUNCTION "+fn+"() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(1.5); INSERT INTO "+side+" VALUES (NEW.op); RETURN NULL; END$$",
		"CREATE CONSTRAINT TRIGGER "+tbl+"_t AFTER INSERT ON "+tbl+" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "+fn+"()",
	)
	for _, cut := range []int32{cutAfterSend, cutMidMessage} {
		t.Run(fmt.Sprintf("cut%d", cut), func(t *testing.T) {
			op := fmt.Sprintf("op%d", cut)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			calls := 0
			start := time.Now()
			err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op); err != nil {
					return err
				}
				if calls == 1 {
					c.mode.Store(cut)
				}
				return nil
			})
			c.mode.Store(0)
			rows := a7Count(t, db, "SELECT COUNT(*) FROM "+tbl+" WHERE op = $1", op)
			sides := a7Count(t, db, "SELECT COUNT(*) FROM "+side+" WHERE op = $1", op)
			t.Logf("err=%v calls=%d rows=%d side=%d fired=%d in %v", err, calls, rows, sides, c.fired.Load(), time.Since(start))
			if c.fired.Load() == 0 {
				t.Fatal("COMMIT not cut")
			}
			if err != nil {
				if errors.Is(err, sqlretry.ErrAmbiguousCommit) && rows <= 1 && sides == rows {
					return // honest, if weak
				}
				t.Fatalf("err=%v rows=%d side=%d", err, rows, sides)
			}
			if rows != 1 || sides != 1 {
				t.Errorf("acknowledged: rows=%d side effects=%d calls=%d; want exactly 1 and 1", rows, sides, calls)
			}
		})
	}
}

// A NOTIFY-only transaction whose COMMIT reply is lost: resolved (success or
// ErrAmbiguousCommit), never a second NOTIFY delivered from a replay of a
// committed one.
func TestAttack7LostCommitNotifyOnly(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	db := openCutPostgresAt(t, c, atkPG)
	defer db.Close()
	ch := fmt.Sprintf("a7ch_%d", rand.Uint32())
	lctx, lcancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer lcancel()
	lconn, err := pgx.Connect(lctx, atkPG)
	if err != nil {
		t.Fatal(err)
	}
	defer lconn.Close(context.Background())
	if _, err := lconn.Exec(lctx, "LISTEN "+ch); err != nil {
		t.Fatal(err)
	}
	for _, cut := range []int32{cutAfterSend, cutMidMessage} {
		payload := fmt.Sprintf("p%d", cut)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		calls := 0
		err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "SELECT pg_notify($1, $2)", ch, payload); err != nil {
				return err
			}
			if calls == 1 {
				c.mode.Store(cut)
			}
			return nil
		})
		cancel()
		c.mode.Store(0)
		got := 0
		for {
			wctx, wcancel := context.WithTimeout(lctx, 700*time.Millisecond)
			n, werr := lconn.WaitForNotification(wctx)
			wcancel()
			if werr != nil {
				break
			}
			if n.Payload == payload {
				got++
			}
		}
		t.Logf("cut%d: err=%v calls=%d notifications=%d fired=%d", cut, err, calls, got, c.fired.Load())
		if c.fired.Load() == 0 {
			t.Fatal("COMMIT not cut")
		}
		switch {
		case err == nil && got != 1:
			t.Errorf("cut%d: acknowledged, %d notifications delivered; want 1", cut, got)
		case err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit):
			t.Errorf("cut%d: %v (not ambiguous), %d notifications", cut, err, got)
		case got > 1:
			t.Errorf("cut%d: %d notifications: the committed NOTIFY was replayed", cut, got)
		}
	}
}

func a7Count(t *testing.T, db *sql.DB, q string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// Transfers in opposite orders (deadlocks, so short lock waits engage for
// the db) while another goroutine flips shadow mode every 15 ms. The plain
// driver would never give 55P03 here (no lock_timeout set by anyone), so a
// 55P03 reaching the caller is sqlretry's. Every acknowledged transfer is
// in the ledger exactly once; balances match the ledger.
func TestAttack7ShadowFlipsDuringShortLockWaits(t *testing.T) {
	db := a5Open(t, atkPG, 8)
	plain := a5Plain(t, atkPG)
	acct := table(t, plain, "a7acct")
	ledger := table(t, plain, "a7ledger")
	mustExec(t, plain,
		"CREATE TABLE "+acct+" (id int PRIMARY KEY, bal bigint NOT NULL)",
		"INSERT INTO "+acct+" SELECT g, 0 FROM generate_series(1, 4) g",
		"CREATE TABLE "+ledger+" (tok text PRIMARY KEY, src int)")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	var flips atomic.Int32
	go func() {
		on := false
		for ctx.Err() == nil {
			on = !on
			sqlretry.SetShadow(db, on)
			flips.Add(1)
			time.Sleep(15 * time.Millisecond)
		}
		sqlretry.SetShadow(db, false)
	}()
	var mu sync.Mutex
	okToks := map[string]bool{}
	errs := map[string]int{}
	var msgs []string // the 55P03 ones, in full
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				a, b := rand.IntN(4)+1, rand.IntN(3)+1
				if b >= a {
					b++
				}
				tok := fmt.Sprintf("g%d-%d", g, i)
				cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
				err := sqlretry.RunInTx(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					if _, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal - 1 WHERE id = $1", a); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "SELECT pg_sleep(0.002)"); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, "UPDATE "+acct+" SET bal = bal + 1 WHERE id = $1", b); err != nil {
						return err
					}
					_, err := tx.ExecContext(ctx, "INSERT INTO "+ledger+" VALUES ($1, $2)", tok, a)
					return err
				})
				ccancel()
				mu.Lock()
				if err == nil {
					okToks[tok] = true
				} else {
					k := err.Error()
					var pe *pgconn.PgError
					if errors.As(err, &pe) {
						k = pe.Code
					}
					if k == "55P03" {
						msgs = append(msgs, err.Error())
					}
					errs[k]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	var inLedger, bal1, bal2 int
	plain.QueryRow("SELECT COUNT(*) FROM " + ledger).Scan(&inLedger)
	if err := plain.QueryRow("SELECT COALESCE(SUM(bal), 0)::bigint, COALESCE(SUM(abs(bal)), 0)::bigint FROM "+acct).Scan(&bal1, &bal2); err != nil {
		t.Fatal(err)
	}
	st, _ := sqlretry.StatsOf(db)
	t.Logf("flips=%d ok=%d ledger=%d balance sum=%d sum|bal|=%d errors=%v stats=%+v", flips.Load(), len(okToks), inLedger, bal1, bal2, errs, st)
	rows, err := plain.Query("SELECT tok FROM " + ledger)
	if err != nil {
		t.Fatal(err)
	}
	inDB := map[string]bool{}
	for rows.Next() {
		var tok string
		rows.Scan(&tok)
		inDB[tok] = true
	}
	rows.Close()
	for tok := range okToks {
		if !inDB[tok] {
			t.Errorf("acknowledged transfer %s not in the ledger", tok)
		}
	}
	if bal1 != 0 {
		t.Errorf("balances sum to %d, not 0", bal1)
	}
	if inLedger != len(okToks) {
		t.Errorf("%d transfers in the ledger, %d acknowledged (shadow-mode errors are the driver's: none of them may have committed)", inLedger, len(okToks))
	}
	if n := errs["55P03"]; n > 0 {
		t.Errorf("%d calls got 55P03 (lock_timeout), which the plain driver never gives here: %v", n, msgs)
	}
	for k, n := range errs {
		// A deadlock, or the caller's deadline (a first attempt that
		// waited 5 s behind a queue of cycles, each found only after
		// deadlock_timeout, as the plain driver's would): both the plain
		// driver gives too.
		if k != "40P01" && k != "55P03" && !strings.HasSuffix(k, context.DeadlineExceeded.Error()) {
			t.Errorf("%d calls got %q", n, k)
		}
	}
}

// The MariaDB default commit marker table is dropped and recreated (by an
// administrator, say) while writing transactions run. Every acknowledged
// write is there exactly once; no error the plain driver would not give.
func TestAttack7MyMarkerDroppedAndRecreatedUnderTraffic(t *testing.T) {
	plain := atkPlain(t, "mysql")
	dbName := atkName("a7mk")
	atkMust(t, plain, "CREATE DATABASE "+dbName)
	t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
	cfg, err := mysql.ParseDSN("root@tcp(127.0.0.1:3306)/" + dbName + "?parseTime=true&multiStatements=true")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db := sqlretry.OpenDB(conn)
	defer db.Close()
	db.SetMaxOpenConns(6)
	tbl := dbName + ".w"
	atkMust(t, plain, "CREATE TABLE "+tbl+" (tok varchar(40) PRIMARY KEY) ENGINE=InnoDB")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	marker := dbName + ".sqlretry_commit_marker"
	var drops atomic.Int32
	var ddlErr atomic.Value
	go func() {
		for ctx.Err() == nil {
			time.Sleep(time.Duration(50+rand.IntN(100)) * time.Millisecond)
			var create string
			if err := plain.QueryRow("SHOW CREATE TABLE "+marker).Scan(new(string), &create); err != nil {
				continue // not there yet
			}
			if _, err := plain.Exec("DROP TABLE " + marker); err != nil {
				ddlErr.Store(err)
				continue
			}
			drops.Add(1)
			time.Sleep(time.Duration(rand.IntN(80)) * time.Millisecond)
			create = strings.Replace(create, "CREATE TABLE `sqlretry_commit_marker`", "CREATE TABLE IF NOT EXISTS "+marker, 1)
			if _, err := plain.Exec(create); err != nil {
				ddlErr.Store(err)
			}
		}
	}()
	var mu sync.Mutex
	ok := map[string]bool{}
	errs := map[string]int{}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				tok := fmt.Sprintf("g%d-%d", g, i)
				cctx, ccancel := context.WithTimeout(context.Background(), 8*time.Second)
				err := sqlretry.RunInTx(cctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", tok)
					return err
				})
				ccancel()
				mu.Lock()
				if err == nil {
					ok[tok] = true
				} else {
					errs[err.Error()]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	inDB := map[string]bool{}
	rows, err := plain.Query("SELECT tok FROM " + tbl)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var tok string
		rows.Scan(&tok)
		inDB[tok] = true
	}
	rows.Close()
	st, _ := sqlretry.StatsOf(db)
	t.Logf("drops=%d ok=%d inDB=%d errors=%v ddlErr=%v stats=%+v", drops.Load(), len(ok), len(inDB), errs, ddlErr.Load(), st)
	if drops.Load() == 0 {
		t.Fatal("marker never dropped: nothing tested")
	}
	for tok := range ok {
		if !inDB[tok] {
			t.Errorf("acknowledged %s not committed", tok)
		}
	}
	for k, n := range errs {
		t.Errorf("%d calls failed: %s", n, k)
	}
	// after the storm, a writing transaction still works
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('after')")
		return err
	}); err != nil {
		t.Errorf("after the storm: %v", err)
	}
}

// A COMMIT (with its marker) whose reply is lost; before sqlretry looks for
// the marker, an administrator empties the marker table (drop and
// recreate, or TRUNCATE). The write committed: it must not be run again.
func TestAttack7MyMarkerEmptiedBetweenLostCommitAndLookup(t *testing.T) {
	// Was a DEFECT (err=<nil> calls=2 rows=2 in all three cases): the
	// lookup now reads a sentinel row beside the token, and a table that
	// lost it makes the COMMIT ambiguous, never replayed.
	for _, how := range []string{"recreate", "truncate", "delete"} {
		t.Run(how, func(t *testing.T) {
			plain := atkPlain(t, "mysql")
			dbName := atkName("a7ml")
			atkMust(t, plain, "CREATE DATABASE "+dbName)
			t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
			tbl := dbName + ".w"
			marker := dbName + ".sqlretry_commit_marker"
			atkMust(t, plain, "CREATE TABLE "+tbl+" (op varchar(40)) ENGINE=InnoDB")
			c := &cutter{isCommit: mysqlCommit}
			var armed atomic.Bool
			var hookErr atomic.Value
			op := "op-" + how
			dial := afterCommitSentBy(mysqlCommit, c.dial, func() {
				if !armed.Swap(false) {
					return
				}
				for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
					var n int
					if plain.QueryRow("SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op).Scan(&n); n > 0 {
						break
					}
				}
				var create string
				if err := plain.QueryRow("SHOW CREATE TABLE "+marker).Scan(new(string), &create); err != nil {
					hookErr.Store(err)
					return
				}
				var qs []string
				switch how {
				case "recreate":
					qs = []string{"DROP TABLE " + marker, strings.Replace(create, "CREATE TABLE `sqlretry_commit_marker`", "CREATE TABLE "+marker, 1)}
				case "truncate":
					qs = []string{"TRUNCATE TABLE " + marker}
				case "delete":
					qs = []string{"DELETE FROM " + marker}
				}
				for _, q := range qs {
					if _, err := plain.Exec(q); err != nil {
						hookErr.Store(fmt.Errorf("%s: %w", q, err))
					}
				}
			})
			netName := atkName("a7mlnet")
			mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) })
			defer mysql.DeregisterDialContext(netName)
			cfg, err := mysql.ParseDSN("root@" + netName + "(127.0.0.1:3306)/" + dbName + "?parseTime=true&multiStatements=true")
			if err != nil {
				t.Fatal(err)
			}
			conn, err := mysql.NewConnector(cfg)
			if err != nil {
				t.Fatal(err)
			}
			db := sqlretry.OpenDB(conn)
			defer db.Close()
			// warm up: the marker table is created
			if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm')")
				return err
			}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			calls := 0
			err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
				calls++
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES (?)", op); err != nil {
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
			rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = ?", op)
			t.Logf("%s: err=%v calls=%d rows=%d fired=%d hookErr=%v", how, err, calls, rows, c.fired.Load(), hookErr.Load())
			if c.fired.Load() == 0 {
				t.Fatal("COMMIT not cut")
			}
			if hookErr.Load() != nil {
				t.Fatalf("could not empty the marker: %v", hookErr.Load())
			}
			if rows > 1 {
				t.Errorf("%s: the committed write ran %d times (calls=%d, err=%v)", how, rows, calls, err)
			}
			if err == nil && rows != 1 {
				t.Errorf("%s: acknowledged with %d rows", how, rows)
			}
			if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
				t.Errorf("%s: %v, want nil or ErrAmbiguousCommit", how, err)
			}
		})
	}
}

// As TestAttack7LostCommitDuringDeferredTrigger, but every dial fails for
// 400 ms after the COMMIT went out (a short partition), so pgx's cancel
// request never reaches the server and the old backend is still in its
// COMMIT (the deferred trigger sleeps 1.5 s) when sqlretry first looks.
func TestAttack7LostCommitDuringDeferredTriggerPartitioned(t *testing.T) {
	c := &cutter{isCommit: pgCommit}
	var blockUntil atomic.Int64
	var refused atomic.Int32
	dial := afterCommitSentBy(pgCommit, c.dial, func() {
		if c.fired.Load() > 0 && blockUntil.Load() == 0 {
			blockUntil.Store(time.Now().Add(400 * time.Millisecond).UnixNano())
		}
	})
	cfg, err := pgx.ParseConfig(atkPG)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if time.Now().UnixNano() < blockUntil.Load() {
			refused.Add(1)
			return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("attack7 partition")}
		}
		return dial(ctx, network, addr)
	}
	db := sqlretry.OpenDB(stdlib.GetConnector(*cfg))
	defer db.Close()
	tbl := table(t, db, "a7dp")
	side := table(t, db, "a7dps")
	fn := tbl + "_f"
	t.Cleanup(func() { db.Exec("DROP FUNCTION IF EXISTS " + fn + "() CASCADE") })
	mustExec(t, db,
		"CREATE TABLE "+tbl+" (op text)",
		"CREATE TABLE "+side+" (op text)",
		"CREATE FUNCTION "+fn+"() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(1.5); INSERT INTO "+side+" VALUES (NEW.op); RETURN NULL; END$$",
		"CREATE CONSTRAINT TRIGGER "+tbl+"_t AFTER INSERT ON "+tbl+" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "+fn+"()",
	)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	calls := 0
	start := time.Now()
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')"); err != nil {
			return err
		}
		if calls == 1 {
			c.mode.Store(cutAfterSend)
		}
		return nil
	})
	c.mode.Store(0)
	rows := a7Count(t, db, "SELECT COUNT(*) FROM "+tbl)
	sides := a7Count(t, db, "SELECT COUNT(*) FROM "+side)
	t.Logf("err=%v calls=%d rows=%d side=%d fired=%d refused dials=%d in %v", err, calls, rows, sides, c.fired.Load(), refused.Load(), time.Since(start))
	if c.fired.Load() == 0 {
		t.Fatal("COMMIT not cut")
	}
	if rows > 1 || sides != rows {
		t.Errorf("rows=%d side effects=%d calls=%d err=%v", rows, sides, calls, err)
	}
	if err == nil && rows != 1 {
		t.Errorf("acknowledged with %d rows", rows)
	}
	if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
		t.Errorf("err=%v: neither success nor ErrAmbiguousCommit", err)
	}
}

// Errors the closure makes itself, or gets from outside the transaction,
// that look like replay causes (ErrBadConn, a connection-lost error, a
// 40001/40P01/1213 raised by another session, a deadline error while the
// caller's context is fine): README says they come back unchanged after
// one run, the write rolled back.
func TestAttack7ClosureOwnLookalikeErrors(t *testing.T) {
	plainPG := a5Plain(t, atkPG)
	var pgRaised error
	_, pgRaised = plainPG.Exec(`DO $$BEGIN RAISE EXCEPTION 'elsewhere' USING ERRCODE = '40001'; END$$`)
	var pgDeadlock error
	_, pgDeadlock = plainPG.Exec(`DO $$BEGIN RAISE EXCEPTION 'elsewhere' USING ERRCODE = '40P01'; END$$`)
	if pgRaised == nil || pgDeadlock == nil {
		t.Fatal("no error raised elsewhere")
	}
	own := map[string]error{
		"ErrBadConn":          driver.ErrBadConn,
		"ErrConnDone":         sql.ErrConnDone,
		"mysqlErrInvalidConn": mysql.ErrInvalidConn,
		"DeadlineExceeded":    context.DeadlineExceeded,
		"fabricated40001":     &pgconn.PgError{Code: "40001", Message: "made up"},
		"fabricated1213":      &mysql.MySQLError{Number: 1213, Message: "made up"},
		"elsewhere40001":      pgRaised,
		"elsewhere40P01":      fmt.Errorf("wrapped: %w", pgDeadlock),
		"netOpError":          &net.OpError{Op: "read", Net: "tcp", Err: errors.New("connection reset by peer")},
	}
	for _, driverName := range []string{"pgx", "mysql"} {
		var db *sql.DB
		ph := "?"
		if driverName == "pgx" {
			db = a5Open(t, atkPG, 2)
			ph = "$1"
		} else {
			db = atkOpenMy(t)
		}
		ins := "INSERT INTO %s VALUES (" + ph + ")"
		tbl := table(t, db, "a7own")
		mustExec(t, db, "CREATE TABLE "+tbl+" (op varchar(40))")
		for name, e := range own {
			t.Run(driverName+"/"+name, func(t *testing.T) {
				calls := 0
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					if _, err := tx.ExecContext(ctx, fmt.Sprintf(ins, tbl), name); err != nil {
						return err
					}
					return e
				})
				var n int
				if err := db.QueryRow(fmt.Sprintf("SELECT COUNT(*) FROM %s WHERE op = %s", tbl, ph), name).Scan(&n); err != nil {
					t.Fatal(err)
				}
				if calls != 1 || !errors.Is(err, e) || n != 0 {
					t.Errorf("closure returned %v: calls=%d err=%v rows=%d; want 1 run, the same error, nothing committed", e, calls, err, n)
				}
			})
		}
	}
}

// SetShadow flipped inside the closure, then the COMMIT's reply is lost.
// "A transaction [follows] the mode of its BEGIN": begun enforcing, the
// lost COMMIT is resolved (success, one row); begun in shadow, the plain
// driver's error comes back after one run, and never a second row.
func TestAttack7ShadowFlippedInsideALostCommit(t *testing.T) {
	for _, startShadow := range []bool{false, true} {
		for _, cut := range []int32{cutAfterSend, cutMidMessage} {
			t.Run(fmt.Sprintf("startShadow=%v/cut%d", startShadow, cut), func(t *testing.T) {
				c := &cutter{isCommit: pgCommit}
				db := openCutPostgresAt(t, c, atkPG)
				defer db.Close()
				tbl := table(t, db, "a7sf")
				mustExec(t, db, "CREATE TABLE "+tbl+" (op text)")
				sqlretry.SetShadow(db, startShadow)
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				defer cancel()
				calls := 0
				err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('x')"); err != nil {
						return err
					}
					if calls == 1 {
						sqlretry.SetShadow(db, !startShadow)
						c.mode.Store(cut)
					}
					return nil
				})
				c.mode.Store(0)
				sqlretry.SetShadow(db, false)
				time.Sleep(300 * time.Millisecond) // let a shadow-mode COMMIT land
				rows := a7Count(t, db, "SELECT COUNT(*) FROM "+tbl)
				t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
				if c.fired.Load() == 0 {
					t.Fatal("COMMIT not cut")
				}
				if rows > 1 {
					t.Fatalf("committed twice (calls=%d)", calls)
				}
				if err == nil && rows != 1 {
					t.Errorf("acknowledged with %d rows", rows)
				}
				if startShadow && calls != 1 {
					t.Errorf("begun in shadow mode: %d runs, want 1 (the plain driver's transaction)", calls)
				}
				if !startShadow && err != nil {
					t.Errorf("begun enforcing: %v, want the lost COMMIT resolved", err)
				}
			})
		}
	}
}

// a7MyOwnDB opens a sqlretry db on its own database of the shared MariaDB,
// its connections through c, and warms it up (the default marker table is
// created). It returns the db, a plain db, the database and a table w.
func a7MyOwnDB(t *testing.T, c *cutter) (db, plain *sql.DB, dbName, tbl string) {
	t.Helper()
	plain = atkPlain(t, "mysql")
	dbName = atkName("a7mo")
	atkMust(t, plain, "CREATE DATABASE "+dbName)
	t.Cleanup(func() { plain.Exec("DROP DATABASE IF EXISTS " + dbName) })
	tbl = dbName + ".w"
	atkMust(t, plain, "CREATE TABLE "+tbl+" (op varchar(40)) ENGINE=InnoDB")
	netName := atkName("a7monet")
	mysql.RegisterDialContext(netName, func(ctx context.Context, addr string) (net.Conn, error) { return c.dial(ctx, "tcp", addr) })
	t.Cleanup(func() { mysql.DeregisterDialContext(netName) })
	cfg, err := mysql.ParseDSN("root@" + netName + "(127.0.0.1:3306)/" + dbName + "?parseTime=true&multiStatements=true")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db = sqlretry.OpenDB(conn)
	t.Cleanup(func() { db.Close() })
	if err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('warm')")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return db, plain, dbName, tbl
}

// The marker table is altered by an administrator after the db checked it
// (README: a table of such a shape found at the check turns the default
// marker off). With the token column narrowed, a normal write must still
// succeed as it does through the plain driver; with a trigger that
// rewrites the token, a lost COMMIT must not be replayed.
func TestAttack7MyMarkerAlteredAfterTheCheck(t *testing.T) {
	t.Run("narrowed", func(t *testing.T) {
		c := &cutter{isCommit: mysqlCommit}
		db, plain, dbName, tbl := a7MyOwnDB(t, c)
		atkMust(t, plain, "DELETE FROM "+dbName+".sqlretry_commit_marker",
			"ALTER TABLE "+dbName+".sqlretry_commit_marker MODIFY token VARBINARY(4) NOT NULL")
		calls := 0
		err := sqlretry.RunInTx(a5Ctx(t, 10*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('n')")
			return err
		})
		rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 'n'")
		t.Logf("err=%v calls=%d rows=%d", err, calls, rows)
		if err != nil || rows != 1 {
			t.Errorf("a plain write after the marker was narrowed: err=%v rows=%d calls=%d; the plain driver commits it", err, rows, calls)
		}
	})
	t.Run("trigger", func(t *testing.T) {
		// Was a DEFECT (err=<nil> calls=2 rows=2): a token not found is
		// "not committed" only while no trigger is on the table.
		c := &cutter{isCommit: mysqlCommit}
		db, plain, dbName, tbl := a7MyOwnDB(t, c)
		atkMust(t, plain, "CREATE TRIGGER "+dbName+".mt BEFORE INSERT ON "+dbName+".sqlretry_commit_marker FOR EACH ROW SET NEW.token = UNHEX(MD5(RAND()))")
		calls := 0
		err := sqlretry.RunInTx(a5Ctx(t, 15*time.Second), db, nil, func(ctx context.Context, tx *sql.Tx) error {
			calls++
			if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ('t')"); err != nil {
				return err
			}
			if calls == 1 {
				c.mode.Store(cutAfterSend)
			}
			return nil
		})
		c.mode.Store(0)
		rows := a7Count(t, plain, "SELECT COUNT(*) FROM "+tbl+" WHERE op = 't'")
		t.Logf("err=%v calls=%d rows=%d fired=%d", err, calls, rows, c.fired.Load())
		if c.fired.Load() == 0 {
			t.Fatal("COMMIT not cut")
		}
		if rows > 1 {
			t.Errorf("the committed write ran %d times (calls=%d, err=%v)", rows, calls, err)
		}
		if err == nil && rows != 1 {
			t.Errorf("acknowledged with %d rows", rows)
		}
		if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
			t.Errorf("%v, want nil or ErrAmbiguousCommit", err)
		}
	})
}

// Three replicas (three *sql.DB on one PostgreSQL, one of them in shadow
// mode) write into one ledger while every third COMMIT of each has its reply
// lost (after send or mid-message, alternately). Each op is in the ledger
// at most once; every acknowledged op exactly once; errors only ambiguous
// commits (enforcing replicas) or the driver's own (the shadow one).
func TestAttack7ReplicasLostCommitsAtOnce(t *testing.T) {
	plain := a5Plain(t, atkPG)
	tbl := table(t, plain, "a7rep")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)")
	type rep struct {
		c      *cutter
		db     *sql.DB
		shadow bool
	}
	var reps []rep
	for i := range 3 {
		c := &cutter{isCommit: pgCommit}
		db := openCutPostgresAt(t, c, atkPG)
		t.Cleanup(func() { db.Close() })
		db.SetMaxOpenConns(3)
		if i == 2 {
			sqlretry.SetShadow(db, true)
		}
		reps = append(reps, rep{c, db, i == 2})
	}
	var mu sync.Mutex
	ok := map[string]bool{}
	var bad []string
	var wg sync.WaitGroup
	for ri, r := range reps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 12 {
				op := fmt.Sprintf("r%d-%d", ri, i)
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				calls := 0
				err := sqlretry.RunInTx(ctx, r.db, nil, func(ctx context.Context, tx *sql.Tx) error {
					calls++
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op); err != nil {
						return err
					}
					if calls == 1 && i%3 == 0 {
						r.c.mode.Store(int32(1 + (i/3)%2))
					}
					return nil
				})
				cancel()
				r.c.mode.Store(0)
				mu.Lock()
				if err == nil {
					ok[op] = true
				} else if !r.shadow && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
					bad = append(bad, fmt.Sprintf("%s: %v", op, err))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	time.Sleep(300 * time.Millisecond)
	counts := map[string]int{}
	rows, err := plain.Query("SELECT op, COUNT(*) FROM " + tbl + " GROUP BY op")
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
	fired := 0
	for _, r := range reps {
		fired += int(r.c.fired.Load())
	}
	t.Logf("acknowledged=%d distinct in ledger=%d cuts=%d other errors=%v", len(ok), len(counts), fired, bad)
	for op, n := range counts {
		if n > 1 {
			t.Errorf("%s committed %d times", op, n)
		}
	}
	for op := range ok {
		if counts[op] != 1 {
			t.Errorf("%s acknowledged, %d in the ledger", op, counts[op])
		}
	}
	for _, b := range bad {
		t.Errorf("unexpected error on an enforcing replica: %s", b)
	}
	if fired == 0 {
		t.Fatal("no COMMIT cut")
	}
}
