//go:build !amd64 && !arm64

package sqlretry

// curG is 0 where no cheap goroutine identity is at hand: every attempt
// then takes txnested.go's slow path (the stack walk).
func curG() uintptr { return 0 }
