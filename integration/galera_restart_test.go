package integration

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// A node killed with SIGKILL that cannot start again from its own GCache
// (one CI run: "galera node 0 exited while starting", during the GCache
// ring buffer's recovery after the kill) is started again without it and
// rejoins. The broken cache is made here: a directory where the file
// should be, which the provider cannot open.
func TestGaleraRestartWithoutABrokenGCache(t *testing.T) {
	t.Parallel() // a private cluster: its waits overlap the other private-server tests
	g, err := dbserver.StartGalera()
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(g.Stop)
	ctx := context.Background()
	if err := g.KillNode(2); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(g.DataDir(2), "galera.cache")
	if err := os.Remove(cache); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(cache, 0o700); err != nil {
		t.Fatal(err)
	}
	n0, err := sql.Open("mysql", g.Nodes[0].DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer n0.Close()
	mustExec(t, n0, "CREATE TABLE restart_probe (id int PRIMARY KEY)")
	mustExec(t, n0, "INSERT INTO restart_probe VALUES (1)")
	err = g.RestartNode(2)
	notes := g.RestartNotes()
	for _, n := range notes {
		t.Logf("RestartNode: %s", n)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "without its galera.cache") {
		t.Errorf("notes %q; want one start without the cache", notes)
	}
	n2, err := sql.Open("mysql", causalRead(g.Nodes[2].DSN))
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	var n int
	if err := n2.QueryRowContext(ctx, "SELECT COUNT(*) FROM restart_probe").Scan(&n); err != nil || n != 1 {
		t.Fatalf("the restarted node: %d rows (%v); want the write made while it was down", n, err)
	}
}
