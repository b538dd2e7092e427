package sqlretry

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A connector over several endpoints of one MySQL/MariaDB cluster (issue
// 10, item 2): go-sql-driver/mysql takes one host per DSN, so a Galera
// cluster or a primary with its failover candidates needs a connector that
// picks the node. Each endpoint has its own breaker; a dial goes to an
// endpoint whose breaker lets it through, and the new connection is kept
// only when the server says it takes writes (not read-only; on Galera,
// wsrep_ready ON, Synced, in the primary component). A node that is lost
// or turns read-only is passed over until its breaker probes it again.
//
// The connector only chooses where a connection goes. What happens to the
// work of a connection lost with its node is sqlretry's safety table, as
// for one server: a call that had sent nothing goes to a new connection
// (on another node), a RunInTx closure is replayed there when its
// transaction was lost before COMMIT, and a lost COMMIT is resolved or
// reported as ErrAmbiguousCommit.

// Compile-time checks.
var (
	_ driver.Connector = (*EndpointsConnector)(nil)
	_ io.Closer        = (*EndpointsConnector)(nil)
)

// EndpointChoice says which healthy endpoint a new connection goes to.
type EndpointChoice uint8

const (
	// PreferFirst: the first healthy endpoint in the order given (the
	// default). For a primary and its candidates, and for Galera used as
	// a single writer, which has no certification conflicts between nodes.
	PreferFirst EndpointChoice = iota
	// Spread: the healthy endpoints in turn (round robin), for Galera used
	// as multi-master. Concurrent writes to the same rows on different
	// nodes then fail certification (1213, also at COMMIT); RunInTx replays
	// them.
	Spread
)

// EndpointCheck asks a freshly dialled server whether it may take the
// connection. Any error passes the endpoint over (its breaker counts a
// failure) and the dial goes on to the next one. When no endpoint takes
// the connection, an EndpointNotWritable error counts as unavailability
// (sqlretry dials again with backoff); any other error is classified like
// a dial error of the driver.
type EndpointCheck func(ctx context.Context, c driver.Conn) error

// EndpointOption configures NewEndpointsConnector.
type EndpointOption func(*endpointsConfig) error

type endpointsConfig struct {
	choice  EndpointChoice
	breaker Breaker
	check   EndpointCheck
	names   []string
	timeout time.Duration
	clock   Clock
	rnd     func() float64
}

// DefaultEndpointBreaker is each endpoint's breaker unless
// WithEndpointBreaker says otherwise: it opens at the first failed dial
// or check (a node that refused is passed over at once, not after ten
// tries) and probes the node again a second later.
var DefaultEndpointBreaker = Breaker{OpenTimeout: time.Second, ConsecutiveDialFailures: 1}

// WithEndpointChoice sets how a healthy endpoint is chosen (default
// PreferFirst).
func WithEndpointChoice(c EndpointChoice) EndpointOption {
	return func(cfg *endpointsConfig) error {
		if c > Spread {
			return fmt.Errorf("sqlretry: WithEndpointChoice: unknown choice %d", c)
		}
		cfg.choice = c
		return nil
	}
}

// WithEndpointBreaker sets the breaker of each endpoint; zero fields take
// DefaultEndpointBreaker's values, then DefaultBreaker's.
func WithEndpointBreaker(b Breaker) EndpointOption {
	return func(cfg *endpointsConfig) error {
		if err := b.validate(); err != nil {
			return fmt.Errorf("sqlretry: WithEndpointBreaker: %w", err)
		}
		cfg.breaker = endpointBreakerDefaults(b)
		return nil
	}
}

func endpointBreakerDefaults(b Breaker) Breaker {
	if b.OpenTimeout == 0 {
		b.OpenTimeout = DefaultEndpointBreaker.OpenTimeout
	}
	if b.ConsecutiveDialFailures == 0 {
		b.ConsecutiveDialFailures = DefaultEndpointBreaker.ConsecutiveDialFailures
	}
	return b.withDefaults()
}

// WithEndpointCheck replaces the check of a new connection (default: ask
// the server, see NewEndpointsConnector).
func WithEndpointCheck(check EndpointCheck) EndpointOption {
	return func(cfg *endpointsConfig) error {
		if check == nil {
			return errors.New("sqlretry: WithEndpointCheck: check is nil")
		}
		cfg.check = check
		return nil
	}
}

// WithEndpointNames names the endpoints in errors and in Health, one name
// per endpoint (default "endpoint 1", "endpoint 2", ...; OpenEndpoints
// names them by the DSN's address).
func WithEndpointNames(names ...string) EndpointOption {
	return func(cfg *endpointsConfig) error {
		cfg.names = names
		return nil
	}
}

// WithEndpointTimeout bounds each endpoint's dial and check inside the
// caller's deadline (default 5s), so that a hung node costs that much and
// the dial moves on to the next one.
func WithEndpointTimeout(d time.Duration) EndpointOption {
	return func(cfg *endpointsConfig) error {
		if d <= 0 || d > maxOptionDuration {
			return fmt.Errorf("sqlretry: WithEndpointTimeout: %v is not in (0, %v]", d, maxOptionDuration)
		}
		cfg.timeout = d
		return nil
	}
}

// WithEndpointClock replaces the clock of the endpoints' breakers
// (default: the real one); for tests.
func WithEndpointClock(c Clock) EndpointOption {
	return func(cfg *endpointsConfig) error {
		if c == nil {
			return errors.New("sqlretry: WithEndpointClock: clock is nil")
		}
		cfg.clock = c
		return nil
	}
}

// withEndpointRand gives the breakers sqlretry's random source (OpenEndpoints).
func withEndpointRand(rnd func() float64) EndpointOption {
	return func(cfg *endpointsConfig) error { cfg.rnd = rnd; return nil }
}

// EndpointsConnector is a driver.Connector over several endpoints. Give it
// to OpenDB (or sql.OpenDB, without sqlretry's retries).
type EndpointsConnector struct {
	eps     []*endpoint
	choice  EndpointChoice
	check   EndpointCheck
	timeout time.Duration
	next    atomic.Uint64 // Spread's turn
}

type endpoint struct {
	name     string
	inner    driver.Connector
	br       *breaker
	dials    atomic.Int64
	failures atomic.Int64
	mu       sync.Mutex
	lastErr  error
}

// EndpointHealth is what an EndpointsConnector knows of one endpoint.
type EndpointHealth struct {
	Name     string
	State    BreakerState // closed: in use; open: passed over until its next probe
	Dials    int64        // connections handed out
	Failures int64        // dials or checks that failed
	LastErr  error        // the last failure (kept after the endpoint recovered), or nil
}

// NewEndpointsConnector returns a connector that dials one of connectors,
// in the order given (PreferFirst) or in turn (Spread), passing over the
// ones whose breaker is open, and keeps a connection only when the server
// takes writes. By default the server is asked (MySQL/MariaDB): read_only,
// super_read_only and innodb_read_only must be off and, on Galera,
// wsrep_ready ON, wsrep_local_state 4 (Synced) and wsrep_cluster_status
// Primary. With a PostgreSQL driver it must not be in recovery. When no
// endpoint gives a connection the error joins each endpoint's cause.
func NewEndpointsConnector(connectors []driver.Connector, opts ...EndpointOption) (*EndpointsConnector, error) {
	if len(connectors) == 0 {
		return nil, errors.New("sqlretry: NewEndpointsConnector: no endpoints")
	}
	for i, c := range connectors {
		if c == nil || isNilPointer(c) {
			return nil, fmt.Errorf("sqlretry: NewEndpointsConnector: endpoint %d is nil", i+1)
		}
		for j := range i {
			if connectors[j] == c {
				return nil, fmt.Errorf("sqlretry: NewEndpointsConnector: endpoint %d is endpoint %d again", i+1, j+1)
			}
		}
	}
	cfg := endpointsConfig{breaker: endpointBreakerDefaults(Breaker{}), timeout: 5 * time.Second, clock: realClock{}, rnd: defaultRand}
	for i, o := range opts {
		if o == nil {
			return nil, fmt.Errorf("sqlretry: NewEndpointsConnector: option %d is nil", i)
		}
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	if cfg.names != nil && len(cfg.names) != len(connectors) {
		return nil, fmt.Errorf("sqlretry: WithEndpointNames: %d names for %d endpoints", len(cfg.names), len(connectors))
	}
	if cfg.check == nil {
		d := detectDialect(connectors[0].Driver())
		cfg.check = func(ctx context.Context, c driver.Conn) error { return checkWritable(ctx, c, d) }
	}
	ec := &EndpointsConnector{choice: cfg.choice, check: cfg.check, timeout: cfg.timeout}
	for i, c := range connectors {
		name := fmt.Sprintf("endpoint %d", i+1)
		if cfg.names != nil {
			name = cfg.names[i]
		}
		ec.eps = append(ec.eps, &endpoint{name: name, inner: c, br: newBreaker(cfg.breaker, cfg.clock, cfg.rnd, nil)})
	}
	return ec, nil
}

// OpenEndpoints opens a *sql.DB through sqlretry over several DSNs of one
// cluster (one per node), like Open over one: the endpoints in the order
// given, the first healthy one preferred (NewEndpointsConnector with its
// defaults; build one yourself for Spread). driverName must be registered.
func OpenEndpoints(driverName string, dsns []string, opts ...Option) (*sql.DB, error) {
	if len(dsns) == 0 {
		return nil, errors.New("sqlretry: OpenEndpoints: no endpoints")
	}
	if !slices.Contains(sql.Drivers(), driverName) {
		return nil, fmt.Errorf("sqlretry: unknown driver %q (forgotten import?); registered: %s",
			driverName, strings.Join(sql.Drivers(), ", "))
	}
	for i, dsn := range dsns {
		if strings.TrimSpace(dsn) == "" {
			return nil, fmt.Errorf("sqlretry: OpenEndpoints: endpoint %d has an empty DSN", i+1)
		}
		if j := slices.Index(dsns[:i], dsn); j >= 0 {
			return nil, fmt.Errorf("sqlretry: OpenEndpoints: endpoint %d is endpoint %d again", i+1, j+1)
		}
	}
	probe, err := sql.Open(driverName, dsns[0])
	if err != nil {
		return nil, fmt.Errorf("sqlretry: %w", err)
	}
	d := probe.Driver()
	_ = probe.Close()
	if own, ok := d.(*wrappedDriver); ok { // registered through sqlretry already: do not wrap twice
		d, opts = own.inner, append(slices.Clone(own.opts), opts...)
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	conns := make([]driver.Connector, len(dsns))
	names := make([]string, len(dsns))
	implicitTx := false
	for i, dsn := range dsns {
		names[i] = endpointName(dsn, i)
		if dc, ok := d.(driver.DriverContext); ok {
			if conns[i], err = dc.OpenConnector(dsn); err != nil {
				return nil, fmt.Errorf("sqlretry: OpenEndpoints: endpoint %d (%s): %w", i+1, names[i], err)
			}
		} else {
			conns[i] = dsnConnector{dsn: dsn, d: d}
		}
		implicitTx = implicitTx || strings.Contains(strings.ToLower(dsn), "autocommit")
	}
	ec, err := NewEndpointsConnector(conns, WithEndpointNames(names...), WithEndpointClock(cfg.clock), withEndpointRand(cfg.rnd))
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(newConnector(ec, cfg, implicitTx)), nil
}

// endpointName is the address part of a go-sql-driver/mysql DSN
// ("user:pass@tcp(host:port)/db" gives "host:port"), never the password;
// otherwise "endpoint i". The DSN is cut as the driver cuts it: at the
// last '/', then the last '@' before it.
func endpointName(dsn string, i int) string {
	if slash := strings.LastIndexByte(dsn, '/'); slash >= 0 {
		head := dsn[:slash]
		rest := head[strings.LastIndexByte(head, '@')+1:]
		if open := strings.IndexByte(rest, '('); open > 0 && strings.HasSuffix(rest, ")") && open+1 < len(rest)-1 {
			return rest[open+1 : len(rest)-1]
		}
	}
	return fmt.Sprintf("endpoint %d", i+1)
}

// Driver is the first endpoint's driver (sqlretry detects the dialect
// from it).
func (c *EndpointsConnector) Driver() driver.Driver { return c.eps[0].inner.Driver() }

// Close closes the endpoints' connectors that have a Close method.
func (c *EndpointsConnector) Close() error {
	var errs []error
	for _, ep := range c.eps {
		if cl, ok := ep.inner.(io.Closer); ok {
			if err := cl.Close(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", ep.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Health returns what the connector knows of each endpoint, in order.
func (c *EndpointsConnector) Health() []EndpointHealth {
	out := make([]EndpointHealth, len(c.eps))
	for i, ep := range c.eps {
		ep.mu.Lock()
		last := ep.lastErr
		ep.mu.Unlock()
		out[i] = EndpointHealth{Name: ep.name, State: ep.br.State(), Dials: ep.dials.Load(), Failures: ep.failures.Load(), LastErr: last}
	}
	return out
}

// order is the endpoints in the order this dial tries them.
func (c *EndpointsConnector) order() []int {
	n := len(c.eps)
	start := 0
	if c.choice == Spread {
		start = int((c.next.Add(1) - 1) % uint64(n))
	}
	idx := make([]int, n)
	for i := range idx {
		idx[i] = (start + i) % n
	}
	return idx
}

// Connect dials the endpoints in turn until one gives a connection to a
// server that takes writes. It makes one pass: pacing the next pass is
// the job of sqlretry's connector around it (backoff, its own breaker,
// the budget and the caller's deadline).
func (c *EndpointsConnector) Connect(ctx context.Context) (driver.Conn, error) {
	var errs []error
	for _, i := range c.order() {
		ep := c.eps[i]
		t, err := ep.br.allow()
		if err != nil {
			ep.mu.Lock()
			last := ep.lastErr
			ep.mu.Unlock()
			if last == nil { // cannot be: it opened on a failure
				last = EndpointNotWritable("its breaker's probe is in flight")
			}
			errs = append(errs, &EndpointError{Endpoint: ep.name, Skipped: true, Err: last})
			continue
		}
		dc, err := c.dial(ctx, ep)
		if err == nil {
			ep.br.done(t, outcomeSuccess)
			ep.dials.Add(1)
			return dc, nil
		}
		if ctx.Err() != nil {
			// The caller's deadline, not the node's fault.
			ep.br.done(t, outcomeNeutral)
			errs = append(errs, &EndpointError{Endpoint: ep.name, Err: err})
			return nil, &EndpointsError{Errs: errs}
		}
		ep.failures.Add(1)
		ep.mu.Lock()
		ep.lastErr = err
		ep.mu.Unlock()
		ep.br.done(t, outcomeDialFailure)
		errs = append(errs, &EndpointError{Endpoint: ep.name, Err: err})
	}
	return nil, &EndpointsError{Errs: errs}
}

// dial connects to one endpoint and checks the server, within the
// endpoint timeout.
func (c *EndpointsConnector) dial(ctx context.Context, ep *endpoint) (driver.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	dc, err := ep.inner.Connect(ctx)
	if err != nil {
		return nil, err
	}
	if err := c.check(ctx, dc); err != nil {
		dc.Close()
		return nil, err
	}
	return dc, nil
}

// EndpointError is one endpoint's failure in a dial.
type EndpointError struct {
	Endpoint string
	Skipped  bool // its breaker was open: Err is its last failure
	Err      error
}

func (e *EndpointError) Error() string {
	if e.Skipped {
		return e.Endpoint + ": passed over (breaker open after: " + e.Err.Error() + ")"
	}
	return e.Endpoint + ": " + e.Err.Error()
}
func (e *EndpointError) Unwrap() error { return e.Err }

// EndpointsError is a dial that no endpoint took: one EndpointError per
// endpoint, in the order tried. sqlretry classifies each on its own, as it
// does pgx's multi-host errors: the dial is unavailable (retried with
// backoff) unless an endpoint refused for good (a wrong password, an
// unknown database).
type EndpointsError struct{ Errs []error }

func (e *EndpointsError) Error() string {
	var b strings.Builder
	b.WriteString("sqlretry: no endpoint took the connection: ")
	for i, err := range e.Errs {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}
func (e *EndpointsError) Unwrap() []error { return e.Errs }

// notWritableError is a server that answered but does not take writes
// now. Nothing of the caller's was sent: SafeToRetry makes it
// unavailability for the classifier (pgconn's convention).
type notWritableError struct{ why string }

func (e *notWritableError) Error() string     { return "the server does not take writes: " + e.why }
func (e *notWritableError) SafeToRetry() bool { return true }

// EndpointNotWritable is the error an EndpointCheck returns for a server
// that answered but does not take writes now (read-only, not synced):
// the endpoint is passed over until its breaker probes it again.
func EndpointNotWritable(why string) error { return &notWritableError{why: why} }

// galeraStatusQuery leaves out what a server without Galera lacks: no
// rows on MySQL; on MariaDB without Galera the wsrep variables are there
// (wsrep_ready OFF, wsrep_cluster_status Disconnected) with an empty
// wsrep_provider_name, which tells it apart.
const galeraStatusQuery = "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state', 'wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_provider_name')"

// checkWritable is the default EndpointCheck.
func checkWritable(ctx context.Context, dc driver.Conn, d Dialect) error {
	if d == DialectPostgres {
		vals, err := queryRow(ctx, dc, "SELECT pg_is_in_recovery()")
		if err != nil {
			return fmt.Errorf("asking whether the server is a standby: %w", err)
		}
		if asBool(vals[0]) {
			return EndpointNotWritable("in recovery (a standby)")
		}
		return nil
	}
	rows, err := queryRows(ctx, dc, galeraStatusQuery)
	if err != nil {
		return fmt.Errorf("asking the server for its Galera state: %w", err)
	}
	status := map[string]string{}
	for _, r := range rows {
		if len(r) >= 2 {
			status[strings.ToLower(asString(r[0]))] = asString(r[1])
		}
	}
	if status["wsrep_provider_name"] == "" {
		clear(status) // not a Galera node: its wsrep state says nothing
	}
	if v, ok := status["wsrep_ready"]; ok && !asBool(v) {
		return EndpointNotWritable("Galera node not ready (wsrep_ready " + v + ")")
	}
	if v, ok := status["wsrep_cluster_status"]; ok && !strings.EqualFold(v, "Primary") {
		return EndpointNotWritable("Galera node outside the primary component (wsrep_cluster_status " + v + ")")
	}
	if v, ok := status["wsrep_local_state"]; ok && v != "4" {
		return EndpointNotWritable("Galera node not Synced (wsrep_local_state " + v + " " + status["wsrep_local_state_comment"] + ")")
	}
	server, _, err := mysqlReadOnly(ctx, dc)
	if err != nil {
		return fmt.Errorf("asking whether the server is read-only: %w", err)
	}
	if server {
		return EndpointNotWritable("read_only is on")
	}
	return nil
}
