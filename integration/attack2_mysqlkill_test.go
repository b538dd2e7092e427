package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/sqlretry/sqlretry"
)

// Single MariaDB server (no endpoints) killed -9 under autocommit INSERTs:
// a write whose connection died after it was sent must come back as
// ErrAmbiguousCommit (ERRORS.md: ErrInvalidConn after sending is rule 2),
// never as the bare driver error.
var a2Literal bool

// Same without arguments (no prepared statement): is it the prepare path?
func TestAttack2MySQLKillAutocommitBareInvalidConnNoArgs(t *testing.T) {
	a2Literal = true
	defer func() { a2Literal = false }()
	TestAttack2MySQLKillAutocommitBareInvalidConn(t)
}

func TestAttack2MySQLKillAutocommitBareInvalidConn(t *testing.T) {
	srv := ownServer(t, "mysql")
	p, _ := sql.Open("mysql", srv.DSN)
	mustExec(t, p, "CREATE TABLE a2k (op int NOT NULL) ENGINE=InnoDB")
	p.Close()
	db, err := sqlretry.Open("mysql", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var next atomic.Int64
	var mu sync.Mutex
	var bare, okOps, notSent []int64
	amb := 0
	others := map[string]int{}
	end := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				op := next.Add(1)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				var err error
				if a2Literal {
					_, err = db.ExecContext(ctx, fmt.Sprintf("INSERT INTO a2k VALUES (%d)", op))
				} else {
					_, err = db.ExecContext(ctx, "INSERT INTO a2k VALUES (?)", op)
				}
				cancel()
				mu.Lock()
				var se *sqlretry.Error
				switch {
				case err == nil:
					okOps = append(okOps, op)
				case errors.Is(err, sqlretry.ErrAmbiguousCommit):
					amb++
				case errors.As(err, &se) && se.Op == "dial":
					// database/sql asked for a new connection and sqlretry
					// could not get one: the INSERT never left. The dial's
					// own last error may be an invalid connection (the
					// server died during the handshake); that is no write
					// of unknown outcome. Checked below after the restart.
					notSent = append(notSent, op)
				case errors.Is(err, mysql.ErrInvalidConn):
					bare = append(bare, op)
					t.Logf("op %d: %T %v", op, err, err)
				default:
					others[err.Error()]++
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	srv.Crash()
	wg.Wait()
	t.Logf("committed %d, ambiguous %d, not sent (dial refused) %d, bare invalid connection %d, other %v", len(okOps), amb, len(notSent), len(bare), others)
	if len(bare) > 0 {
		t.Errorf("%d autocommit writes lost after sending came back as the bare driver error, not ErrAmbiguousCommit", len(bare))
	}
	// After the restart the server tells: every write reported done is
	// there, and none reported as never sent is (the private server keeps
	// a committed write through a process crash: flush at commit 2).
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	chk, err := sql.Open("mysql", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer chk.Close()
	var rows *sql.Rows
	for deadline := time.Now().Add(30 * time.Second); ; {
		if rows, err = chk.Query("SELECT op FROM a2k"); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("the restarted server: %v", err)
	}
	have := map[int64]bool{}
	for rows.Next() {
		var op int64
		if err := rows.Scan(&op); err != nil {
			t.Fatal(err)
		}
		have[op] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for _, op := range okOps {
		if !have[op] {
			t.Errorf("op %d was reported done and is not in the table", op)
		}
	}
	for _, op := range notSent {
		if have[op] {
			t.Errorf("op %d was reported as a refused dial (never sent) and is in the table", op)
		}
	}
}
