package sqlparsecheck

import (
	"encoding/json"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"github.com/pingcap/tidb/pkg/parser"
	"github.com/pingcap/tidb/pkg/parser/ast"
	"github.com/pingcap/tidb/pkg/parser/mysql"
	_ "github.com/pingcap/tidb/pkg/parser/test_driver" // value expressions for the parser

	"github.com/sqlretry/sqlretry/internal/sqltext"
)

// parsed is what a real parser says about a text.
type parsed struct {
	ok         bool   // the parser accepted it
	unknown    bool   // the parser could not tell (it panicked)
	err        string // why not
	stmts      int
	write      bool // some statement is not a plain read: a write, a locking read, INTO, EXPLAIN ANALYZE, a side-effect function, a variable assigned
	notAtomic  bool // CALL, DO, EXECUTE, transaction control, a function whose effect a rollback keeps, a MySQL variable assigned
	tx         int  // transaction-control effect, by the reader's rule: the last effect wins, TxForGood beats all
	rollbackTo bool // exactly one statement, ROLLBACK TO SAVEPOINT
}

func (p *parsed) noteTx(tx int) {
	switch {
	case p.tx == sqltext.TxForGood || tx == sqltext.TxForGood:
		p.tx = sqltext.TxForGood
	case tx != sqltext.TxNone:
		p.tx = tx
	}
}

// --- PostgreSQL (pg_query_go: PostgreSQL's own parser) --------------------

func parsePG(q string) parsed {
	js, err := pg_query.ParseToJSON(q)
	if err != nil {
		return parsed{err: err.Error()}
	}
	var root struct {
		Stmts []struct {
			Stmt map[string]any `json:"stmt"`
		} `json:"stmts"`
	}
	if err := json.Unmarshal([]byte(js), &root); err != nil {
		panic(err)
	}
	p := parsed{ok: true, stmts: len(root.Stmts)}
	for _, s := range root.Stmts {
		for kind, body := range s.Stmt {
			switch kind {
			case "SelectStmt", "VariableShowStmt":
			case "ExplainStmt": // a read unless ANALYZE (a DefElem, below) or the statement explained is a write
			default:
				p.write = true
			}
			switch kind {
			case "CallStmt", "DoStmt", "ExecuteStmt", "TransactionStmt":
				p.notAtomic = true
			}
			m, _ := body.(map[string]any)
			switch kind {
			case "TransactionStmt":
				chain, _ := m["chain"].(bool)
				switch m["kind"] {
				case "TRANS_STMT_BEGIN", "TRANS_STMT_START":
					p.noteTx(sqltext.TxOpens)
				case "TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK":
					if chain {
						p.noteTx(sqltext.TxOpens)
					} else {
						p.noteTx(sqltext.TxEnds)
					}
				case "TRANS_STMT_PREPARE":
					p.noteTx(sqltext.TxEnds)
				case "TRANS_STMT_ROLLBACK_TO":
					p.rollbackTo = p.stmts == 1
				}
			case "VariableSetStmt":
				if n, _ := m["name"].(string); n == "autocommit" || n == "completion_type" {
					p.noteTx(sqltext.TxForGood)
				}
			}
			walkPG(kind, body, &p)
		}
	}
	return p
}

func walkPG(key string, v any, p *parsed) {
	switch key {
	case "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "intoClause", "lockingClause":
		p.write = true
	case "DefElem":
		if m, ok := v.(map[string]any); ok {
			if n, _ := m["defname"].(string); n == "analyze" || n == "analyse" {
				p.write = true
			}
		}
	case "FuncCall":
		if m, ok := v.(map[string]any); ok {
			if names, ok := m["funcname"].([]any); ok && len(names) > 0 {
				last, _ := names[len(names)-1].(map[string]any)
				s, _ := last["String"].(map[string]any)
				name, _ := s["sval"].(string)
				if sqltext.SideEffectFunction(name) {
					p.write = true
				}
				if sqltext.NonTransactionalFunction(name) {
					p.notAtomic = true
				}
			}
		}
	}
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			walkPG(k, e, p)
		}
	case []any:
		for _, e := range x {
			walkPG("", e, p)
		}
	}
}

// --- MySQL (TiDB's parser) --------------------------------------------

// The sql_mode settings that change MySQL's tokens; the reader must be
// safe under every one of them.
var myModes = []mysql.SQLMode{0, mysql.ModeANSIQuotes, mysql.ModeNoBackslashEscapes, mysql.ModeANSIQuotes | mysql.ModeNoBackslashEscapes}

var myParsers = func() []*parser.Parser {
	ps := make([]*parser.Parser, len(myModes))
	for i, m := range myModes {
		ps[i] = parser.New()
		ps[i].SetSQLMode(m)
	}
	return ps
}()

func parseMy(q string, mode int) (p parsed) {
	defer func() {
		// TiDB's test value driver panics on what only TiDB's own value
		// types implement (huge decimals): the parser cannot say.
		if recover() != nil {
			p = parsed{unknown: true, err: "the parser's test driver panicked"}
		}
	}()
	stmts, _, err := myParsers[mode].Parse(q, "", "")
	if err != nil {
		return parsed{err: err.Error()}
	}
	p = parsed{ok: true, stmts: len(stmts)}
	for _, s := range stmts {
		switch x := s.(type) {
		case *ast.SelectStmt, *ast.SetOprStmt, *ast.ShowStmt:
		case *ast.ExplainStmt:
			if x.Analyze {
				p.write = true
			}
		default:
			p.write = true
		}
		switch x := s.(type) {
		case *ast.CallStmt, *ast.ExecuteStmt:
			p.notAtomic = true
			p.noteTx(sqltext.TxForGood)
		case *ast.DoStmt:
			p.notAtomic = true
		case *ast.BeginStmt:
			p.notAtomic = true
			p.noteTx(sqltext.TxOpens)
		case *ast.CommitStmt:
			p.notAtomic = true
			p.noteTx(completion(x.CompletionType))
		case *ast.RollbackStmt:
			p.notAtomic = true
			if x.SavepointName == "" {
				p.noteTx(completion(x.CompletionType))
			} else {
				p.rollbackTo = p.stmts == 1
			}
		case *ast.SetStmt:
			for _, v := range x.Variables {
				if n := strings.ToLower(v.Name); n == "autocommit" || n == "completion_type" {
					p.noteTx(sqltext.TxForGood)
				}
			}
		}
		s.Accept(&myWalker{p: &p})
	}
	return p
}

func completion(c ast.CompletionType) int {
	if c == ast.CompletionTypeChain {
		return sqltext.TxOpens
	}
	return sqltext.TxEnds
}

type myWalker struct{ p *parsed }

func (w *myWalker) Enter(n ast.Node) (ast.Node, bool) {
	switch x := n.(type) {
	case *ast.InsertStmt, *ast.UpdateStmt, *ast.DeleteStmt:
		w.p.write = true
	case *ast.SelectStmt:
		if x.LockInfo != nil && x.LockInfo.LockType != ast.SelectLockNone || x.SelectIntoOpt != nil {
			w.p.write = true
		}
	case *ast.FuncCallExpr:
		if sqltext.SideEffectFunction(x.FnName.L) {
			w.p.write = true
		}
		if sqltext.NonTransactionalFunction(x.FnName.L) {
			w.p.notAtomic = true
		}
	case *ast.VariableExpr:
		// @x := ...: a user variable keeps what it was assigned when the
		// statement is rolled back.
		if x.Value != nil {
			w.p.write, w.p.notAtomic = true, true
		}
	}
	return n, false
}

func (w *myWalker) Leave(n ast.Node) (ast.Node, bool) { return n, true }
