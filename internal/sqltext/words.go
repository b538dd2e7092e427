package sqltext

import "strings"

// What a word means to the reader, as a set of bits.
const (
	wReadStart   = 1 << iota // a statement that starts with it may be a plain read
	wAtomicStart             // a statement that starts with it is one atomic statement (if nothing else disqualifies it)
	wWrite                   // not a plain read when it appears as a keyword anywhere (INTO, FOR UPDATE, a data-modifying CTE)
	wSideEffect              // a function with a side effect: not a plain read
	wNonTx                   // a side effect that survives a rollback: not atomic either
)

// words maps an upper-case word to its bits.
var words = map[string]uint8{
	"SELECT":   wReadStart | wAtomicStart,
	"VALUES":   wReadStart | wAtomicStart,
	"TABLE":    wReadStart | wAtomicStart,
	"WITH":     wReadStart | wAtomicStart,
	"SHOW":     wReadStart | wAtomicStart,
	"EXPLAIN":  wReadStart | wAtomicStart, // EXPLAIN ANALYZE runs the statement: ANALYZE is a wWrite word
	"DESCRIBE": wReadStart | wAtomicStart, // MySQL's EXPLAIN
	"DESC":     wReadStart | wAtomicStart,

	"INSERT": wAtomicStart | wWrite,
	"UPDATE": wAtomicStart | wWrite, // also FOR [NO KEY] UPDATE
	"DELETE": wAtomicStart | wWrite,
	"MERGE":  wAtomicStart | wWrite,
	// REPLACE is also a string function in both dialects: a write only when
	// no "(" follows it (see reader.word).
	"REPLACE": wAtomicStart,

	// Locking reads and SELECT ... INTO.
	"INTO":  wWrite, // SELECT INTO a table (PostgreSQL), @var / OUTFILE (MySQL)
	"SHARE": wWrite, // FOR SHARE, FOR KEY SHARE, LOCK IN SHARE MODE
	"LOCK":  wWrite,
	// EXPLAIN ANALYZE, MariaDB's ANALYZE SELECT, PROCEDURE ANALYSE().
	"ANALYZE": wWrite,
	"ANALYSE": wWrite,
	// Statements that cannot be part of a read; as keywords inside one they
	// mean something else is going on.
	"CALL": wWrite, "DO": wWrite, "EXECUTE": wWrite, "COPY": wWrite, "CREATE": wWrite, "DROP": wWrite,
	"ALTER": wWrite, "TRUNCATE": wWrite, "GRANT": wWrite, "REVOKE": wWrite, "LOAD": wWrite, "HANDLER": wWrite,
	"NOTIFY": wWrite, "LISTEN": wWrite, "UNLISTEN": wWrite,

	// Functions with side effects, in both dialects (a PostgreSQL name
	// means nothing to MySQL and the other way round). Names that start
	// with one of the prefixes in sideEffectPrefix are matched there.
	"NEXTVAL":                        wSideEffect,
	"SETVAL":                         wSideEffect,
	"SET_CONFIG":                     wSideEffect,
	"SETSEED":                        wSideEffect,
	"PG_NOTIFY":                      wSideEffect,
	"PG_CURRENT_XACT_ID":             wSideEffect, // assigns a transaction id
	"PG_TERMINATE_BACKEND":           wSideEffect | wNonTx,
	"PG_CANCEL_BACKEND":              wSideEffect | wNonTx,
	"PG_RELOAD_CONF":                 wSideEffect | wNonTx,
	"PG_ROTATE_LOGFILE":              wSideEffect | wNonTx,
	"PG_SWITCH_WAL":                  wSideEffect | wNonTx,
	"PG_CREATE_RESTORE_POINT":        wSideEffect | wNonTx,
	"PG_LOGICAL_EMIT_MESSAGE":        wSideEffect | wNonTx,
	"PG_PROMOTE":                     wSideEffect | wNonTx,
	"PG_BACKUP_START":                wSideEffect | wNonTx,
	"PG_BACKUP_STOP":                 wSideEffect | wNonTx,
	"PG_START_BACKUP":                wSideEffect | wNonTx,
	"PG_STOP_BACKUP":                 wSideEffect | wNonTx,
	"PG_WAL_REPLAY_PAUSE":            wSideEffect | wNonTx,
	"PG_WAL_REPLAY_RESUME":           wSideEffect | wNonTx,
	"PG_FILE_WRITE":                  wSideEffect | wNonTx,
	"PG_FILE_RENAME":                 wSideEffect | wNonTx,
	"PG_FILE_UNLINK":                 wSideEffect | wNonTx,
	"PG_IMPORT_SYSTEM_COLLATIONS":    wSideEffect,
	"PG_LOG_BACKEND_MEMORY_CONTEXTS": wSideEffect | wNonTx,
	"PG_DROP_REPLICATION_SLOT":       wSideEffect | wNonTx,
	"PG_REPLICATION_SLOT_ADVANCE":    wSideEffect | wNonTx,
	"PG_SLEEP":                       wSideEffect,
	"PG_SLEEP_FOR":                   wSideEffect,
	"PG_SLEEP_UNTIL":                 wSideEffect,
	"GET_LOCK":                       wSideEffect | wNonTx, // MySQL user-level locks outlive the transaction
	"RELEASE_LOCK":                   wSideEffect | wNonTx,
	"RELEASE_ALL_LOCKS":              wSideEffect | wNonTx,
	"SLEEP":                          wSideEffect,
	"SYS_EXEC":                       wSideEffect | wNonTx, // the common lib_mysqludf_sys UDFs
	"SYS_EVAL":                       wSideEffect | wNonTx,

	// PostgreSQL functions that run an SQL text they are given (whatever
	// that text calls is invisible to the reader), in core and contrib.
	"TS_STAT":     wSideEffect | wNonTx,
	"TS_REWRITE":  wSideEffect | wNonTx, // ts_rewrite(query, 'SELECT ...')
	"CROSSTAB":    wSideEffect | wNonTx, // tablefunc
	"CROSSTAB2":   wSideEffect | wNonTx,
	"CROSSTAB3":   wSideEffect | wNonTx,
	"CROSSTAB4":   wSideEffect | wNonTx,
	"CONNECTBY":   wSideEffect | wNonTx, // tablefunc: pastes its arguments into a query
	"XPATH_TABLE": wSideEffect | wNonTx, // xml2: likewise
	// Functions that write outside the transaction or change the server's
	// state (statistics, WAL, indexes, files, caches).
	"PG_STAT_STATEMENTS_RESET":   wSideEffect | wNonTx,
	"BRIN_SUMMARIZE_NEW_VALUES":  wSideEffect | wNonTx,
	"BRIN_SUMMARIZE_RANGE":       wSideEffect | wNonTx,
	"BRIN_DESUMMARIZE_RANGE":     wSideEffect | wNonTx,
	"GIN_CLEAN_PENDING_LIST":     wSideEffect | wNonTx,
	"PG_CLEAR_RELATION_STATS":    wSideEffect | wNonTx,
	"PG_RESTORE_RELATION_STATS":  wSideEffect | wNonTx,
	"PG_SET_RELATION_STATS":      wSideEffect | wNonTx, // the 18 beta's names
	"PG_CLEAR_ATTRIBUTE_STATS":   wSideEffect | wNonTx,
	"PG_RESTORE_ATTRIBUTE_STATS": wSideEffect | wNonTx,
	"PG_SET_ATTRIBUTE_STATS":     wSideEffect | wNonTx,
	"PG_SYNC_REPLICATION_SLOTS":  wSideEffect | wNonTx,
	"PG_SWITCH_XLOG":             wSideEffect | wNonTx, // before 10
	"PG_XLOG_REPLAY_PAUSE":       wSideEffect | wNonTx,
	"PG_XLOG_REPLAY_RESUME":      wSideEffect | wNonTx,
	"PG_LOG_STANDBY_SNAPSHOT":    wSideEffect | wNonTx,
	"PG_ROTATE_LOGFILE_OLD":      wSideEffect | wNonTx, // adminpack
	"PG_LOGFILE_ROTATE":          wSideEffect | wNonTx,
	"PG_FILE_SYNC":               wSideEffect | wNonTx,
	"PG_NEXTOID":                 wSideEffect | wNonTx,
	"PG_TRUNCATE_VISIBILITY_MAP": wSideEffect | wNonTx, // pg_visibility
	"HEAP_FORCE_KILL":            wSideEffect | wNonTx, // pg_surgery
	"HEAP_FORCE_FREEZE":          wSideEffect | wNonTx,
	"AUTOPREWARM_DUMP_NOW":       wSideEffect | wNonTx, // pg_prewarm
	"AUTOPREWARM_START_WORKER":   wSideEffect | wNonTx,
	"LOWRITE":                    wSideEffect, // large objects by descriptor
	"LOREAD":                     wSideEffect, // moves the descriptor
	"SET_LIMIT":                  wSideEffect, // pg_trgm: sets a setting
	// Extensions whose functions write (hostile review, 2026-12-02). A
	// schema name marks every call into it, reads of its tables too:
	// those are then only not retried by themselves.
	"PGMQ":                            wSideEffect, // pgmq.send, .pop, .read (sets the visibility timeout)
	"CRON":                            wSideEffect, // pg_cron: cron.schedule, cron.unschedule, cron.alter_job
	"PGLOGICAL":                       wSideEffect, // pglogical.replicate_ddl_command, ...
	"ADD_JOB":                         wSideEffect, // TimescaleDB jobs and policies
	"ALTER_JOB":                       wSideEffect,
	"DELETE_JOB":                      wSideEffect,
	"ADD_RETENTION_POLICY":            wSideEffect,
	"ADD_COMPRESSION_POLICY":          wSideEffect,
	"ADD_CONTINUOUS_AGGREGATE_POLICY": wSideEffect,
	"COMPRESS_CHUNK":                  wSideEffect,
	"DECOMPRESS_CHUNK":                wSideEffect,
	"DROP_CHUNKS":                     wSideEffect,
	"SERVICE_RELEASE_LOCKS":           wSideEffect | wNonTx, // MySQL locking service
}

// sideEffectPrefix lists families of functions with side effects, each
// with the bits of its members.
var sideEffectPrefix = [...]struct {
	prefix string
	bits   uint8
}{
	{"PG_ADVISORY_XACT_", wSideEffect},         // released by the rollback
	{"PG_TRY_ADVISORY_XACT_", wSideEffect},     //
	{"PG_ADVISORY_", wSideEffect | wNonTx},     // session-level advisory locks
	{"PG_TRY_ADVISORY_", wSideEffect | wNonTx}, //
	{"DBLINK", wSideEffect | wNonTx},           // runs SQL on another server
	{"LO_", wSideEffect | wNonTx},              // large objects; lo_export writes a server file
	{"TXID_CURRENT", wSideEffect},              // assigns a transaction id
	{"PG_STAT_RESET", wSideEffect | wNonTx},    //
	{"PG_REPLICATION_ORIGIN_", wSideEffect | wNonTx},
	{"PG_CREATE_", wSideEffect | wNonTx},           // replication slots, restore points
	{"PG_COPY_", wSideEffect | wNonTx},             // replication slots
	{"PG_LOGICAL_SLOT_GET_", wSideEffect | wNonTx}, // consumes changes
	{"QUERY_TO_XML", wSideEffect | wNonTx},         // runs the query text it is given
	{"CURSOR_TO_XML", wSideEffect | wNonTx},        // moves the cursor
	{"PG_BUFFERCACHE_EVICT", wSideEffect | wNonTx}, //
	{"PG_BACKGROUND_", wSideEffect | wNonTx},       // pg_background: runs an SQL text in a worker
	// Extensions and components whose functions write (hostile review,
	// 2026-12-02: each ran twice after a lost connection; the whole names
	// are in words). The first three letters of each are in lookup's switch.
	{"RUN_COMMAND_ON_", wSideEffect | wNonTx},                   // Citus: runs SQL on other servers
	{"REMOVE_", wSideEffect},                                    // TimescaleDB: remove_retention_policy, ...
	{"SERVICE_GET_", wSideEffect | wNonTx},                      // MySQL locking service: locks the session keeps
	{"VERSION_TOKENS_", wSideEffect | wNonTx},                   // MySQL version tokens (set, locks)
	{"KEYRING_KEY_", wSideEffect | wNonTx},                      // MySQL keyring UDFs
	{"AUDIT_LOG_", wSideEffect | wNonTx},                        // MySQL audit log filters, encryption passwords
	{"ASYNCHRONOUS_CONNECTION_FAILOVER_", wSideEffect | wNonTx}, // MySQL replication sources
	{"GROUP_REPLICATION_", wSideEffect | wNonTx},                // MySQL group replication's functions
}

// maxWord is the longest word looked up whole; longer ones are only
// matched against the prefixes.
const maxWord = 40

// wordFilter has a bit set for the length, first and last letter of every
// word in words: most names in a statement miss it and skip the map.
var wordFilter = func() (f [8]uint64) {
	for w := range words {
		h := filterHash(len(w), w[0], w[len(w)-1])
		f[h>>6] |= 1 << (h & 63)
	}
	return f
}()

func filterHash(n int, first, last byte) uint {
	return (uint(n)*31 + uint(first|0x20)*7 + uint(last|0x20)) & 511
}

// lookup returns the bits of a word, compared without regard to case.
// It does not allocate: the word is folded into a buffer on the stack.
func lookup(w string) uint8 {
	n := len(w)
	if n < 2 {
		return 0
	}
	var bits uint8
	if h := filterHash(n, w[0], w[n-1]); n <= maxWord && wordFilter[h>>6]&(1<<(h&63)) != 0 {
		var buf [maxWord]byte
		for i := 0; i < n; i++ {
			c := w[i]
			if c >= 'a' && c <= 'z' {
				c -= 'a' - 'A'
			}
			buf[i] = c
		}
		bits = words[string(buf[:n])]
	}
	if n >= 3 {
		// The prefix families start with one of these three letters.
		var p [3]byte
		for i := range p {
			c := w[i]
			if c >= 'a' && c <= 'z' {
				c -= 'a' - 'A'
			}
			p[i] = c
		}
		switch string(p[:]) {
		case "PG_", "DBL", "LO_", "TXI", "QUE", "CUR", "RUN", "REM", "SER", "VER", "KEY", "AUD", "ASY", "GRO":
			for _, sp := range sideEffectPrefix {
				if n >= len(sp.prefix) && strings.EqualFold(w[:len(sp.prefix)], sp.prefix) {
					return bits | sp.bits
				}
			}
		}
	}
	return bits
}

// SideEffectFunction reports whether the reader knows the function name
// (unqualified, any case) to have a side effect. The parser checks use it.
func SideEffectFunction(name string) bool {
	return name != "" && lookup(name)&wSideEffect != 0
}

// NonTransactionalFunction reports whether the reader knows the function
// name (unqualified, any case) to have a side effect that a rollback does
// not undo. The parser checks use it.
func NonTransactionalFunction(name string) bool {
	return name != "" && lookup(name)&wNonTx != 0
}
