package sqlretry

import (
	"context"
	"errors"
	"fmt"
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
