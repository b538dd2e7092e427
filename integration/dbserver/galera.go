package dbserver

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// GaleraProvider is Debian's galera-4 provider library.
const GaleraProvider = "/usr/lib/galera/libgalera_smm.so"

// Galera is a private 3-node Galera 4 cluster of MariaDB servers on
// loopback (issue 10, item 3): each node has its own client, group
// communication (gcomm), IST and SST ports and its own data directory.
// Node 0 bootstraps the cluster; the others start from a copy of its data
// and join by IST. A node killed with KillNode rejoins with RestartNode
// (by a state snapshot, rsync, after the crash).
type Galera struct {
	Nodes   []*GaleraNode
	Started time.Duration // from the first install to all nodes Synced

	mu      sync.Mutex
	dir     string
	binary  string
	gcomm   string // gcomm://... of every node
	stopped bool
	notes   []string // RestartNotes
}

// GaleraNode is one server of the cluster.
type GaleraNode struct {
	Index     int
	Port      int // client port
	DSN       string
	RootDSN   string // no database: for the readiness checks
	dir, data string
	gport     int
	istPort   int
	sstPort   int
	cmd       *exec.Cmd
	exited    chan struct{}
}

// StartGalera starts a 3-node cluster and waits until every node is
// Synced and has a database test. The error carries the nodes' logs.
func StartGalera() (*Galera, error) {
	mariadbd, err := exec.LookPath("mariadbd")
	if err != nil {
		if mariadbd, err = exec.LookPath("/usr/sbin/mariadbd"); err != nil {
			return nil, errors.New("no mariadbd binary found")
		}
	}
	if _, err := os.Stat(GaleraProvider); err != nil {
		return nil, fmt.Errorf("no Galera provider (package galera-4): %v", err)
	}
	for _, tool := range []string{"rsync", "wsrep_sst_rsync"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found (packages rsync, mariadb-server): %v", tool, err)
		}
	}
	t0 := time.Now()
	dir, err := tempDirFor("mysql")
	if err != nil {
		return nil, err
	}
	g := &Galera{dir: dir, binary: mariadbd}
	var addrs []string
	for i := range 3 {
		n := &GaleraNode{Index: i, dir: filepath.Join(dir, fmt.Sprintf("node%d", i))}
		n.data = filepath.Join(n.dir, "data")
		ports := make([]int, 4)
		for j := range ports {
			if ports[j], err = freePort(); err != nil {
				g.Stop()
				return nil, err
			}
		}
		n.Port, n.gport, n.istPort, n.sstPort = ports[0], ports[1], ports[2], ports[3]
		n.RootDSN = fmt.Sprintf("root@tcp(127.0.0.1:%d)/", n.Port)
		n.DSN = n.RootDSN + "test"
		if err := os.MkdirAll(n.data, 0o755); err != nil {
			g.Stop()
			return nil, err
		}
		g.Nodes = append(g.Nodes, n)
		addrs = append(addrs, fmt.Sprintf("127.0.0.1:%d", n.gport))
	}
	g.gcomm = "gcomm://" + strings.Join(addrs, ",")
	// Only the bootstrapping node needs system tables: the joiners get a
	// copy of node 0's data once it has a Galera position (seedJoiners).
	// (A copy of the freshly installed data with a hand-written
	// grastate.dat does not do: a joiner whose server reports no position
	// fails with "Application received wrong state".)
	install := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+g.Nodes[0].data, "--auth-root-authentication-method=normal", "--skip-test-db")
	if os.Geteuid() == 0 {
		install.Args = append(install.Args, "--user=mysql")
	}
	if out, err := install.CombinedOutput(); err != nil {
		g.Stop()
		return nil, fmt.Errorf("mariadb-install-db: %v: %s", err, out)
	}
	if err := os.Mkdir(filepath.Join(g.Nodes[0].data, "test"), 0o700); err != nil { // the database test
		g.Stop()
		return nil, err
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", "-R", "mysql:mysql", dir).CombinedOutput(); err != nil {
			g.Stop()
			return nil, fmt.Errorf("chown: %v: %s", err, out)
		}
	}
	if err := g.start(g.Nodes[0], true); err != nil {
		g.Stop()
		return nil, err
	}
	if err := g.waitSynced(g.Nodes[0], 60*time.Second); err != nil {
		g.Stop()
		return nil, err
	}
	// Node 0, stopped cleanly, has a Galera position in InnoDB and in
	// grastate.dat: copies of its data join it again by IST, or with no
	// transfer at all, where an rsync snapshot per joiner takes 10-20 s.
	if err := g.seedJoiners(); err != nil {
		g.Stop()
		return nil, err
	}
	// The joiners together.
	errs := make(chan error, 2)
	for _, n := range g.Nodes[1:] {
		go func() {
			if err := g.start(n, false); err != nil {
				errs <- err
				return
			}
			errs <- g.waitSynced(n, 90*time.Second)
		}()
	}
	for range g.Nodes[1:] {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		g.Stop()
		return nil, err
	}
	g.Started = time.Since(t0)
	return g, nil
}

// seedJoiners stops node 0 cleanly, copies its data to the other nodes
// and bootstraps the cluster from node 0 again.
func (g *Galera) seedJoiners() error {
	n0 := g.Nodes[0]
	g.mu.Lock()
	cmd, exited := n0.cmd, n0.exited
	n0.cmd = nil
	g.mu.Unlock()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-exited
		return fmt.Errorf("galera node 0 did not shut down within 60 s\n%s", n0.logTail())
	}
	for _, n := range g.Nodes[1:] {
		if err := os.Remove(n.data); err != nil {
			return err
		}
		if out, err := exec.Command("cp", "-a", n0.data, n.data).CombinedOutput(); err != nil {
			return fmt.Errorf("cp: %v: %s", err, out)
		}
		// Each node has its own ring buffer; only node 0 bootstraps.
		os.Remove(filepath.Join(n.data, "galera.cache"))
		state, err := os.ReadFile(filepath.Join(n.data, "grastate.dat"))
		if err != nil {
			return err
		}
		state = []byte(strings.Replace(string(state), "safe_to_bootstrap: 1", "safe_to_bootstrap: 0", 1))
		if err := os.WriteFile(filepath.Join(n.data, "grastate.dat"), state, 0o660); err != nil {
			return err
		}
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", "-R", "mysql:mysql", g.dir).CombinedOutput(); err != nil {
			return fmt.Errorf("chown: %v: %s", err, out)
		}
	}
	if err := g.start(n0, true); err != nil {
		return err
	}
	return g.waitSynced(n0, 60*time.Second)
}

// DSNs are the nodes' go-sql-driver/mysql DSNs (root, database test).
func (g *Galera) DSNs() []string {
	var out []string
	for _, n := range g.Nodes {
		out = append(out, n.DSN)
	}
	return out
}

func (g *Galera) args(n *GaleraNode, bootstrap bool) []string {
	provider := strings.Join([]string{
		fmt.Sprintf("gmcast.listen_addr=tcp://127.0.0.1:%d", n.gport),
		fmt.Sprintf("ist.recv_addr=127.0.0.1:%d", n.istPort),
		// A killed node is declared gone within seconds, not the
		// defaults' 5-15 s: the survivors' commits wait until then.
		// Not shorter: on a loaded 2-core machine, shorter timeouts
		// partition live nodes.
		"evs.suspect_timeout=PT3S", "evs.inactive_timeout=PT5S",
		"evs.keepalive_period=PT0.5S", "evs.inactive_check_period=PT0.5S",
		"gcache.size=64M", "pc.recovery=false",
	}, ";")
	args := []string{"--no-defaults", "--datadir=" + n.data, fmt.Sprintf("--port=%d", n.Port), "--bind-address=127.0.0.1",
		"--socket=" + filepath.Join(n.dir, "sock"), "--pid-file=" + filepath.Join(n.dir, "pid"), "--log-error=" + filepath.Join(n.dir, "err.log"),
		"--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-size=64M", "--max-connections=300",
		"--binlog-format=ROW", "--default-storage-engine=InnoDB", "--innodb-autoinc-lock-mode=2",
		"--wsrep-on=ON", "--wsrep-provider=" + GaleraProvider, "--wsrep-cluster-name=sqlretry",
		"--wsrep-cluster-address=" + g.gcomm, "--wsrep-provider-options=" + provider,
		fmt.Sprintf("--wsrep-node-address=127.0.0.1:%d", n.gport), fmt.Sprintf("--wsrep-node-name=node%d", n.Index),
		fmt.Sprintf("--wsrep-node-incoming-address=127.0.0.1:%d", n.Port),
		"--wsrep-sst-method=rsync", fmt.Sprintf("--wsrep-sst-receive-address=127.0.0.1:%d", n.sstPort),
		"--wsrep-slave-threads=2"}
	if bootstrap {
		args = append(args, "--wsrep-new-cluster")
	}

	if os.Geteuid() == 0 {
		args = append(args, "--user=mysql")
	}
	return args
}

func (g *Galera) start(n *GaleraNode, bootstrap bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped {
		return errors.New("dbserver: the cluster is stopped")
	}
	if n.cmd != nil {
		return fmt.Errorf("dbserver: galera node %d is running", n.Index)
	}
	cmd := exec.Command(g.binary, g.args(n, bootstrap)...)
	// The SST script is found on PATH.
	cmd.Env = append(os.Environ(), "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
	if err := cmd.Start(); err != nil {
		return err
	}
	n.cmd, n.exited = cmd, make(chan struct{})
	exited := n.exited
	go func() { cmd.Wait(); close(exited) }()
	return nil
}

// waitSynced waits until the node takes writes: wsrep_ready ON,
// wsrep_local_state 4 (Synced).
func (g *Galera) waitSynced(n *GaleraNode, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-n.exited:
			return fmt.Errorf("galera node %d exited while starting\n%s", n.Index, n.logTail())
		default:
		}
		last = n.synced()
		if last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("galera node %d not Synced within %v: %v\n%s", n.Index, limit, last, n.logTail())
}

func (n *GaleraNode) synced() error {
	db, err := sql.Open("mysql", n.RootDSN+"?timeout=2s")
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var name, state, ready string
	if err := db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_local_state'").Scan(&name, &state); err != nil {
		return err
	}
	if err := db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_ready'").Scan(&name, &ready); err != nil {
		return err
	}
	if state != "4" || ready != "ON" {
		return fmt.Errorf("wsrep_local_state %s, wsrep_ready %s", state, ready)
	}
	return nil
}

// ClusterSize is wsrep_cluster_size as node n sees it.
func (n *GaleraNode) ClusterSize() (int, error) {
	db, err := sql.Open("mysql", n.RootDSN+"?timeout=2s")
	if err != nil {
		return 0, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var name string
	var size int
	err = db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'").Scan(&name, &size)
	return size, err
}

func (n *GaleraNode) waitClusterSize(want int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		size, err := n.ClusterSize()
		if err == nil && size <= want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("galera node %d: cluster size %d (%v), want %d", n.Index, size, err, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (n *GaleraNode) logTail() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "err.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// KillNode kills node i with SIGKILL, like a crash of its machine's
// server process.
func (g *Galera) KillNode(i int) error {
	g.mu.Lock()
	n := g.Nodes[i]
	cmd, exited := n.cmd, n.exited
	n.cmd = nil
	g.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("dbserver: galera node %d is not running", i)
	}
	err := cmd.Process.Kill()
	<-exited
	return err
}

// RestartNode starts a killed node again; it rejoins the cluster (by a
// snapshot after a crash) and the call returns once it is Synced.
//
// A node killed with SIGKILL may fail to start again: one CI run saw
// "galera node 0 exited while starting" while it recovered its GCache
// ring buffer (gcache.recover=yes) after the kill. When the process exits
// while starting, it is started again without its galera.cache (it joins
// by IST from a donor's cache, or by a snapshot), and when it exits once
// more, also without its grastate.dat and gvwstate.dat (a full snapshot,
// as a new node). Each such fallback is noted in RestartNotes, with the
// last lines of the failed start's log.
func (g *Galera) RestartNode(i int) error {
	n := g.Nodes[i]
	// Once the others have evicted the old incarnation: a node that comes
	// back before fails to reach a primary view.
	for _, o := range g.Nodes {
		if o != n && o.cmd != nil {
			if err := o.waitClusterSize(len(g.Nodes)-1, 60*time.Second); err != nil {
				return err
			}
			break
		}
	}
	fallbacks := []struct {
		what  string
		files []string
	}{
		{"as it was", nil},
		{"without its galera.cache", []string{"galera.cache"}},
		{"without its galera.cache, grastate.dat and gvwstate.dat (a full snapshot)", []string{"galera.cache", "grastate.dat", "gvwstate.dat"}},
	}
	var last error
	for k, f := range fallbacks {
		for _, name := range f.files {
			if err := os.Remove(filepath.Join(n.data, name)); err != nil && !os.IsNotExist(err) {
				return err
			}
		}
		if k > 0 {
			g.note(fmt.Sprintf("galera node %d exited while starting again after a kill (%s); starting it %s", i, errorLines(last.Error(), 2), f.what))
		}
		if err := g.start(n, false); err != nil {
			return err
		}
		last = g.waitSynced(n, 90*time.Second)
		if last == nil {
			return nil
		}
		select {
		case <-n.exited:
		default:
			return last // running, but not Synced in time: no fallback helps
		}
		g.mu.Lock()
		n.cmd = nil
		g.mu.Unlock()
	}
	return last
}

// DataDir is node i's data directory (for tests that damage it while the
// node is down).
func (g *Galera) DataDir(i int) string { return g.Nodes[i].data }

// RestartNotes says how RestartNode had to start nodes again, if it
// needed a fallback.
func (g *Galera) RestartNotes() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.notes...)
}

func (g *Galera) note(s string) {
	g.mu.Lock()
	g.notes = append(g.notes, s)
	g.mu.Unlock()
}

// errorLines is the first n [ERROR] lines of a failed start's log tail
// (from the server's last "Starting ... as process"), each cut to 200
// bytes (the last n lines when there is none).
func errorLines(s string, n int) string {
	if i := strings.LastIndex(s, " as process "); i >= 0 {
		s = s[i:]
	}
	var errs, all []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l == "" {
			continue
		}
		if len(l) > 200 {
			l = l[:200] + "..."
		}
		all = append(all, l)
		if strings.Contains(l, "[ERROR]") && len(errs) < n {
			errs = append(errs, l)
		}
	}
	if len(errs) == 0 && len(all) > n {
		errs = all[len(all)-n:]
	} else if len(errs) == 0 {
		errs = all
	}
	return strings.Join(errs, " | ")
}

// Stop kills every node and removes the data. It is safe to call twice.
func (g *Galera) Stop() {
	g.mu.Lock()
	g.stopped = true
	var waits []chan struct{}
	for _, n := range g.Nodes {
		if n.cmd != nil {
			n.cmd.Process.Kill()
			waits = append(waits, n.exited)
			n.cmd = nil
		}
	}
	g.mu.Unlock()
	for _, w := range waits {
		<-w
	}
	// The SST script's rsync daemons outlive a killed server: end the
	// ones started for this cluster's data directories.
	killSSTHelpers(g.dir)
	if g.dir != "" {
		os.RemoveAll(g.dir)
	}
}

// killSSTHelpers ends rsync processes whose command line names dir (the
// SST script's daemons, by their configuration file in the joiner's data
// directory), by process id.
func killSSTHelpers(dir string) {
	if dir == "" {
		return
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		// dir followed by "/" or the argument's end: another cluster's
		// temp dir can have this one's name as its prefix (Galera tests
		// run in parallel).
		if err != nil || !(strings.Contains(string(b), dir+"/") || strings.Contains(string(b), dir+"\x00")) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(p)), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		if proc, err := os.FindProcess(pid); err == nil {
			proc.Kill()
		}
	}
}
