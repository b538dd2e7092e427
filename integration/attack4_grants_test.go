package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// (1f) Users with table-level grants on a private MariaDB: no CREATE, and
// the admin-created marker table missing INSERT (or SELECT) for them. The
// default marker must turn itself off (README), not fail every write.
func TestAttack4MyMarkerGrants(t *testing.T) {
	root, cfg, name := privateMariaDB(t)
	mustExec(t, root, "CREATE TABLE t (id int PRIMARY KEY, n int)", "INSERT INTO t VALUES (1, 0)",
		"CREATE TABLE "+sqlretry.DefaultMySQLCommitMarker+" (token BINARY(16) NOT NULL PRIMARY KEY, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at)) ENGINE=InnoDB")
	for _, tc := range []struct{ name, grant string }{
		{"noinsert", "SELECT, DELETE"},
		{"noselect", "INSERT, DELETE"},
		{"nothing", ""},
		{"nodelete", "SELECT, INSERT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			user := fmt.Sprintf("a4u%d", rand.Uint32())
			mustExec(t, root, "CREATE USER '"+user+"'@'%'")
			t.Cleanup(func() { root.Exec("DROP USER IF EXISTS '" + user + "'@'%'") })
			mustExec(t, root, "GRANT SELECT, UPDATE ON "+name+".t TO '"+user+"'@'%'")
			if tc.grant != "" {
				mustExec(t, root, "GRANT "+tc.grant+" ON "+name+"."+sqlretry.DefaultMySQLCommitMarker+" TO '"+user+"'@'%'")
			}
			c := cfg.Clone()
			c.User, c.Passwd = user, ""
			db, log := openLogged(t, c)
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			var before, after int
			root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&before)
			ok := 0
			for range 3 {
				if err := writeTx(ctx, db, nil, "t"); err != nil {
					t.Errorf("writing tx: %v", err)
				} else {
					ok++
				}
			}
			root.QueryRow("SELECT n FROM t WHERE id=1").Scan(&after)
			n, e := log.count(sqlretry.EventResolutionOff)
			t.Logf("%s: ok=%d delta=%d off=%d (%v)", tc.name, ok, after-before, n, e.Err)
			if after-before != ok {
				t.Errorf("successes %d, increments %d", ok, after-before)
			}
		})
	}
}
