package sqlretrytest_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"

	"github.com/sqlretry/sqlretry/sqlretrytest"
)

// TestReplayCheckFindsRowDifference: a closure that writes in autocommit
// on the side (a second connection, outside the transaction) leaves an
// extra row after a replay.
func TestReplayCheckFindsRowDifference(t *testing.T) {
	mem := newMemDB()
	side := sql.OpenDB(mem.connector())
	defer side.Close()
	check := sqlretrytest.ReplayCheck{
		Connector: mem.connector(),
		Reset: func(ctx context.Context, db *sql.DB) error {
			_, err := db.ExecContext(ctx, "DELETE FROM audit")
			return err
		},
		Rows: []string{"SELECT msg FROM audit ORDER BY msg"},
	}
	report, err := check.Run(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		if _, err := side.ExecContext(ctx, "INSERT INTO audit VALUES (?)", "tried"); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO audit VALUES (?)", "done")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if report.OK() || report.Points != 2 || len(report.Differences) != 2 {
		t.Fatalf("report: %v", report)
	}
	d := report.Differences[0]
	if d.What != "rows of SELECT msg FROM audit ORDER BY msg" || d.Clean != "[(done) (tried)]" || d.Replayed != "[(done) (tried) (tried)]" {
		t.Errorf("difference: %+v", d)
	}
}

// TestReplayCheckWithConnectionLost: a lost connection at each statement,
// and before the COMMIT reached the server, which an unknown engine cannot
// resolve: the report says so as an error difference.
func TestReplayCheckWithConnectionLost(t *testing.T) {
	mem := newMemDB()
	check := sqlretrytest.ReplayCheck{
		Connector: mem.connector(),
		Fault:     sqlretrytest.ConnectionLost,
		Reset: func(ctx context.Context, db *sql.DB) error {
			_, err := db.ExecContext(ctx, "DELETE FROM t")
			return err
		},
		Rows: []string{"SELECT msg FROM t ORDER BY msg"},
	}
	report, err := check.Run(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (?)", "x")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if report.Points != 2 || len(report.Differences) < 1 || report.Differences[0].Point != 2 || report.Differences[0].What != "error" ||
		!strings.Contains(report.Differences[0].Replayed, "ambiguous") {
		t.Fatalf("report: %v", report)
	}
}

func TestReplayCheckErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := (&sqlretrytest.ReplayCheck{}).Run(ctx, nil); err == nil {
		t.Error("no connector: no error")
	}
	boom := errors.New("boom")
	c := sqlretrytest.ReplayCheck{Connector: newMemDB().connector(), Reset: func(context.Context, *sql.DB) error { return boom }}
	if _, err := c.Run(ctx, func(context.Context, *sql.Tx) error { return nil }); !errors.Is(err, boom) {
		t.Errorf("Reset's error: %v", err)
	}
	c = sqlretrytest.ReplayCheck{Connector: newMemDB().connector()}
	if _, err := c.Run(ctx, func(context.Context, *sql.Tx) error { return boom }); err == nil || !strings.Contains(err.Error(), "clean run failed") {
		t.Errorf("a failing clean run: %v", err)
	}
	c.Rows = []string{"nonsense"}
	if _, err := c.Run(ctx, func(context.Context, *sql.Tx) error { return nil }); err == nil {
		t.Error("a bad query in Rows: no error")
	}
}
