// Package sqlparsecheck proves sqlretry's SQL reader (internal/sqltext)
// against the servers' own grammars: PostgreSQL's parser (pg_query_go) and
// TiDB's MySQL parser, on a generated and hand-collected corpus
// (TestReaderAgainstParsers) and by fuzzing (FuzzReaderAgainstParsers).
//
// It is a module of its own so that users' builds never see these
// parsers (pg_query_go needs cgo and takes minutes to build the first
// time). Run it with:
//
//	cd sqlparsecheck && go test -count=1 .
//	cd sqlparsecheck && go test -run '^$' -fuzz FuzzReaderAgainstParsers -fuzztime 5m .
package sqlparsecheck
