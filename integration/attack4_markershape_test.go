package integration

import (
	"context"
	"database/sql"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/sqlretry/sqlretry"
)

var a4CutOnce sync.Once

// (1g) A table already named like the default marker whose shape is odd
// but accepts the INSERT (short token, ascii token, a trigger), with
// strict and non-strict sql_mode; then the COMMIT reply is lost. A lost
// COMMIT that committed must not be replayed (doubling the write).
func TestAttack4MyMarkerShapeThenLostCommit(t *testing.T) {
	root, cfg, _ := privateMariaDB(t)
	a4CutOnce.Do(func() {
		mysql.RegisterDialContext("a4cut", func(ctx context.Context, addr string) (net.Conn, error) {
			return atkMyCutter.dial(ctx, "tcp", addr)
		})
	})
	m := sqlretry.DefaultMySQLCommitMarker
	shapes := map[string][]string{
		"varbinary8":   {"CREATE TABLE " + m + " (token VARBINARY(8) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB"},
		"char16latin1": {"CREATE TABLE " + m + " (token CHAR(16) CHARACTER SET utf8mb4 NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB"},
		"trigger": {"CREATE TABLE " + m + " (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB",
			"CREATE TRIGGER a4trg BEFORE INSERT ON " + m + " FOR EACH ROW SET NEW.token = UNHEX(REPLACE(UUID(),'-',''))"},
		"myisam": {"CREATE TABLE " + m + " (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=MyISAM"},
	}
	for _, mode := range []string{"strict", "nonstrict"} {
		for name, ddl := range shapes {
			t.Run(mode+"/"+name, func(t *testing.T) {
				mustExec(t, root, "DROP TABLE IF EXISTS t", "DROP TABLE IF EXISTS "+m, "CREATE TABLE t (id int AUTO_INCREMENT PRIMARY KEY, tag varchar(20)) ENGINE=InnoDB")
				mustExec(t, root, ddl...)
				c := cfg.Clone()
				c.Net = "a4cut"
				if mode == "nonstrict" {
					c.Params = map[string]string{"sql_mode": "''"}
				}
				db, log := openLogged(t, c)
				defer db.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
				defer cancel()
				ins := func(tag string, cut bool) (int, error) {
					calls := 0
					err := sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
						calls++
						if _, err := tx.ExecContext(ctx, "INSERT INTO t (tag) VALUES (?)", tag); err != nil {
							return err
						}
						if cut && calls == 1 {
							atkMyCutter.mu.Lock()
							atkMyCutter.needle, atkMyCutter.wait = []byte("COMMIT"), 300*time.Millisecond
							atkMyCutter.mu.Unlock()
						}
						return nil
					})
					atkMyCutter.mu.Lock()
					atkMyCutter.needle = nil
					atkMyCutter.mu.Unlock()
					return calls, err
				}
				for range 2 {
					if _, err := ins("warm", false); err != nil {
						t.Errorf("healthy writing tx failed: %v", err)
					}
				}
				before := atkMyCutter.cuts.Load()
				calls, err := ins("lost", true)
				var rows, warm int
				root.QueryRow("SELECT COUNT(*) FROM t WHERE tag='lost'").Scan(&rows)
				root.QueryRow("SELECT COUNT(*) FROM t WHERE tag='warm'").Scan(&warm)
				off, e := log.count(sqlretry.EventResolutionOff)
				t.Logf("warm=%d cuts=%d calls=%d rows=%d err=%v off=%d (%v)", warm, atkMyCutter.cuts.Load()-before, calls, rows, err, off, e.Err)
				if rows > 1 {
					t.Errorf("DOUBLED write after lost COMMIT: %d rows, calls=%d", rows, calls)
				}
				if err == nil && rows != 1 {
					t.Errorf("success with %d rows", rows)
				}
				if err != nil && !errors.Is(err, sqlretry.ErrAmbiguousCommit) {
					t.Errorf("unexpected error %v", err)
				}
			})
		}
	}
}
