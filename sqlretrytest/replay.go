package sqlretrytest

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/sqlretry/sqlretry"
)

// ReplayCheck finds out whether a RunInTx closure is safe to run more than
// once, which sqlretry assumes of it. Run runs the closure through
// sqlretry once without faults, then once for every statement of that
// clean run and its COMMIT, with that statement of the first attempt
// failing (a deadlock by default, which makes sqlretry roll back and run
// the closure again), and compares what each run leaves behind with the
// clean run's: the rows of the queries in Rows, and the side effects
// registered with SideEffect (a mock mailer's sent mail, a slice the
// closure appends to, a counter it keeps). A closure that sends mail, or
// keeps anything outside the transaction, shows up as a difference.
//
// It runs against the application's own test database, whose state Reset
// puts back before every run; runs are sequential.
type ReplayCheck struct {
	// Connector opens the test database, e.g. pgx's stdlib.GetConnector
	// or mysql.NewConnector; OpenConnector makes one from a driver name
	// and a DSN. Run does not close it.
	Connector driver.Connector
	// Options are given to sqlretry.OpenDB after a fake clock that
	// advances by itself (backoffs then take no real time); an option
	// given here wins, WithMySQLCommitMarker for instance.
	Options []sqlretry.Option
	// TxOptions are given to RunInTx.
	TxOptions *sql.TxOptions
	// Reset restores the database and the registered side effects to
	// the state each run starts from. It gets a plain *sql.DB on
	// Connector, without sqlretry or faults.
	Reset func(ctx context.Context, db *sql.DB) error
	// Rows are queries whose results must be the same after every run,
	// e.g. "SELECT id, balance FROM accounts ORDER BY id". Give them an
	// ORDER BY: rows are compared in order.
	Rows []string
	// Fault aborts the first attempt at each statement in turn; the zero
	// value means Deadlock. ConnectionLost also checks that the closure
	// survives a cut; at the COMMIT that needs the commit resolution of
	// the engine (on MySQL the commit marker, on by default unless the user
	// may not create its table: WithMySQLCommitMarker), else RunInTx returns
	// ErrAmbiguousCommit, which is reported as a difference.
	Fault Fault

	effects []sideEffect
}

type sideEffect struct {
	name     string
	snapshot func() any
}

// SideEffect registers something outside the database that the closure
// may change. snapshot returns its state now, as a value that later
// changes do not alter (a copy of a slice, a count); states are compared
// with reflect.DeepEqual and shown with %v. Reset must put it back.
func (c *ReplayCheck) SideEffect(name string, snapshot func() any) {
	c.effects = append(c.effects, sideEffect{name: name, snapshot: snapshot})
}

// ReplayReport is what Run found.
type ReplayReport struct {
	// Points is the number of places the first attempt was aborted at:
	// the statements of the clean run's transaction and its COMMIT.
	Points int
	// Differences are what runs left behind unlike the clean run, in the
	// order of the points.
	Differences []Difference
}

// Difference is one thing a run left behind unlike the clean run.
type Difference struct {
	Point     int    // the place in the transaction the first attempt was aborted at, from 1
	Statement string // the statement there, "COMMIT" for the commit
	What      string // "rows of <query>", "side effect <name>", or "error"
	Clean     string // what the clean run left
	Replayed  string // what this run left
}

// String says where the first attempt was aborted and what differed.
func (d Difference) String() string {
	return fmt.Sprintf("aborted at %d (%s): %s: clean run %s, with a replay %s", d.Point, d.Statement, d.What, d.Clean, d.Replayed)
}

// OK reports a closure that left the same state after every replay.
func (r *ReplayReport) OK() bool { return len(r.Differences) == 0 }

// String is the verdict and every difference, one a line.
func (r *ReplayReport) String() string {
	if r.OK() {
		return fmt.Sprintf("replay-safe: the same state after a replay from each of %d points", r.Points)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "NOT replay-safe: %d differences over %d points", len(r.Differences), r.Points)
	for _, d := range r.Differences {
		b.WriteString("\n  ")
		b.WriteString(d.String())
	}
	return b.String()
}

// noClose keeps sql.DB.Close from closing the caller's connector: only
// Connect and Driver are promoted.
type noClose struct{ driver.Connector }

// state is what one run left behind.
type state struct {
	err     string
	rows    []string // one per query in Rows
	effects []any
}

// Run checks fn. Its error is about the check itself (Reset failed, a
// query in Rows failed, the clean run failed); what fn does on a replay
// is in the report.
func (c *ReplayCheck) Run(ctx context.Context, fn func(context.Context, *sql.Tx) error) (*ReplayReport, error) {
	if c.Connector == nil {
		return nil, errors.New("sqlretrytest: ReplayCheck.Connector is nil")
	}
	fault := c.Fault
	if fault == NoFault {
		fault = Deadlock
	}
	plain := sql.OpenDB(noClose{c.Connector})
	defer plain.Close()

	clean, points, _, err := c.runOnce(ctx, plain, fn, nil)
	if err != nil {
		return nil, err
	}
	if clean.err != "" {
		return nil, fmt.Errorf("sqlretrytest: the clean run failed: %s", clean.err)
	}
	report := &ReplayReport{Points: len(points)}
	for k := 1; k <= len(points); k++ {
		got, _, injected, err := c.runOnce(ctx, plain, fn, FailInTx(1, k, fault))
		if err != nil {
			return nil, err
		}
		diff := func(what, want, have string) {
			report.Differences = append(report.Differences, Difference{Point: k, Statement: points[k-1], What: what, Clean: want, Replayed: have})
		}
		if injected == 0 {
			diff("error", "reached statement "+fmt.Sprint(k), "the first attempt did not reach it")
			continue
		}
		if got.err != clean.err {
			diff("error", "nil", got.err)
		}
		for i, q := range c.Rows {
			if got.rows[i] != clean.rows[i] {
				diff("rows of "+q, clean.rows[i], got.rows[i])
			}
		}
		for i, e := range c.effects {
			if !reflect.DeepEqual(got.effects[i], clean.effects[i]) {
				diff("side effect "+e.name, fmt.Sprintf("%v", clean.effects[i]), fmt.Sprintf("%v", got.effects[i]))
			}
		}
	}
	return report, nil
}

// runOnce resets, runs fn through sqlretry over an Injector with rule, and
// reads the state. It returns the statements of the first transaction.
func (c *ReplayCheck) runOnce(ctx context.Context, plain *sql.DB, fn func(context.Context, *sql.Tx) error, rule Rule) (state, []string, int, error) {
	var st state
	if c.Reset != nil {
		if err := c.Reset(ctx, plain); err != nil {
			return st, nil, 0, fmt.Errorf("sqlretrytest: Reset: %w", err)
		}
	}
	var points []string
	record := func(s Statement) Fault {
		if s.Tx == 1 {
			points = append(points, s.Query)
		}
		if rule != nil {
			return rule(s)
		}
		return NoFault
	}
	inj := NewInjector(noClose{c.Connector}, record)
	clock := NewClock(time.Time{})
	clock.SetAutoAdvance(true)
	db := sqlretry.OpenDB(inj, append([]sqlretry.Option{sqlretry.WithClock(clock)}, c.Options...)...)
	err := sqlretry.RunInTx(ctx, db, c.TxOptions, fn)
	db.Close()
	if err != nil {
		st.err = err.Error()
	}
	for _, q := range c.Rows {
		rows, err := readRows(ctx, plain, q)
		if err != nil {
			return st, nil, 0, fmt.Errorf("sqlretrytest: %s: %w", q, err)
		}
		st.rows = append(st.rows, rows)
	}
	for _, e := range c.effects {
		st.effects = append(st.effects, e.snapshot())
	}
	return st, points, len(inj.Injected()), nil
}

// readRows returns a query's rows as text, one row a line.
func readRows(ctx context.Context, db *sql.DB, q string) (string, error) {
	rows, err := db.QueryContext(ctx, q)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return "", err
	}
	var out []string
	vals := make([]any, len(cols))
	ptrs := make([]any, len(cols))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	for rows.Next() {
		if err := rows.Scan(ptrs...); err != nil {
			return "", err
		}
		fields := make([]string, len(vals))
		for i, v := range vals {
			if b, ok := v.([]byte); ok {
				v = string(b)
			}
			fields[i] = fmt.Sprint(v)
		}
		out = append(out, "("+strings.Join(fields, ", ")+")")
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	return "[" + strings.Join(out, " ") + "]", nil
}

// OpenConnector returns a connector for a registered driver and a DSN,
// for ReplayCheck and NewInjector, as sql.Open would make it.
func OpenConnector(driverName, dsn string) (driver.Connector, error) {
	db, err := sql.Open(driverName, dsn)
	if err != nil {
		return nil, err
	}
	d := db.Driver()
	db.Close()
	if dc, ok := d.(driver.DriverContext); ok {
		return dc.OpenConnector(dsn)
	}
	return dsnConnector{d: d, dsn: dsn}, nil
}

type dsnConnector struct {
	d   driver.Driver
	dsn string
}

func (c dsnConnector) Connect(context.Context) (driver.Conn, error) { return c.d.Open(c.dsn) }
func (c dsnConnector) Driver() driver.Driver                        { return c.d }
