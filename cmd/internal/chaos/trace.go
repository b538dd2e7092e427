package chaos

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/sqlretry/sqlretry"
)

// TraceEnv names the environment variable that turns tracing on: with
// CHAOS_TRACE=/tmp/t, each run writes /tmp/t-<strategy>-<scenario>.log, one
// line per event with its milliseconds since the run began: sqlretry's
// decisions (its Observer), every pause it takes with the function that
// took it (a Clock that logs), the end of every dial and transaction,
// contention control's and the breaker's state as it changes, and the
// fault's steps (CRASH, RESUME, UP). It was written to find where
// sqlretry's time goes after a crash restart; it costs the traced
// strategies a little (a stack walk per pause), so the figures of a traced
// run are not for the tables.
const TraceEnv = "CHAOS_TRACE"

// tracer collects the lines of one run; a nil *tracer does nothing.
type tracer struct {
	path  string
	start time.Time
	mu    sync.Mutex
	lines []string
}

func newTracer(name string) *tracer {
	prefix := os.Getenv(TraceEnv)
	if prefix == "" {
		return nil
	}
	return &tracer{path: prefix + "-" + strings.ReplaceAll(name, "/", "_") + ".log", start: time.Now()}
}

func (t *tracer) logf(format string, a ...any) {
	if t == nil {
		return
	}
	s := fmt.Sprintf("%9.3f ", float64(time.Since(t.start).Microseconds())/1000) + fmt.Sprintf(format, a...)
	t.mu.Lock()
	t.lines = append(t.lines, s)
	t.mu.Unlock()
}

// options are the Observer and the Clock that log.
func (t *tracer) options() []sqlretry.Option {
	if t == nil {
		return nil
	}
	return []sqlretry.Option{sqlretry.WithObserver(traceObserver{t}), sqlretry.WithClock(traceClock{t})}
}

type traceObserver struct{ t *tracer }

func (o traceObserver) Observe(_ context.Context, e sqlretry.Event) {
	o.t.logf("event %s op=%s attempt=%d class=%v delay=%v from=%v to=%v reason=%q err=%v",
		e.Kind, e.Op, e.Attempt, e.Class, e.Delay, e.BreakerFrom, e.BreakerTo, e.Reason, e.Err)
}

type traceStart struct{}

func (o traceObserver) StartOperation(ctx context.Context, op sqlretry.Operation) context.Context {
	if op.Op != "dial" && op.Op != "tx" {
		return ctx
	}
	return context.WithValue(ctx, traceStart{}, time.Now())
}

func (o traceObserver) EndOperation(ctx context.Context, op sqlretry.Operation, err error) {
	if at, ok := ctx.Value(traceStart{}).(time.Time); ok {
		o.t.logf("end %s took=%v err=%v", op.Op, time.Since(at), err)
	}
}

// traceClock is the real clock; each pause is logged when it ends, with
// the functions that took it.
type traceClock struct{ t *tracer }

func (c traceClock) Now() time.Time { return time.Now() }

func (c traceClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	pcs := make([]uintptr, 3)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs)])
	var by []string
	for {
		f, more := frames.Next()
		by = append(by, strings.TrimPrefix(f.Function, "github.com/sqlretry/sqlretry."))
		if !more {
			break
		}
	}
	began := time.Now()
	timer := time.NewTimer(d)
	defer timer.Stop()
	var err error
	select {
	case <-timer.C:
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.t.logf("pause %v (began %.3f, woke after %v) by %s err=%v", d, float64(began.Sub(c.t.start).Microseconds())/1000,
		time.Since(began).Round(time.Microsecond), strings.Join(by, " < "), err)
	return err
}

// watch logs contention control's counters and the breaker's state every
// 10 ms when they changed, until stop is closed.
func (t *tracer) watch(db *sql.DB, stop <-chan struct{}) {
	if t == nil {
		return
	}
	var last string
	for {
		select {
		case <-stop:
			return
		case <-time.After(10 * time.Millisecond):
		}
		s, ok := sqlretry.StatsOf(db)
		if !ok {
			return
		}
		cur := fmt.Sprintf("contention cuts=%d let-go=%d limit=%g waits=%d; breaker %v", s.ContentionCuts, s.ContentionLetGo, s.ContentionLimit, s.ContentionWaits, s.Breaker)
		if cur != last {
			t.logf("stats %s", cur)
			last = cur
		}
	}
}

// dump writes the lines.
func (t *tracer) dump() {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := os.WriteFile(t.path, []byte(strings.Join(t.lines, "\n")+"\n"), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "chaos trace:", err)
	}
}
