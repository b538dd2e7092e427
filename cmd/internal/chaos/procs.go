package chaos

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"time"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// ReplicaChildFlag is the flag under which the chaos command runs one
// replica as a process of its own (RunReplicas with Scenario.Processes).
const ReplicaChildFlag = "replica-child"

// childSpec is what a replica process needs.
type childSpec struct {
	Driver, DSN, Bank, OpPrefix, Strategy string
	Accounts, Workers                     int
	Duration, OpTimeout                   time.Duration
}

// childResult is what it reports on stdout.
type childResult struct {
	Result *workload.Result
	Stats  *sqlretry.Stats
}

// RunReplicaChild runs one replica described by spec (JSON) and writes its
// result as JSON to stdout.
func RunReplicaChild(spec string) error {
	var cs childSpec
	if err := json.Unmarshal([]byte(spec), &cs); err != nil {
		return err
	}
	all := append(slices.Clone(Strategies), Extra...)
	i := slices.IndexFunc(all, func(s Strategy) bool { return s.Name == cs.Strategy })
	if i < 0 {
		return fmt.Errorf("unknown strategy %q", cs.Strategy)
	}
	st := all[i]
	ctx := context.Background()
	admin, err := sql.Open(cs.Driver, cs.DSN)
	if err != nil {
		return err
	}
	defer admin.Close()
	connector, _, _, stop, err := workConnector(ctx, Target{Driver: cs.Driver, DSN: cs.DSN}, Scenario{}, admin, cs.Bank+"_"+cs.OpPrefix)
	if err != nil {
		return err
	}
	defer stop()
	var db *sql.DB
	if st.Wrapped {
		db = sqlretry.OpenDB(connector, st.Options...)
	} else {
		db = sql.OpenDB(connector)
	}
	defer db.Close()
	db.SetMaxOpenConns(cs.Workers)
	db.SetMaxIdleConns(cs.Workers)
	bank := workload.OpenBank(cs.Driver, cs.Bank, cs.Accounts)
	res := workload.Run(ctx, workload.Config{Workers: cs.Workers, Duration: cs.Duration, OpTimeout: cs.OpTimeout, OpPrefix: cs.OpPrefix}, bank, db, st.Run)
	out := childResult{Result: res}
	if s, ok := sqlretry.StatsOf(db); ok {
		out.Stats = &s
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// runProcesses runs the replicas as processes of this program, started
// together, and returns their results.
func runProcesses(ctx context.Context, tg Target, sc Scenario, st Strategy, bank string, n int) ([]*workload.Result, []sqlretry.Stats, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	if flag.Lookup(ReplicaChildFlag) == nil {
		return nil, nil, fmt.Errorf("this program does not run replica processes (no -%s flag)", ReplicaChildFlag)
	}
	cmds := make([]*exec.Cmd, n)
	outs := make([]*bytes.Buffer, n)
	for i := range n {
		spec, _ := json.Marshal(childSpec{Driver: tg.Driver, DSN: tg.DSN, Bank: bank, OpPrefix: fmt.Sprintf("r%d", i), Strategy: st.Name,
			Accounts: sc.Accounts, Workers: sc.Workers / n, Duration: sc.Duration, OpTimeout: sc.OpTimeout})
		cmds[i] = exec.CommandContext(ctx, exe, "-"+ReplicaChildFlag, string(spec))
		outs[i] = &bytes.Buffer{}
		cmds[i].Stdout, cmds[i].Stderr = outs[i], os.Stderr
	}
	for _, c := range cmds {
		if err := c.Start(); err != nil {
			return nil, nil, err
		}
	}
	results := make([]*workload.Result, n)
	var stats []sqlretry.Stats
	var firstErr error
	for i, c := range cmds {
		if err := c.Wait(); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("replica process %d: %w", i, err)
			continue
		}
		var cr childResult
		if err := json.Unmarshal(outs[i].Bytes(), &cr); err != nil {
			if firstErr == nil {
				firstErr = fmt.Errorf("replica process %d: %w", i, err)
			}
			continue
		}
		results[i] = cr.Result
		if cr.Stats != nil {
			stats = append(stats, *cr.Stats)
		}
	}
	return results, stats, firstErr
}
