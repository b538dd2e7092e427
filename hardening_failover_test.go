package sqlretry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// fakePG is a loopback listener that speaks just enough of PostgreSQL's
// protocol for pgconn's connect, so that the tests below hold the very
// error values pgconn v5 returns for a multi-host DSN during a failover.
// role is what every session answers:
//
//	"standby":  trust login, then "on"/"t" to target_session_attrs' query
//	            (SHOW transaction_read_only, SELECT pg_is_in_recovery())
//	"starting": FATAL 57P03, the database system is starting up
//	"badpass":  FATAL 28P01, password authentication failed
//	"nodb":     FATAL 3D000, database does not exist
//	"silent":   accepts and never answers (a hung or blackholed host)
func fakePG(t *testing.T, role string) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveFakePG(c, role)
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func serveFakePG(c net.Conn, role string) {
	defer c.Close()
	if role == "silent" {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var b [512]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				return
			}
		}
	}
	be := pgproto3.NewBackend(c, c)
	if _, err := be.ReceiveStartupMessage(); err != nil {
		return
	}
	fatal := map[string][2]string{
		"starting": {"57P03", "the database system is starting up"},
		"badpass":  {"28P01", `password authentication failed for user "postgres"`},
		"nodb":     {"3D000", `database "nope" does not exist`},
	}
	if f, ok := fatal[role]; ok {
		be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: f[0], Message: f[1]})
		be.Flush()
		return
	}
	be.Send(&pgproto3.AuthenticationOk{})
	be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"})
	be.Send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{0, 0, 0, 1}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if be.Flush() != nil {
		return
	}
	for {
		msg, err := be.Receive()
		if err != nil {
			return
		}
		q, ok := msg.(*pgproto3.Query)
		if !ok {
			return
		}
		v := "on"
		if strings.Contains(q.String, "pg_is_in_recovery") {
			v = "t"
		}
		be.Send(&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("v"), DataTypeOID: 25, DataTypeSize: -1, TypeModifier: -1}}})
		be.Send(&pgproto3.DataRow{Values: [][]byte{[]byte(v)}})
		be.Send(&pgproto3.CommandComplete{CommandTag: []byte("SHOW")})
		be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		if be.Flush() != nil {
			return
		}
	}
}

// refusedPort is a loopback port nobody listens on (a stopped server).
func refusedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return p
}

// pgconnDialError is what pgconn.Connect returns for the DSN: the real
// error value, as pgx's database/sql driver hands it to sqlretry.
func pgconnDialError(t *testing.T, dsn string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, dsn)
	if err == nil {
		c.Close(ctx)
		t.Fatalf("%s: connected, want a connect error", dsn)
	}
	return err
}

func multiHost(ports []int, extra string) string {
	hosts, ps := make([]string, len(ports)), make([]string, len(ports))
	for i, p := range ports {
		hosts[i], ps[i] = "127.0.0.1", fmt.Sprint(p)
	}
	return fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres sslmode=disable %s", strings.Join(hosts, ","), strings.Join(ps, ","), extra)
}

// While a cluster elects a leader no host is the kind a multi-host DSN's
// target_session_attrs asks for: pgconn fails the connect with "read only
// connection" or "server is in standby mode" from ValidateConnect, beside
// 57P03, a refused or a timed-out dial on the others. Nothing was sent and
// the cluster will have a writable host again: the dial is retried with
// backoff, never surfaced as permanent. The errors are pgconn's own,
// collected from loopback listeners that answer like the hosts do.
func TestFailoverMultiHostConnectIsRetried(t *testing.T) {
	standby, standby2, starting := fakePG(t, "standby"), fakePG(t, "standby"), fakePG(t, "starting")
	silent, refused := fakePG(t, "silent"), refusedPort(t)
	for _, tc := range []struct{ name, dsn string }{
		{"every host read-only (read-write wanted)", multiHost([]int{standby, standby2}, "target_session_attrs=read-write")},
		{"every host a standby (primary wanted)", multiHost([]int{standby, standby2}, "target_session_attrs=primary")},
		{"one host, read-only", multiHost([]int{standby}, "target_session_attrs=read-write")},
		{"read-only and refused", multiHost([]int{standby, refused}, "target_session_attrs=read-write")},
		{"read-only and starting up", multiHost([]int{standby, starting}, "target_session_attrs=read-write")},
		{"refused and starting up", multiHost([]int{refused, starting}, "target_session_attrs=read-write")},
		{"hung host past connect_timeout, then read-only", multiHost([]int{silent, standby}, "target_session_attrs=read-write connect_timeout=1")},
		{"one hung host past connect_timeout", multiHost([]int{silent}, "connect_timeout=1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dialErr := pgconnDialError(t, tc.dsn)
			srv := newFakeServer()
			srv.dialErrs = []error{dialErr, dialErr, dialErr}
			db, _ := testDB(t, srv)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := db.PingContext(ctx); err != nil {
				t.Fatalf("Ping: %v\npgconn's error: %v\nwant the dial retried until a host takes writes", err, dialErr)
			}
			if srv.dials != 4 {
				t.Errorf("%d dials, want 4 (3 refused, then the new primary)", srv.dials)
			}
			if got := classifyDial(nil, dialErr); got != Unavailable {
				t.Errorf("classifyDial = %v, want unavailable", got)
			}
		})
	}
}

// The retry stays within the caller's deadline: a cluster that never
// elects a writable host ends the call at the deadline with the last
// connect error, after dials paced by backoff (not a busy loop).
func TestFailoverNoWritableHostEndsAtTheDeadline(t *testing.T) {
	dialErr := pgconnDialError(t, multiHost([]int{fakePG(t, "standby"), fakePG(t, "standby")}, "target_session_attrs=read-write"))
	srv := newFakeServer()
	for range 1000 {
		srv.dialErrs = append(srv.dialErrs, dialErr)
	}
	db, clock := testDB(t, srv)
	ctx, cancel := context.WithDeadline(context.Background(), clock.Now().Add(3*time.Second))
	defer cancel()
	err := db.PingContext(ctx)
	if err == nil || !strings.Contains(err.Error(), "read only connection") {
		t.Fatalf("Ping: %v, want the last connect error (read only connection)", err)
	}
	if srv.dials < 3 || srv.dials > 60 {
		t.Errorf("%d dials in 3 s, want a few, paced by backoff", srv.dials)
	}
}

// A host that refuses for good (a wrong password, an unknown database)
// keeps the dial permanent even when another host is only read-only:
// retrying cannot fix a configuration.
func TestFailoverHardRefusalStaysPermanent(t *testing.T) {
	standby := fakePG(t, "standby")
	for _, tc := range []struct{ name, dsn, code string }{
		{"read-only and wrong password", multiHost([]int{standby, fakePG(t, "badpass")}, "target_session_attrs=read-write"), "28P01"},
		{"unknown database", multiHost([]int{fakePG(t, "nodb")}, ""), "3D000"},
		{"refused and unknown database", multiHost([]int{refusedPort(t), fakePG(t, "nodb")}, "target_session_attrs=read-write"), "3D000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dialErr := pgconnDialError(t, tc.dsn)
			srv := newFakeServer()
			srv.dialErrs = []error{dialErr, dialErr}
			db, _ := testDB(t, srv)
			err := db.Ping()
			var pg *pgconn.PgError
			if err == nil || !errors.As(err, &pg) || pg.Code != tc.code {
				t.Fatalf("Ping: %v, want the %s at once", err, tc.code)
			}
			if srv.dials != 1 {
				t.Errorf("%d dials, want 1", srv.dials)
			}
		})
	}
}

// A host that answers "read only connection" is up, and a host may take
// writes any moment: once such dials open the breaker, it probes again
// within an eighth of its OpenTimeout, not a whole one, so its pacing does
// not add a second to an election (issue 10: write service back within
// 0.5 s of the cluster). Dials to hosts that are all down keep the whole
// OpenTimeout.
func TestFailoverWrongRoleAnswersProbeSoon(t *testing.T) {
	readOnly := pgconnDialError(t, multiHost([]int{fakePG(t, "standby"), refusedPort(t)}, "target_session_attrs=read-write"))
	allDown := pgconnDialError(t, multiHost([]int{refusedPort(t), refusedPort(t)}, "target_session_attrs=read-write"))
	open := DefaultBreaker.OpenTimeout
	for _, tc := range []struct {
		name     string
		err      error
		min, max time.Duration
	}{
		{"a standby answered", readOnly, open / 8, open / 8 * 6 / 5},
		{"every host down", allDown, open, open * 6 / 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer()
			n := DefaultBreaker.ConsecutiveDialFailures
			for range n {
				srv.dialErrs = append(srv.dialErrs, tc.err)
			}
			clock := newFakeClock()
			wc, err := WrapConnector(&fakeConnector{srv: srv}, WithClock(clock), WithDialect(DialectPostgres), WithMaxAttempts(n))
			if err != nil {
				t.Fatal(err)
			}
			c := wc.(*connector)
			if _, err := c.Connect(context.Background()); err == nil {
				t.Fatal("Connect succeeded, want it to give up after the attempts")
			}
			b := c.r.breaker
			if BreakerState(b.state.Load()) != BreakerOpen {
				t.Fatalf("breaker %v after %d failed dials, want open", BreakerState(b.state.Load()), n)
			}
			if wait := time.Duration(b.openUntil.Load() - clock.Now().UnixNano()); wait < tc.min || wait > tc.max {
				t.Errorf("next probe in %v, want within [%v, %v]", wait, tc.min, tc.max)
			}
		})
	}
}
