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
	bare, amb, other := []int64{}, 0, 0
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
				if err == nil {
					continue
				}
				mu.Lock()
				switch {
				case errors.Is(err, sqlretry.ErrAmbiguousCommit):
					amb++
				case errors.Is(err, mysql.ErrInvalidConn):
					bare = append(bare, op)
					t.Logf("op %d: %T %v", op, err, err)
				default:
					other++
				}
				mu.Unlock()
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	srv.Crash()
	wg.Wait()
	t.Logf("ambiguous %d, bare invalid connection %d, other %d", amb, len(bare), other)
	if len(bare) > 0 {
		t.Errorf("%d autocommit writes lost after sending came back as the bare driver error, not ErrAmbiguousCommit", len(bare))
	}
}
