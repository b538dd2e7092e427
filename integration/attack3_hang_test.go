package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sqlretry/sqlretry"
)

// Attack 11 (attack3): the COMMIT's reply is lost and the whole server
// freezes (postmaster and every backend stopped with SIGSTOP: connects
// hang, the old backend can neither commit nor be ended). sqlretry must
// give ErrAmbiguousCommit (matching context.DeadlineExceeded) by the
// caller's deadline, not hang, and must not replay.
func TestAttack3FrozenServerDuringResolution(t *testing.T) {
	t.Parallel()
	srv := ownServer(t, "pgx")
	plain := openPlain(t, srv.DSN)
	tbl := table(t, plain, "frozen")
	mustExec(t, plain, "CREATE TABLE "+tbl+" (op text)")
	var data string
	if err := plain.QueryRow("SHOW data_directory").Scan(&data); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(data, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pm, _ := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	var frozen []int
	thaw := func() {
		for _, pid := range frozen {
			syscall.Kill(pid, syscall.SIGCONT)
		}
		frozen = nil
	}
	t.Cleanup(thaw)
	h := &commitHook{}
	db := openHooked(t, h, srv.DSN)
	warmUp(t, db, tbl)
	h.after = func() {
		out, _ := exec.Command("pgrep", "-P", strconv.Itoa(pm)).Output()
		pids := []int{pm}
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		for _, pid := range pids {
			if syscall.Kill(pid, syscall.SIGSTOP) == nil {
				frozen = append(frozen, pid)
			}
		}
	}
	op := fmt.Sprintf("op-%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	calls := 0
	err = sqlretry.RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		calls++
		if calls == 1 {
			h.armed.Store(true)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+tbl+" VALUES ($1)", op)
		return err
	})
	elapsed := time.Since(start)
	thaw()
	rows := countRows(t, plain, tbl, op)
	t.Logf("calls %d, err %v, elapsed %v, rows %d (after the thaw)", calls, err, elapsed, rows)
	if elapsed > 4*time.Second {
		t.Errorf("returned %v after a 3 s deadline", elapsed)
	}
	if calls != 1 {
		t.Errorf("replayed (%d runs) a transaction whose COMMIT may have committed", calls)
	}
	if err == nil && rows != 1 {
		t.Errorf("success with %d rows", rows)
	}
	if err != nil && !(errors.Is(err, sqlretry.ErrAmbiguousCommit) && errors.Is(err, context.DeadlineExceeded)) {
		t.Errorf("err %v: want ErrAmbiguousCommit and context.DeadlineExceeded", err)
	}
}
