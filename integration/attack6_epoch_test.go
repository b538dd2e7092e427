package integration

// Hostile test (attack6): the question before COMMIT returns the
// transaction id as xid8 text, parsed by the client. A cluster past its
// first xid wraparound has xid8 values above 2^32 (epoch << 32 | xid);
// pg_resetwal -e gives a private server such an epoch. A lost COMMIT must
// still be resolved: committed → success in 1 run, not received → 1 replay.

import (
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/sqlretry/sqlretry"
)

func TestAttack6LostCommitWithXidEpoch(t *testing.T) {
	// 7: a cluster past a few wraparounds. 2^31: xid8 at or above 2^63,
	// beyond int64 (unreachable in practice; a client that cannot parse
	// it must say ErrAmbiguousCommit, never guess).
	for _, epoch := range []uint64{7, 1 << 31} {
		t.Run(fmt.Sprint("epoch=", epoch), func(t *testing.T) { a6LostCommitWithXidEpoch(t, epoch) })
	}
}

func a6LostCommitWithXidEpoch(t *testing.T, epoch uint64) {
	resetwal := "/usr/lib/postgresql/15/bin/pg_resetwal"
	if _, err := os.Stat(resetwal); err != nil {
		t.Skip("no pg_resetwal")
	}
	srv := ownServer(t, "pgx")
	admin, err := sql.Open("pgx", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	var dir string
	if err := admin.QueryRow("SHOW data_directory").Scan(&dir); err != nil {
		t.Fatal(err)
	}
	admin.Close()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	uid := fi.Sys().(*syscall.Stat_t).Uid
	if err := srv.Crash(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(resetwal, "-f", "-e", fmt.Sprint(epoch), dir)
	if uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: fi.Sys().(*syscall.Stat_t).Gid}}
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pg_resetwal: %v: %s", err, out)
	}
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	admin, err = sql.Open("pgx", srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	var xid string
	if err := admin.QueryRow("SELECT pg_current_xact_id()::text").Scan(&xid); err != nil {
		t.Fatal(err)
	}
	t.Logf("xid8 now %s (epoch %d: above %d)", xid, epoch, epoch<<32)
	for _, mode := range []string{"cache_statement", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			c := &cutter{isCommit: pgCommit}
			db := openCutPostgresAt(t, c, a5WithParam(srv.DSN, "default_query_exec_mode="+mode))
			defer db.Close()
			tbl := table(t, db, "a6epoch")
			mustExec(t, db, "CREATE TABLE "+tbl+" (op text)")
			for i := range 3 {
				mustExec(t, db, fmt.Sprintf("INSERT INTO %s VALUES ('warm-%d')", tbl, i))
			}
			calls, n, err := lostCommit(t, db, c, cutAfterSend, "$1")
			if n != 1 {
				t.Errorf("epoch %d, server committed: err=%v calls=%d rows=%d; a second row is a doubled write", epoch, err, calls, n)
			}
			if epoch >= 1<<31 && n == 1 && (err == nil || errors.Is(err, sqlretry.ErrAmbiguousCommit)) {
				t.Logf("epoch %d, server committed: err=%v calls=%d", epoch, err, calls)
			} else if err != nil || calls != 1 || n != 1 {
				t.Errorf("epoch %d, server committed: err=%v calls=%d rows=%d; want success, 1 run, 1 row", epoch, err, calls, n)
			}
			calls, n, err = lostCommit(t, db, c, cutMidMessage, "$1")
			if err != nil || calls != 2 || n != 1 {
				t.Errorf("epoch %d, COMMIT never arrived: err=%v calls=%d rows=%d; want 1 replay, 1 row", epoch, err, calls, n)
			}
			s, _ := sqlretry.StatsOf(db)
			t.Logf("stats: resolved %d ambiguous %d", s.CommitsResolved, s.CommitsAmbiguous)
		})
	}
}
