package chaos

import (
	"context"
	"os"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// The engine of the demo and the chaos benchmark, briefly, on private
// servers: every strategy runs, kills and a restart happen, and the figures
// add up.
func TestEngine(t *testing.T) {
	for _, kind := range []dbserver.Kind{dbserver.Postgres, dbserver.MariaDB} {
		t.Run(string(kind), func(t *testing.T) {
			srv, err := dbserver.StartLocal(kind)
			if err != nil {
				if os.Getenv("CI") == "true" {
					t.Fatal(err)
				}
				t.Skip(err)
			}
			defer srv.Stop()
			tg := Target{Driver: kind.Driver(), DSN: srv.DSN, Server: srv}
			sc := Scenario{Name: "short", Accounts: 4, Workers: 4, Duration: 3 * time.Second, OpTimeout: 10 * time.Second,
				KillEvery: 100 * time.Millisecond, RestartAt: time.Second, Outage: 500 * time.Millisecond}
			for _, st := range Strategies {
				r, err := Run(context.Background(), tg, sc, st, nil)
				if err != nil {
					t.Fatalf("%s: %v", st.Name, err)
				}
				t.Logf("%s: committed %d failed %d attempts %d kills %d dials in outage %d recovery %.0f ms %v",
					st.Name, r.Committed, r.Failed, r.Attempts, r.Kills, r.DialsInOutage, r.RecoveryMs, r.Invariants)
				if r.Committed == 0 || r.Attempts < r.Committed || r.Kills == 0 || r.OutageToS <= r.OutageFromS {
					t.Errorf("%s: the run did not happen as set: %+v", st.Name, r)
				}
				if !r.MoneyConserved || !r.LedgerMatches {
					t.Errorf("%s: %v", st.Name, r.Invariants)
				}
				// A COMMIT cut by a kill or lost in the crash may honestly be
				// unknown (MySQL without the opt-in marker; PostgreSQL after a
				// restart); every other error is a failure to survive.
				if st.Wrapped && (r.Failed != r.Unknown || r.Sqlretry == nil || r.Lost+r.Phantom != 0) {
					t.Errorf("sqlretry surfaced %d errors (%v), %d of them ErrAmbiguousCommit, lost %d, phantom %d",
						r.Failed, r.Errors, r.Unknown, r.Lost, r.Phantom)
				}
			}
		})
	}
}

// The replicas scenario: two *sql.DBs on one bank, the report sums them.
func TestReplicas(t *testing.T) {
	for _, kind := range []dbserver.Kind{dbserver.Postgres, dbserver.MariaDB} {
		t.Run(string(kind), func(t *testing.T) {
			srv, err := dbserver.StartLocal(kind)
			if err != nil {
				if os.Getenv("CI") == "true" {
					t.Fatal(err)
				}
				t.Skip(err)
			}
			defer srv.Stop()
			tg := Target{Driver: kind.Driver(), DSN: srv.DSN}
			sc := Scenario{Name: "replicas", Accounts: 8, Workers: 4, Replicas: 2, Duration: time.Second, OpTimeout: 10 * time.Second}
			r, err := RunReplicas(context.Background(), tg, sc, SqlretryQueue, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("committed %d (%v) failed %d %v", r.Committed, r.ReplicaCommitted, r.Failed, r.Invariants)
			if len(r.ReplicaCommitted) != 2 || r.ReplicaCommitted[0]+r.ReplicaCommitted[1] != r.Committed || r.Committed == 0 {
				t.Errorf("per replica %v, in all %d", r.ReplicaCommitted, r.Committed)
			}
			if !r.OK() || r.Failed != 0 {
				t.Errorf("failed %d, %v", r.Failed, r.Invariants)
			}
		})
	}
}
