package sqlretry

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestErrorCatalogueCoversClassifier: every SQLSTATE and MySQL error
// number in the classifier's switches, and every driver sentinel text it
// matches, appears in docs/errors.md in backquotes, so the catalogue
// cannot drift from the code (issue 12).
func TestErrorCatalogueCoversClassifier(t *testing.T) {
	doc, err := os.ReadFile("docs/errors.md")
	if err != nil {
		t.Fatal(err)
	}
	sqlstate := regexp.MustCompile(`^[0-9A-Z]{5}$`)
	var codes []string
	fset := token.NewFileSet()
	for _, file := range []string{"classify.go", "classify_pg.go", "classify_mysql.go", "mysqlerr.go", "answered.go", "readonly.go", "timeouts.go"} {
		f, err := parser.ParseFile(fset, file, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			cc, ok := n.(*ast.CaseClause)
			if !ok {
				return true
			}
			for _, e := range cc.List {
				lit, ok := e.(*ast.BasicLit)
				if !ok {
					continue
				}
				switch lit.Kind {
				case token.STRING:
					if s, _ := strconv.Unquote(lit.Value); sqlstate.MatchString(s) {
						codes = append(codes, s)
					}
				case token.INT:
					if n, _ := strconv.Atoi(lit.Value); n >= 1000 {
						codes = append(codes, lit.Value)
					}
				}
			}
			return true
		})
	}
	if len(codes) < 60 {
		t.Fatalf("found only %d codes in the classifier: has the code moved?", len(codes))
	}
	codes = append(codes, mysqlErrInvalidConn, mysqlErrBusyBuffer, mysqlErrPktSync, mysqlErrPktSyncMul, errTxCommitRollbackText)
	codes = append(codes, wrongRoleAtConnect[:]...)
	for _, c := range codes {
		if !strings.Contains(string(doc), "`"+c+"`") {
			t.Errorf("docs/errors.md does not list `%s`", c)
		}
	}
}
