package sqlretry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/go-sql-driver/mysql"
)

func TestErrorCode(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&pgError{code: "40001", msg: "could not serialize access"}, "40001"},
		{fmt.Errorf("wrapped: %w", &pgError{code: "57P01", msg: "terminating"}), "57P01"},
		{&mysql.MySQLError{Number: 1213, Message: "Deadlock found"}, "1213"},
		{fmt.Errorf("wrapped: %w", &mysql.MySQLError{Number: 1205}), "1205"},
		{errors.New("no code"), ""},
		{nil, ""},
	} {
		if got := ErrorCode(tc.err); got != tc.want {
			t.Errorf("ErrorCode(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// Stats carries what a dashboard shows beside the counters: how often the
// breaker changed state, and the contention limit while it is engaged.
func TestStatsBreakerTransitionsAndContentionLimit(t *testing.T) {
	cfg := defaultConfig()
	cfg.clock = newFakeClock()
	r := newRetrier(cfg, &fakeConnector{srv: newFakeServer()}, DialectPostgres)
	if s := r.stats(); s.BreakerTransitions != 0 || s.ContentionLimit != 0 {
		t.Fatalf("fresh: transitions %d, limit %v", s.BreakerTransitions, s.ContentionLimit)
	}
	for range DefaultBreaker.ConsecutiveDialFailures {
		tk, err := r.breaker.allow()
		if err != nil {
			t.Fatal(err)
		}
		r.breaker.done(tk, outcomeDialFailure)
	}
	if s := r.stats(); s.Breaker != BreakerOpen || s.BreakerTransitions != 1 {
		t.Errorf("after the dial failures: breaker %v, transitions %d; want open, 1", s.Breaker, s.BreakerTransitions)
	}
	r.txLimit.mu.Lock()
	r.txLimit.limit = 3
	r.txLimit.mu.Unlock()
	r.txLimit.engaged.Store(true)
	if s := r.stats(); s.ContentionLimit != 3 {
		t.Errorf("engaged: ContentionLimit = %v, want 3", s.ContentionLimit)
	}
	r.observe(context.Background(), Event{Kind: EventRetry})
	if s := r.stats(); s.BreakerTransitions != 1 {
		t.Errorf("a retry event counted as a transition: %d", s.BreakerTransitions)
	}
}

// opRecorder is an OperationObserver that writes what it sees as lines,
// and checks that each event comes with the context of its operation.
type opRecorder struct {
	mu    sync.Mutex
	lines []string
}

type opKey struct{}

func (o *opRecorder) add(s string) { o.mu.Lock(); o.lines = append(o.lines, s); o.mu.Unlock() }

func (o *opRecorder) StartOperation(ctx context.Context, op Operation) context.Context {
	o.add(fmt.Sprintf("start %s %q inTx=%v", op.Op, op.Query, op.InTx))
	return context.WithValue(ctx, opKey{}, op.Op)
}

func (o *opRecorder) EndOperation(ctx context.Context, op Operation, err error) {
	o.add(fmt.Sprintf("end %s in=%v err=%v", op.Op, ctx.Value(opKey{}), err != nil))
}

func (o *opRecorder) Observe(ctx context.Context, e Event) {
	o.add(fmt.Sprintf("event %s %s attempt=%d in=%v", e.Kind, e.Op, e.Attempt, ctx.Value(opKey{})))
}

func (o *opRecorder) transcript() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return strings.Join(o.lines, "\n")
}

// An OperationObserver sees each call start and end once, with all its
// attempts in between, and the call's events carry the context it gave:
// that is what an OpenTelemetry span per logical operation needs.
func TestOperationObserverSeesTheWholeCall(t *testing.T) {
	srv := newFakeServer()
	srv.script("UPDATE", step{err: &pgError{"40001", "could not serialize access"}})
	srv.script("INSERT", step{err: &pgError{"40P01", "deadlock detected"}})
	rec := &opRecorder{}
	db, _ := testDB(t, srv, WithObserver(rec))
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, "UPDATE t SET v = 1"); err != nil {
		t.Fatal(err)
	}
	err := RunInTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want := `start dial "" inTx=false
end dial in=dial err=false
start exec "UPDATE t SET v = 1" inTx=false
event retry exec attempt=1 in=exec
end exec in=exec err=false
start tx "" inTx=false
start exec "INSERT INTO t VALUES (1)" inTx=true
end exec in=exec err=true
event retry tx attempt=1 in=tx
start exec "INSERT INTO t VALUES (1)" inTx=true
end exec in=exec err=false
end tx in=tx err=false`
	if got := rec.transcript(); got != want {
		t.Errorf("transcript:\n%s\nwant:\n%s", got, want)
	}
}

// A plain Observer is not asked about operations.
func TestPlainObserverSeesNoOperations(t *testing.T) {
	srv := newFakeServer()
	var n atomic.Int64
	db, _ := testDB(t, srv, WithObserver(ObserverFunc(func(context.Context, Event) { n.Add(1) })))
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err != nil {
		t.Fatal(err)
	}
	if n.Load() != 0 {
		t.Errorf("%d events for a call that succeeded at once", n.Load())
	}
}

// SlogObserver says when a decision was shadow mode's and not carried out.
func TestSlogObserverMarksShadowDecisions(t *testing.T) {
	var buf strings.Builder
	obs := SlogObserver(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	obs.Observe(context.Background(), Event{Kind: EventRetry, Op: "exec", Attempt: 1, Class: RetryStatement, Shadow: true})
	obs.Observe(context.Background(), Event{Kind: EventRetry, Op: "exec", Attempt: 1, Class: RetryStatement})
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "shadow=true") || strings.Contains(lines[1], "shadow") {
		t.Errorf("log:\n%s\nwant shadow=true on the first line only", buf.String())
	}
}
