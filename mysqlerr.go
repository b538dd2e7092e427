package sqlretry

import (
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
)

// go-sql-driver/mysql's errors are recognised by their shape, without
// importing the driver: the import would put the MySQL driver in every pgx
// user's build, and it would make this package impossible to use from the
// driver's own test suite (an import cycle), which is how sqlretry is
// checked against it (scripts/driver-suites.sh, issue 9).

// mysqlErrorOf finds a *MySQLError of go-sql-driver/mysql (or of a vendored
// copy or a fork: any package path ending in go-sql-driver/mysql) in err's
// chain, as errors.As would, and returns its error number and message.
func mysqlErrorOf(err error) (number uint16, message string, ok bool) {
	for err != nil {
		if l, ok := mysqlErrorLayoutOf(err); ok {
			v := reflect.ValueOf(err)
			if v.IsNil() {
				return 0, "", false
			}
			v = v.Elem()
			return uint16(v.Field(l.number).Uint()), v.Field(l.message).String(), true
		}
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				if n, m, ok := mysqlErrorOf(e); ok {
					return n, m, true
				}
			}
			return 0, "", false
		default:
			return 0, "", false
		}
	}
	return 0, "", false
}

// mysqlErrorLayout is where a MySQLError type keeps Number and Message.
type mysqlErrorLayout struct {
	typ             reflect.Type
	number, message int
}

// lastMySQLErrorLayout caches the last MySQLError type seen, so that the
// type is inspected once, not on every error.
var lastMySQLErrorLayout atomic.Pointer[mysqlErrorLayout]

// mysqlErrorLayoutOf recognises a pointer to a struct named MySQLError in
// a package whose path ends in go-sql-driver/mysql, with a uint16 Number
// and a string Message.
func mysqlErrorLayoutOf(err error) (mysqlErrorLayout, bool) {
	t := reflect.TypeOf(err)
	if l := lastMySQLErrorLayout.Load(); l != nil && l.typ == t {
		return *l, true
	}
	if t.Kind() != reflect.Pointer {
		return mysqlErrorLayout{}, false
	}
	s := t.Elem()
	if s.Kind() != reflect.Struct || s.Name() != "MySQLError" || !strings.HasSuffix(s.PkgPath(), "go-sql-driver/mysql") {
		return mysqlErrorLayout{}, false
	}
	number, ok := s.FieldByName("Number")
	if !ok || number.Type.Kind() != reflect.Uint16 || len(number.Index) != 1 {
		return mysqlErrorLayout{}, false
	}
	message, ok := s.FieldByName("Message")
	if !ok || message.Type.Kind() != reflect.String || len(message.Index) != 1 {
		return mysqlErrorLayout{}, false
	}
	l := mysqlErrorLayout{typ: t, number: number.Index[0], message: message.Index[0]}
	lastMySQLErrorLayout.Store(&l)
	return l, true
}

// The texts of the go-sql-driver/mysql sentinel errors that classification
// needs (errors.New values in its errors.go; TestMySQLSentinelTexts pins
// them to the driver version this module is tested with).
const (
	mysqlErrInvalidConn = "invalid connection"
	mysqlErrBusyBuffer  = "busy buffer"
	mysqlErrPktSync     = "commands out of sync. You can't run this command now"
	mysqlErrPktSyncMul  = "commands out of sync. Did you run multiple statements at once?"
)

// errorsNewType is the type of the values errors.New returns.
var errorsNewType = reflect.TypeOf(errors.New(""))

// mysqlSentinelOf finds one of the driver's sentinel errors in err's chain
// and returns its text. A sentinel is a plain errors.New value, so it is
// recognised by that type and its exact text; another package's
// errors.New with the same text would be taken for it.
func mysqlSentinelOf(err error) (string, bool) {
	for err != nil {
		if reflect.TypeOf(err) == errorsNewType {
			switch s := err.Error(); s {
			case mysqlErrInvalidConn, mysqlErrBusyBuffer, mysqlErrPktSync, mysqlErrPktSyncMul:
				return s, true
			}
		}
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				if s, ok := mysqlSentinelOf(e); ok {
					return s, true
				}
			}
			return "", false
		default:
			return "", false
		}
	}
	return "", false
}
