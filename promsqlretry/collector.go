// Package promsqlretry exports what sqlretry does for one *sql.DB as
// Prometheus metrics: the counters of sqlretry.StatsOf, the breaker's
// state, the retry budget and RunInTx's contention control. It is a module
// of its own so that sqlretry's users who do not use Prometheus do not
// build client_golang.
//
//	c, err := promsqlretry.NewCollector(db, prometheus.Labels{"db": "orders"})
//	if err != nil { ... } // db was not opened through sqlretry
//	prometheus.MustRegister(c)
//
// The values are read when Prometheus scrapes: nothing is added to the
// path of a query.
package promsqlretry

import (
	"database/sql"
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sqlretry/sqlretry"
)

// Compile-time check: a Collector is what prometheus.Register takes.
var _ prometheus.Collector = (*Collector)(nil)

// Collector is a prometheus.Collector over one *sql.DB opened through
// sqlretry.
type Collector struct {
	db      *sql.DB
	metrics []metric
	breaker *prometheus.Desc
}

// metric is one counter or gauge read from a Stats snapshot.
type metric struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	label string // the value of the metric's one variable label, if it has one
	value func(sqlretry.Stats) float64
}

// ErrNotSqlretry is returned for a *sql.DB not opened through sqlretry.
var ErrNotSqlretry = errors.New("promsqlretry: the *sql.DB was not opened through sqlretry")

// NewCollector returns a collector for db. constLabels (may be nil) tell
// several databases apart: every metric carries them.
func NewCollector(db *sql.DB, constLabels prometheus.Labels) (*Collector, error) {
	if _, ok := sqlretry.StatsOf(db); !ok {
		return nil, ErrNotSqlretry
	}
	c := &Collector{db: db}
	counter := func(name, help string, v func(sqlretry.Stats) int64) {
		c.metrics = append(c.metrics, metric{
			desc:  prometheus.NewDesc("sqlretry_"+name, help, nil, constLabels),
			kind:  prometheus.CounterValue,
			value: func(s sqlretry.Stats) float64 { return float64(v(s)) },
		})
	}
	retries := prometheus.NewDesc("sqlretry_retries_total",
		"Retries by what was re-run: statement (re-run on the same connection after the server rolled it back), transaction (a RunInTx replay), connection (re-dials, and re-runs after a lost connection or unavailability).",
		[]string{"kind"}, constLabels)
	for _, k := range []struct {
		kind string
		v    func(sqlretry.Stats) int64
	}{
		{"statement", func(s sqlretry.Stats) int64 { return s.RetriesStatement }},
		{"transaction", func(s sqlretry.Stats) int64 { return s.RetriesTransaction }},
		{"connection", func(s sqlretry.Stats) int64 { return s.RetriesConnection }},
	} {
		v := k.v
		c.metrics = append(c.metrics, metric{desc: retries, kind: prometheus.CounterValue, label: k.kind,
			value: func(s sqlretry.Stats) float64 { return float64(v(s)) }})
	}
	counter("successes_total", "Calls that succeeded: statements, begins, commits and dials.", func(s sqlretry.Stats) int64 { return s.Successes })
	counter("hand_offs_total", "Calls handed back to database/sql to re-run on another connection (its driver.ErrBadConn loop).", func(s sqlretry.Stats) int64 { return s.HandOffs })
	counter("give_ups_total", "Retryable errors returned to the caller after retrying (attempts or time ran out, or a rule said stop).", func(s sqlretry.Stats) int64 { return s.GiveUps })
	counter("dials_total", "Connections opened.", func(s sqlretry.Stats) int64 { return s.Dials })
	counter("dial_failures_total", "Dial attempts that failed: each is a dial made during an outage.", func(s sqlretry.Stats) int64 { return s.DialFailures })
	counter("circuit_rejections_total", "Calls refused with ErrCircuitOpen because the breaker was open.", func(s sqlretry.Stats) int64 { return s.CircuitRejections })
	counter("circuit_waits_total", "Waits of calls whose deadline let them wait for the open breaker's probe instead of failing.", func(s sqlretry.Stats) int64 { return s.CircuitWaits })
	counter("budget_rejections_total", "Retries refused with ErrBudgetExhausted: the retry budget was spent.", func(s sqlretry.Stats) int64 { return s.BudgetRejections })
	counter("commits_resolved_total", "COMMITs that lost their connection and whose outcome sqlretry found out.", func(s sqlretry.Stats) int64 { return s.CommitsResolved })
	counter("commits_ambiguous_total", "COMMITs that lost their connection and were returned as ErrAmbiguousCommit: the outcome is unknown.", func(s sqlretry.Stats) int64 { return s.CommitsAmbiguous })
	counter("poisoned_transactions_total", "Transactions poisoned because the application swallowed a retryable error inside them.", func(s sqlretry.Stats) int64 { return s.Poisoned })
	counter("contention_waits_total", "RunInTx attempts that waited for contention control to let them run.", func(s sqlretry.Stats) int64 { return s.ContentionWaits })
	counter("contention_cuts_total", "Times contention control cut the number of transactions allowed at once.", func(s sqlretry.Stats) int64 { return s.ContentionCuts })
	counter("contention_let_go_total", "Times contention control let go because limiting did not pay or nothing completed.", func(s sqlretry.Stats) int64 { return s.ContentionLetGo })
	counter("shadow_decisions_total", "Decisions shadow mode reported and did not carry out (retries, hand-offs, refusals, resolutions enforcement would have made).", func(s sqlretry.Stats) int64 { return s.ShadowDecisions })
	counter("breaker_transitions_total", "Changes of the circuit breaker's state.", func(s sqlretry.Stats) int64 { return s.BreakerTransitions })
	c.metrics = append(c.metrics,
		metric{desc: prometheus.NewDesc("sqlretry_budget_tokens", "Retries the retry budget would allow now.", nil, constLabels),
			kind: prometheus.GaugeValue, value: func(s sqlretry.Stats) float64 { return s.BudgetTokens }},
		metric{desc: prometheus.NewDesc("sqlretry_contention_limit", "Transactions contention control lets RunInTx run at once; 0 while it is not engaged (no limit).", nil, constLabels),
			kind: prometheus.GaugeValue, value: func(s sqlretry.Stats) float64 { return s.ContentionLimit }},
	)
	c.breaker = prometheus.NewDesc("sqlretry_breaker_state",
		"1 for the circuit breaker's current state (closed, open, half-open), 0 for the others; closed when the breaker is off.",
		[]string{"state"}, constLabels)
	return c, nil
}

// Describe sends the descriptions of every metric.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	seen := map[*prometheus.Desc]bool{}
	for _, m := range c.metrics {
		if !seen[m.desc] {
			seen[m.desc] = true
			ch <- m.desc
		}
	}
	ch <- c.breaker
}

// Collect reads one Stats snapshot and sends every metric from it.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s, ok := sqlretry.StatsOf(c.db)
	if !ok {
		return
	}
	for _, m := range c.metrics {
		var labels []string
		if m.label != "" {
			labels = []string{m.label}
		}
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, m.value(s), labels...)
	}
	for _, st := range []sqlretry.BreakerState{sqlretry.BreakerClosed, sqlretry.BreakerOpen, sqlretry.BreakerHalfOpen} {
		v := 0.0
		if s.Breaker == st {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.breaker, prometheus.GaugeValue, v, st.String())
	}
}
