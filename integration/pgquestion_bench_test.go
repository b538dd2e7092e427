package integration

import (
	"context"
	"database/sql/driver"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/pgxsqlretry"
)

// What each column of the PostgreSQL question before COMMIT costs the
// server (issue 13, goal 2). The same one-INSERT transaction, interleaved
// one at a time (medians, µs/tx-<variant>, as in
// BenchmarkPgSmallTxOneFlightInterleaved): the plain driver, sqlretry with
// the resolution off, and sqlretry's one flight ("<question>; COMMIT" in
// one Query message, so that no variant has a round trip of its own) with
// in the question's place: nothing but the COMMIT ("none": an empty
// question is not sent, so this is the flight's own cost), SELECT 1, each
// column of main's question before issue 13's cuts alone, today's whole
// question ("whole"), and the separate
// question (sqlretry's default, a round trip of its own), and other forms
// of the question that were measured (README, "Lost COMMITs"). For the
// figures only: the parts alone resolve nothing correctly. PGQ_VARIANTS
// (names, comma-separated) keeps only those besides raw, noresolve, none
// and separate.
//
//	go test -run '^$' -bench 'PgQuestionColumnCost$' -benchtime 1500x -count 6 . | tee q.txt
//	PGQ_VARIANTS=select1,before,whole go test -run '^$' -bench 'PgQuestionColumnCost$' -benchtime 2000x -count 8 .
func BenchmarkPgQuestionColumnCost(b *testing.B) {
	dsn := needB(b, "pgx")
	const inRec = "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE "
	variants := []struct{ name, q string }{
		{"select1", "SELECT 1::bigint"},
		{"xid", "SELECT " + inRec + "pg_catalog.pg_current_xact_id()::text::bigint END"},
		{"message", "SELECT 1::bigint, " + inRec + "(pg_catalog.pg_logical_emit_message(true, 'sqlretry', '') - '0/0'::pg_catalog.pg_lsn)::bigint END"},
		{"pid", "SELECT 1::bigint, NULL::bigint, pg_catalog.pg_backend_pid()"},
		{"start", "SELECT 1::bigint, NULL::bigint, 1, (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint"},
		{"version", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, pg_catalog.current_setting('server_version_num')::int"},
		{"sysid", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, 1, (pg_catalog.pg_control_system()).system_identifier"},
		{"timeline", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, 1, 1::bigint, " + inRec + "pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 1, 8) END"},
		{"replay", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, 1, 1::bigint, NULL::text, (pg_catalog.pg_last_wal_replay_lsn() - '0/0'::pg_catalog.pg_lsn)::bigint"},
		// The system identifier read once per server session and kept in
		// a session setting: not used (see the README, "Lost COMMITs").
		{"sysid-guc", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, 1, COALESCE(NULLIF(pg_catalog.current_setting('sqlretry.sysid', true), '')::bigint, " +
			"pg_catalog.set_config('sqlretry.sysid', (pg_catalog.pg_control_system()).system_identifier::text, false)::bigint)"},
		// main's question before issue 13's cuts: with the version column,
		// the id and the positions turned into bigint on the server.
		{"before", "SELECT " + inRec + "pg_catalog.pg_current_xact_id()::text::bigint END, " +
			inRec + "(pg_catalog.pg_logical_emit_message(true, 'sqlretry', '') - '0/0'::pg_catalog.pg_lsn)::bigint END, " +
			"pg_catalog.pg_backend_pid(), (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint, " +
			"pg_catalog.current_setting('server_version_num')::int, (pg_catalog.pg_control_system()).system_identifier, " +
			inRec + "pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 1, 8) END, " +
			"(pg_catalog.pg_last_wal_replay_lsn() - '0/0'::pg_catalog.pg_lsn)::bigint"},
		{"whole", ""},
		// What the number of columns costs: eight constants.
		{"const8", "SELECT 1::bigint, NULL::bigint, 1, 1::bigint, 1::bigint, 1::bigint, NULL::text, 1::bigint"},
		// The question's functions without the conversions to numbers
		// (the id and the positions as the server writes them).
		{"lean", "SELECT " + inRec + "pg_catalog.pg_current_xact_id() END, " + inRec + "pg_catalog.pg_logical_emit_message(true, 'sqlretry', '') END, " +
			"pg_catalog.pg_backend_pid(), pg_catalog.pg_postmaster_start_time(), (pg_catalog.pg_control_system()).system_identifier, " +
			inRec + "pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) END, pg_catalog.pg_last_wal_replay_lsn()"},
		// The id and the two positions as the server writes them (parsed
		// by the client), the start time and the timeline converted: the
		// form measured before the question took it ("whole" since).
		{"lean2", "SELECT " + inRec + "pg_catalog.pg_current_xact_id() END, " + inRec + "pg_catalog.pg_logical_emit_message(true, 'sqlretry', '') END, " +
			"pg_catalog.pg_backend_pid(), (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint, (pg_catalog.pg_control_system()).system_identifier, " +
			inRec + "pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 1, 8) END, pg_catalog.pg_last_wal_replay_lsn()"},
		// The same in one text column.
		{"packed", "SELECT " + inRec + "pg_catalog.concat_ws(' ', pg_catalog.pg_current_xact_id(), pg_catalog.pg_logical_emit_message(true, 'sqlretry', ''), " +
			"pg_catalog.pg_backend_pid(), pg_catalog.pg_postmaster_start_time(), (pg_catalog.pg_control_system()).system_identifier, " +
			"pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), pg_catalog.pg_last_wal_replay_lsn()) END"},
	}
	if only := os.Getenv("PGQ_VARIANTS"); only != "" {
		keep := variants[:0]
		for _, v := range variants {
			if slices.Contains(strings.Split(only, ","), v.name) {
				keep = append(keep, v)
			}
		}
		variants = keep
	}
	ones := []func(){openFlightBench(b, dsn, "raw"), openFlightBench(b, dsn, "sqlretry-noresolve"),
		openFlightBenchDB(b, dsn, []sqlretry.Option{sqlretry.WithCommitFlight(commitOnlyFlight{})})}
	labels := []string{"raw", "noresolve", "none"}
	for _, v := range variants {
		ones = append(ones, openFlightBenchDB(b, dsn, []sqlretry.Option{sqlretry.WithCommitFlight(questionFlight{v.q})}))
		labels = append(labels, v.name)
	}
	ones = append(ones, openFlightBench(b, dsn, "sqlretry"))
	labels = append(labels, "separate")
	interleave(b, ones, labels)
}

// commitOnlyFlight sends the COMMIT alone through the flight's code and
// answers a row of its own: the flight without a question.
type commitOnlyFlight struct{}

func (commitOnlyFlight) Handles(dc driver.Conn) bool { return pgxsqlretry.Flight{}.Handles(dc) }
func (commitOnlyFlight) Commit(ctx context.Context, dc driver.Conn, _ string) ([]driver.Value, error, error) {
	sc, ok := dc.(interface{ Unwrap() driver.Conn })
	for ok {
		dc = sc.Unwrap()
		sc, ok = dc.(interface{ Unwrap() driver.Conn })
	}
	_, err := dc.(driver.ExecerContext).ExecContext(ctx, "COMMIT", nil)
	return []driver.Value{int64(1)}, nil, err
}
