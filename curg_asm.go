//go:build amd64 || arm64

package sqlretry

// curG is the address of the calling goroutine's runtime descriptor (the
// register or thread-local slot the runtime keeps it in): the same for
// the goroutine's whole life, different from every other live
// goroutine's, and a few instructions to read where runtime.Stack costs
// about a microsecond. It is only compared, never dereferenced.
func curG() uintptr
