// Package mysql holds an error type shaped like go-sql-driver/mysql's
// MySQLError. sqlretry recognises that driver's errors by their shape (a
// pointer to a struct named MySQLError, with Number and Message, in a
// package whose path ends in go-sql-driver/mysql, as a vendored copy's
// does) so that it need not import the driver; this package has such a
// path, so the errors sqlretrytest injects are classified exactly as the
// driver's own.
package mysql

import "fmt"

// MySQLError has the fields and the text of go-sql-driver/mysql's.
type MySQLError struct {
	Number   uint16  // the server's error number
	SQLState [5]byte // the SQLSTATE, when the server sent one
	Message  string  // the server's message
}

// Error has the driver's format.
func (me *MySQLError) Error() string {
	if me.SQLState != [5]byte{} {
		return fmt.Sprintf("Error %d (%s): %s", me.Number, me.SQLState, me.Message)
	}
	return fmt.Sprintf("Error %d: %s", me.Number, me.Message)
}

// Is matches another MySQLError with the same number, as the driver's does.
func (me *MySQLError) Is(err error) bool {
	if merr, ok := err.(*MySQLError); ok {
		return merr.Number == me.Number
	}
	return false
}
