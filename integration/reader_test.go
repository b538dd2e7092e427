package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sqlretry/sqlretry"
)

// Issue 9 items 1 and 3 on the shared servers: these tests only take row
// locks (no kills, no restarts), with names of their own.

// sharedDSN is the shared server's DSN (or the environment's).
func sharedDSN(t *testing.T, driverName string) string {
	t.Helper()
	d := dsn("SQLRETRY_PG_DSN", defaultPG)
	if driverName == "mysql" {
		d = dsn("SQLRETRY_MYSQL_DSN", defaultMySQL)
	}
	if err := ping(driverName, d); err != nil {
		unavailable(t, fmt.Sprintf("%s: %v", d, err))
	}
	return d
}

// rowHolder holds a row lock on id = 7 of tbl from a plain connection
// until release is called; release waits for the holder to finish.
func rowHolder(t *testing.T, driverName, dsn, tbl string) (release func()) {
	t.Helper()
	raw, err := sql.Open(driverName, dsn)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := raw.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec("UPDATE " + tbl + " SET n = n + 1 WHERE id = 7"); err != nil {
		t.Fatal(err)
	}
	done := false
	release = func() {
		if !done {
			done = true
			tx.Rollback()
			raw.Close()
		}
	}
	t.Cleanup(release)
	return release
}

// A call the server started and then rolled back only in part (a lock-wait
// timeout rolls back one statement; a procedure commits inside) must not
// run again: the caller gets the error, and the committed part stays once.
func TestReaderPartlyRunCallIsNotRerun(t *testing.T) {
	type tc struct {
		name, driver string
		setup        []string // {log} and {acct} are replaced
		session      string   // run on the pinned connection first
		call         string
		cleanup      string
		code         string // the error the caller must get
	}
	suffix := fmt.Sprintf("%d", rand.Uint32())
	cases := []tc{
		{
			name: "mysql multi-statement", driver: "mysql",
			session: "SET SESSION innodb_lock_wait_timeout = 1",
			call:    "INSERT INTO {log} VALUES (1); UPDATE {acct} SET n = 2 WHERE id = 7",
			code:    "1205",
		},
		{
			name: "mysql call", driver: "mysql",
			setup:   []string{"CREATE PROCEDURE rd_p_" + suffix + "() BEGIN INSERT INTO {log} VALUES (1); COMMIT; UPDATE {acct} SET n = 2 WHERE id = 7; END"},
			session: "SET SESSION innodb_lock_wait_timeout = 1",
			call:    "CALL rd_p_" + suffix + "()",
			cleanup: "DROP PROCEDURE IF EXISTS rd_p_" + suffix,
			code:    "1205",
		},
		{
			name: "postgres call", driver: "pgx",
			setup:   []string{"CREATE PROCEDURE rd_p_" + suffix + "() LANGUAGE plpgsql AS $$ BEGIN INSERT INTO {log} VALUES (1); COMMIT; UPDATE {acct} SET n = 2 WHERE id = 7; END $$"},
			session: "SET lock_timeout = '300ms'",
			call:    "CALL rd_p_" + suffix + "()",
			cleanup: "DROP PROCEDURE IF EXISTS rd_p_" + suffix,
			code:    "55P03",
		},
		{
			name: "postgres do", driver: "pgx",
			session: "SET lock_timeout = '300ms'",
			call:    "DO $$ BEGIN INSERT INTO {log} VALUES (1); COMMIT; UPDATE {acct} SET n = 2 WHERE id = 7; END $$",
			code:    "55P03",
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := sharedDSN(t, c.driver)
			db, err := sqlretry.Open(c.driver, d)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			log, acct := table(t, db, "rd_log"), table(t, db, "rd_acct")
			fill := func(q string) string {
				return strings.NewReplacer("{log}", log, "{acct}", acct).Replace(q)
			}
			mustExec(t, db, "CREATE TABLE "+log+" (x int NOT NULL)", "CREATE TABLE "+acct+" (id int PRIMARY KEY, n int NOT NULL)",
				"INSERT INTO "+acct+" VALUES (7, 0)")
			for _, q := range c.setup {
				mustExec(t, db, fill(q))
			}
			if c.cleanup != "" {
				t.Cleanup(func() { db.Exec(c.cleanup) })
			}
			release := rowHolder(t, c.driver, d, acct)
			// The holder lets go after a while: a wrapper that re-runs the
			// call would then succeed and hide the error, with the first
			// part written more than once.
			timer := time.AfterFunc(2500*time.Millisecond, release)
			defer timer.Stop()

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			conn, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := conn.ExecContext(ctx, c.session); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_, err = conn.ExecContext(ctx, fill(c.call))
			took := time.Since(start)
			timer.Stop()
			release()
			if got := errCode(err); got != c.code {
				t.Errorf("err = %v (code %q) after %v, want the server's %s at once", err, got, took, c.code)
			}
			var rows int
			if err := db.QueryRow("SELECT COUNT(*) FROM " + log).Scan(&rows); err != nil {
				t.Fatal(err)
			}
			if rows != 1 {
				t.Errorf("the committed part ran %d times, want 1", rows)
			}
			if s, _ := sqlretry.StatsOf(db); s.RetriesStatement != 0 {
				t.Errorf("RetriesStatement = %d, want 0", s.RetriesStatement)
			}
		})
	}
}

// Issue 9 item 3 on MariaDB: BEGIN, COMMIT AND CHAIN, then a deadlock in
// the chained transaction. MariaDB rolls the whole chained transaction
// back; the caller must see the deadlock, and nothing of the chained
// transaction may be written (no lone UPDATE in autocommit).
func TestReaderMariaDBCommitAndChainDeadlockSurfaces(t *testing.T) {
	d := sharedDSN(t, "mysql")
	db, err := sqlretry.Open("mysql", d)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	log, acct := table(t, db, "rd_log"), table(t, db, "rd_acct")
	mustExec(t, db, "CREATE TABLE "+log+" (x int NOT NULL)", "CREATE TABLE "+acct+" (id int PRIMARY KEY, n int NOT NULL)")
	for i := 1; i <= 30; i++ {
		mustExec(t, db, fmt.Sprintf("INSERT INTO %s VALUES (%d, 0)", acct, i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c1, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	for _, q := range []string{
		"BEGIN",
		"INSERT INTO " + log + " VALUES (1)",
		"COMMIT AND CHAIN",
		"INSERT INTO " + log + " VALUES (2)", // in the chained transaction
		"UPDATE " + acct + " SET n = n + 1 WHERE id = 1",
	} {
		if _, err := c1.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}

	// The other side writes more rows, so that InnoDB picks c1 (the
	// smaller transaction) as the deadlock victim.
	raw, err := sql.Open("mysql", d)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tx2, err := raw.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx2.Rollback()
	if _, err := tx2.ExecContext(ctx, "UPDATE "+acct+" SET n = n + 100 WHERE id >= 2"); err != nil {
		t.Fatal(err)
	}
	blocked := make(chan error, 1)
	go func() {
		_, err := tx2.ExecContext(ctx, "UPDATE "+acct+" SET n = n + 100 WHERE id = 1") // waits for c1
		if err == nil {
			err = tx2.Commit()
		}
		blocked <- err
	}()
	time.Sleep(300 * time.Millisecond)
	_, err = c1.ExecContext(ctx, "UPDATE "+acct+" SET n = n + 1 WHERE id = 2") // closes the cycle
	if err2 := <-blocked; err2 != nil {
		t.Fatalf("the other transaction failed (%v): c1 was not the deadlock victim; c1's error: %v", err2, err)
	}
	if got := errCode(err); got != "1213" {
		t.Fatalf("err = %v, want the deadlock (1213) returned to the caller", err)
	}
	c1.ExecContext(ctx, "ROLLBACK")

	var logged, n1, n2 int
	db.QueryRow("SELECT COUNT(*) FROM " + log).Scan(&logged)
	db.QueryRow("SELECT n FROM " + acct + " WHERE id = 1").Scan(&n1)
	db.QueryRow("SELECT n FROM " + acct + " WHERE id = 2").Scan(&n2)
	if logged != 1 || n1 != 100 || n2 != 100 {
		t.Errorf("log rows %d, n1 %d, n2 %d; want 1, 100, 100 (only the first transaction and the other side's)", logged, n1, n2)
	}
}

func errCode(err error) string {
	var me *mysql.MySQLError
	if errors.As(err, &me) {
		return fmt.Sprint(me.Number)
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}
