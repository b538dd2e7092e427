package integration

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/sqlretry/sqlretry"
	"github.com/sqlretry/sqlretry/internal/workload"
)

// faultProxy is a toxiproxy proxy, run in-process, between the driver and
// a private server.
type faultProxy struct {
	proxy *toxiproxy.Proxy
}

func newFaultProxy(t *testing.T, upstream string) *faultProxy {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "db", "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return &faultProxy{proxy: p}
}

func (f *faultProxy) add(t *testing.T, name, typ, stream string, attrs string) {
	t.Helper()
	js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":{%s}}`, name, typ, stream, attrs)
	if _, err := f.proxy.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		t.Fatalf("toxic %s: %v", name, err)
	}
}

func (f *faultProxy) remove(name string) { f.proxy.Toxics.RemoveToxic(context.Background(), name) }

// 7. Network faults between the driver and the server: added latency,
// connections reset mid-response, and a blackhole (packets vanish, no RST)
// under short deadlines. No lost or phantom write, and no call outlives its
// deadline by more than a few milliseconds.
func TestFaultNetwork(t *testing.T) {
	for _, driver := range []string{"pgx", "mysql"} {
		t.Run(driver, func(t *testing.T) {
			dsn := needPrivate(t, driver)
			admin, _ := sql.Open(driver, dsn)
			defer admin.Close()
			var upstream string
			if driver == "pgx" {
				upstream = strings.Split(strings.TrimPrefix(dsn, "postgres://postgres@"), "/")[0]
			} else {
				upstream = strings.TrimSuffix(strings.TrimPrefix(dsn, "root@tcp("), ")/test")
			}
			fp := newFaultProxy(t, upstream)
			proxied := strings.Replace(dsn, upstream, fp.proxy.Listen, 1)
			db, err := sqlretry.Open(driver, proxied, retryOptions(driver)...)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()

			// Latency: slower, never wrong.
			fp.add(t, "latency", "latency", "downstream", `"latency":20,"jitter":5`)
			res, _ := scenario(t, "latency-20ms/"+driver, admin, db, driver, workload.RunInTx,
				workload.Config{Duration: 2 * time.Second, Workers: 4}, nil)
			fp.remove("latency")
			if res.Failed != 0 {
				t.Errorf("latency: %d failed: %v", res.Failed, res.Errors)
			}

			// Resets: every connection through the proxy is reset now and then.
			resets := func(ctx context.Context) {
				for ctx.Err() == nil {
					time.Sleep(400 * time.Millisecond)
					fp.add(t, "reset", "reset_peer", "downstream", `"timeout":0`)
					time.Sleep(30 * time.Millisecond)
					fp.remove("reset")
				}
			}
			res, _ = scenario(t, "resets/"+driver, admin, db, driver, workload.RunInTx,
				workload.Config{Duration: 3 * time.Second, Workers: 4}, resets)
			if res.Failed != 0 {
				t.Errorf("resets: %d failed: %v", res.Failed, res.Errors)
			}

			// Blackhole for 1.5 s under 500 ms deadlines: calls end on time.
			blackhole := func(ctx context.Context) {
				time.Sleep(500 * time.Millisecond)
				fp.add(t, "blackhole", "timeout", "downstream", `"timeout":0`)
				fp.add(t, "blackhole-up", "timeout", "upstream", `"timeout":0`)
				time.Sleep(1500 * time.Millisecond)
				fp.remove("blackhole")
				fp.remove("blackhole-up")
			}
			// A commit cut off by the blackhole cannot be resolved before its
			// deadline: ErrAmbiguousCommit is the honest answer there.
			res, _ = scenario(t, "blackhole/"+driver+"~unknown-ok", admin, db, driver, workload.RunInTx,
				workload.Config{Duration: 4 * time.Second, Workers: 4, OpTimeout: 500 * time.Millisecond}, blackhole)
			// Unloaded, calls end within 4-7 ms of their deadline (README);
			// the bound leaves room for a starved scheduler under -race on
			// 2 cores (CI rehearsals at load 5-12 saw 78 and 303 ms once each).
			if res.MaxOvershoot > 500*time.Millisecond {
				t.Errorf("a call outlived its deadline by %v", res.MaxOvershoot)
			}
			if res.Committed == 0 {
				t.Error("nothing committed around the blackhole")
			}
		})
	}
}
