package otelsqlretry_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/otelsqlretry"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// telemetry is a real SDK with an in-memory reader and span recorder.
type telemetry struct {
	reader *sdkmetric.ManualReader
	spans  *tracetest.SpanRecorder
	mp     *sdkmetric.MeterProvider
	tp     *sdktrace.TracerProvider
}

func newTelemetry(t *testing.T) *telemetry {
	tel := &telemetry{reader: sdkmetric.NewManualReader(), spans: tracetest.NewSpanRecorder()}
	tel.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(tel.reader))
	tel.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(tel.spans))
	t.Cleanup(func() { _ = tel.mp.Shutdown(context.Background()); _ = tel.tp.Shutdown(context.Background()) })
	return tel
}

func (tel *telemetry) observer(t *testing.T, opts ...otelsqlretry.Option) *otelsqlretry.Observer {
	t.Helper()
	o, err := otelsqlretry.NewObserver(append([]otelsqlretry.Option{otelsqlretry.WithMeterProvider(tel.mp), otelsqlretry.WithTracerProvider(tel.tp)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func (tel *telemetry) metric(t *testing.T, name string) metricdata.Aggregation {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := tel.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m.Data
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return nil
}

func (tel *telemetry) span(t *testing.T, name string) sdktrace.ReadOnlySpan {
	t.Helper()
	for _, s := range tel.spans.Ended() {
		if s.Name() == name {
			return s
		}
	}
	t.Fatalf("no span %q", name)
	return nil
}

func attrOf(attrs []attribute.KeyValue, key string) (attribute.Value, bool) {
	for _, a := range attrs {
		if string(a.Key) == key {
			return a.Value, true
		}
	}
	return attribute.Value{}, false
}

func wantAttrs(t *testing.T, what string, attrs []attribute.KeyValue, want map[string]any) {
	t.Helper()
	for k, w := range want {
		v, ok := attrOf(attrs, k)
		switch {
		case w == nil && ok:
			t.Errorf("%s: %s = %v, want none", what, k, v.String())
		case w != nil && !ok:
			t.Errorf("%s: no %s, want %v", what, k, w)
		case w != nil && v.AsInterface() != w:
			t.Errorf("%s: %s = %v, want %v", what, k, v.AsInterface(), w)
		}
	}
}

func openFake(t *testing.T, f *fakeDB, o *otelsqlretry.Observer, opts ...sqlretry.Option) *sql.DB {
	t.Helper()
	all := append([]sqlretry.Option{sqlretry.WithDialect(sqlretry.DialectPostgres), sqlretry.WithClock(instantClock{}),
		sqlretry.WithCommitResolution(false), sqlretry.WithObserver(o)}, opts...)
	db := sqlretry.OpenDB(f, all...)
	t.Cleanup(func() { db.Close() })
	return db
}

// One statement retried once: one client span for the logical operation,
// named and attributed as the database conventions say, with the retry as
// an event and sqlretry.resend_count 1; one duration measurement without
// error.type; one retry counted.
func TestOperationSpanAndDuration(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.script("UPDATE", serializationFailure)
	db := openFake(t, f, tel.observer(t))
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err != nil {
		t.Fatal(err)
	}
	s := tel.span(t, "UPDATE")
	if s.SpanKind() != trace.SpanKindClient {
		t.Errorf("span kind %v", s.SpanKind())
	}
	wantAttrs(t, "span", s.Attributes(), map[string]any{"db.system.name": "postgresql", "db.operation.name": "UPDATE",
		"sqlretry.resend_count": int64(1), "error.type": nil})
	if len(s.Events()) != 1 || s.Events()[0].Name != "sqlretry.retry" {
		t.Fatalf("events %v, want one sqlretry.retry", s.Events())
	}
	ev := s.Events()[0].Attributes
	wantAttrs(t, "retry event", ev, map[string]any{"sqlretry.attempt": int64(1), "sqlretry.class": sqlretry.RetryStatement.String(),
		"db.response.status_code": "40001", "error.type": "40001"})
	if d, ok := attrOf(ev, "sqlretry.delay"); !ok || d.AsFloat64() <= 0 {
		t.Errorf("retry event: delay %v", d.String())
	}

	h := tel.metric(t, "db.client.operation.duration").(metricdata.Histogram[float64])
	if len(h.DataPoints) != 1 || h.DataPoints[0].Count != 1 {
		t.Fatalf("duration points %+v, want one with count 1", h.DataPoints)
	}
	wantAttrs(t, "duration", h.DataPoints[0].Attributes.ToSlice(), map[string]any{"db.system.name": "postgresql", "db.operation.name": "UPDATE", "error.type": nil})
	r := tel.metric(t, "sqlretry.retries").(metricdata.Sum[int64])
	if len(r.DataPoints) != 1 || r.DataPoints[0].Value != 1 {
		t.Fatalf("retries %+v, want 1", r.DataPoints)
	}
	wantAttrs(t, "retries", r.DataPoints[0].Attributes.ToSlice(), map[string]any{"sqlretry.retry.kind": "retry", "sqlretry.op": "exec",
		"sqlretry.class": sqlretry.RetryStatement.String()})
}

// A failed operation carries error.type and db.response.status_code, and
// its span's status is Error.
func TestOperationErrorAttributes(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.script("INSERT", pgError{"23505", "duplicate key value violates unique constraint"})
	db := openFake(t, f, tel.observer(t), sqlretry.WithDialect(sqlretry.DialectPostgres))
	if _, err := db.ExecContext(context.Background(), "INSERT INTO t VALUES (1)"); err == nil {
		t.Fatal("no error")
	}
	s := tel.span(t, "INSERT")
	if s.Status().Code != codes.Error {
		t.Errorf("status %v", s.Status())
	}
	wantAttrs(t, "span", s.Attributes(), map[string]any{"error.type": "23505", "db.response.status_code": "23505", "sqlretry.resend_count": nil})
	h := tel.metric(t, "db.client.operation.duration").(metricdata.Histogram[float64])
	wantAttrs(t, "duration", h.DataPoints[0].Attributes.ToSlice(), map[string]any{"error.type": "23505", "db.response.status_code": "23505"})
}

// RunInTx is one operation with its replays: the statements of each
// attempt are its child spans, and the replay is its resend.
func TestRunInTxSpanParentsItsAttempts(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.script("INSERT", pgError{"40P01", "deadlock detected"})
	db := openFake(t, f, tel.observer(t))
	err := sqlretry.RunInTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	root := tel.span(t, "RunInTx")
	wantAttrs(t, "RunInTx", root.Attributes(), map[string]any{"sqlretry.resend_count": int64(1), "sqlretry.op": "tx", "db.operation.name": nil})
	children := 0
	for _, s := range tel.spans.Ended() {
		if s.Name() == "INSERT" {
			children++
			if s.Parent().SpanID() != root.SpanContext().SpanID() {
				t.Errorf("INSERT span's parent %v, want RunInTx's %v", s.Parent().SpanID(), root.SpanContext().SpanID())
			}
		}
	}
	if children != 2 {
		t.Errorf("%d INSERT spans, want 2 (one per attempt)", children)
	}
}

// RegisterStats reads the breaker's state and the dials from StatsOf; the
// breaker's transition is counted from the event.
func TestRegisterStatsShowsTheBreakerOpen(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.refuse = true
	o := tel.observer(t)
	db := openFake(t, f, o, sqlretry.WithMaxAttempts(3), sqlretry.WithBreaker(sqlretry.Breaker{ConsecutiveDialFailures: 3}))
	reg, err := o.RegisterStats(db)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); err == nil {
		t.Fatal("no error with every dial refused")
	}
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); !errors.Is(err, sqlretry.ErrCircuitOpen) {
		t.Fatalf("second call: %v, want ErrCircuitOpen", err)
	}
	g := tel.metric(t, "sqlretry.breaker.state").(metricdata.Gauge[int64])
	for _, p := range g.DataPoints {
		st, _ := p.Attributes.Value("sqlretry.breaker.state")
		if want := int64(map[bool]int{true: 1}[st.AsString() == "open"]); p.Value != want {
			t.Errorf("breaker state %s = %d, want %d", st.AsString(), p.Value, want)
		}
	}
	if df := tel.metric(t, "sqlretry.dial.failures").(metricdata.Sum[int64]); df.DataPoints[0].Value != 3 {
		t.Errorf("dial failures %d, want 3", df.DataPoints[0].Value)
	}
	tr := tel.metric(t, "sqlretry.breaker.transitions").(metricdata.Sum[int64])
	if len(tr.DataPoints) != 1 || tr.DataPoints[0].Value != 1 {
		t.Fatalf("transitions %+v", tr.DataPoints)
	}
	wantAttrs(t, "transition", tr.DataPoints[0].Attributes.ToSlice(), map[string]any{"sqlretry.breaker.from": "closed", "sqlretry.breaker.to": "open"})
	h := tel.metric(t, "db.client.operation.duration").(metricdata.Histogram[float64])
	seen := map[string]bool{}
	for _, p := range h.DataPoints {
		v, _ := p.Attributes.Value("error.type")
		seen[v.AsString()] = true
	}
	if !seen["sqlretry.ErrCircuitOpen"] {
		t.Errorf("no operation with error.type sqlretry.ErrCircuitOpen: %v", seen)
	}
}

func TestRegisterStatsRefusesAPlainDB(t *testing.T) {
	db := sql.OpenDB(newFakeDB())
	defer db.Close()
	if _, err := newTelemetry(t).observer(t).RegisterStats(db); err == nil {
		t.Fatal("no error for a plain *sql.DB")
	}
}

// In shadow mode the retry enforcement would have made is counted with
// sqlretry.shadow true, and the span has no resend: nothing was sent again.
func TestShadowDecisionsAreMarked(t *testing.T) {
	tel := newTelemetry(t)
	f := newFakeDB()
	f.script("UPDATE", serializationFailure)
	db := openFake(t, f, tel.observer(t), sqlretry.WithShadow(true))
	if _, err := db.ExecContext(context.Background(), "UPDATE t SET v = 1"); !errors.Is(err, serializationFailure) {
		t.Fatalf("shadow: %v, want the driver's error", err)
	}
	s := tel.span(t, "UPDATE")
	wantAttrs(t, "span", s.Attributes(), map[string]any{"sqlretry.resend_count": nil, "error.type": "40001"})
	if len(s.Events()) != 1 {
		t.Fatalf("events %v", s.Events())
	}
	wantAttrs(t, "event", s.Events()[0].Attributes, map[string]any{"sqlretry.shadow": true})
	r := tel.metric(t, "sqlretry.retries").(metricdata.Sum[int64])
	wantAttrs(t, "retries", r.DataPoints[0].Attributes.ToSlice(), map[string]any{"sqlretry.shadow": true})
}
