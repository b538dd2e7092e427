package integration

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/sqlretry/sqlretry/integration/dbserver"
)

// Private throwaway servers, started lazily once per test binary (local
// binaries, else testcontainers) and removed at exit.

type privateServer struct {
	srv *dbserver.Server
	err error
}

var (
	privMu  sync.Mutex
	private = map[string]*privateServer{}
)

func TestMain(m *testing.M) {
	code := m.Run()
	privMu.Lock()
	for _, p := range private {
		if p.srv != nil {
			p.srv.Stop()
		}
	}
	privMu.Unlock()
	// No goroutine sqlretry or the drivers started may outlive the tests.
	// The fault proxy's own link goroutines (toxiproxy, a test tool) may
	// still be draining a closed link's last write.
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2/toxics.(*ToxicStub).Run")); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines leaked: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func kindOf(driverName string) dbserver.Kind {
	k, _ := dbserver.KindFor(driverName)
	return k
}

// needPrivate returns the DSN of the shared private server of this test
// binary, or skips (fails under CI=true).
func needPrivate(t *testing.T, driverName string) string {
	t.Helper()
	privMu.Lock()
	p := private[driverName]
	if p == nil {
		p = &privateServer{}
		p.srv, p.err = dbserver.Start(context.Background(), kindOf(driverName))
		private[driverName] = p
	}
	privMu.Unlock()
	if p.err != nil {
		unavailable(t, p.err.Error())
	}
	return p.srv.DSN
}

// ownServer starts a server for one test only (it will crash it), from the
// local binaries: crash and resume need them.
func ownServer(t *testing.T, driverName string) *dbserver.Server {
	t.Helper()
	s, err := dbserver.StartLocal(kindOf(driverName))
	if err != nil {
		unavailable(t, err.Error())
	}
	t.Cleanup(s.Stop)
	return s
}
