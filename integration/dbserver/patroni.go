package dbserver

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the write probe
)

// Patroni is a PostgreSQL cluster under Patroni on loopback: a private
// single-member etcd as the DCS and n PostgreSQL nodes (Debian's patroni
// and etcd-server packages, the PostgreSQL server binaries), synchronous
// mode on, and a short TTL (PatroniTTL) so a failover takes seconds.
// Patroni and PostgreSQL run as the postgres system user when we are root.
// Clients log in as postgres without a password to the database postgres.
type Patroni struct {
	// DSN reaches the leader through pgx's multi-host connect:
	// every node, target_session_attrs=read-write.
	DSN     string
	Nodes   []*PatroniNode
	Startup time.Duration // from the call to the first write on the leader, with every node streaming

	dir     string
	etcd    *exec.Cmd
	etcdEnd chan struct{}
	mu      sync.Mutex
	stopped bool
}

// PatroniNode is one member of the cluster.
type PatroniNode struct {
	Name    string
	Port    int // PostgreSQL
	APIPort int // Patroni's REST API
	DSN     string
	dir     string
	conf    string
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
}

// The cluster's timing: the leader key lives PatroniTTL without renewal
// (a failover after a node loss takes about that), each member runs its
// loop every PatroniLoopWait.
const (
	PatroniTTL          = 8
	PatroniLoopWait     = 1
	PatroniRetryTimeout = 3
)

// PatroniBinaries is the patroni and etcd executables, or an error naming
// what is missing.
func PatroniBinaries() (patroni, etcd string, err error) {
	var missing []string
	for _, name := range []string{"patroni", "etcd"} {
		p, err := exec.LookPath(name)
		if err != nil {
			if _, err2 := os.Stat("/usr/bin/" + name); err2 == nil {
				p = "/usr/bin/" + name
			} else {
				missing = append(missing, name)
			}
		}
		if name == "patroni" {
			patroni = p
		} else {
			etcd = p
		}
	}
	if pgBinDir() == "" {
		missing = append(missing, "PostgreSQL server binaries")
	}
	if missing != nil {
		return "", "", fmt.Errorf("no %s installed (Debian packages patroni, etcd-server, postgresql)", strings.Join(missing, ", "))
	}
	return patroni, etcd, nil
}

// StartPatroni starts etcd and n Patroni nodes and waits until the leader
// takes a write and every other node streams from it. Stop ends
// everything; on an error everything started is already stopped.
func StartPatroni(n int) (*Patroni, error) {
	began := time.Now()
	patroniBin, etcdBin, err := PatroniBinaries()
	if err != nil {
		return nil, err
	}
	dir, err := tempDirFor("postgres")
	if err != nil {
		return nil, err
	}
	c := &Patroni{dir: dir}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()
	ports, err := freePorts(2 + 2*n)
	if err != nil {
		return nil, err
	}
	if err := c.startEtcd(etcdBin, ports[0], ports[1]); err != nil {
		return nil, err
	}
	var hosts, pgPorts []string
	for i := range n {
		node := &PatroniNode{Name: fmt.Sprintf("node%d", i), Port: ports[2+2*i], APIPort: ports[3+2*i], dir: filepath.Join(dir, fmt.Sprintf("node%d", i))}
		node.DSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", node.Port)
		node.conf = filepath.Join(node.dir, "patroni.yml")
		if err := os.Mkdir(node.dir, 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(node.conf, []byte(patroniConfig(node, ports[0], dir)), 0o600); err != nil {
			return nil, err
		}
		if os.Geteuid() == 0 {
			if out, err := exec.Command("chown", "-R", "postgres:postgres", node.dir).CombinedOutput(); err != nil {
				return nil, fmt.Errorf("chown: %v: %s", err, out)
			}
		}
		c.Nodes = append(c.Nodes, node)
		hosts = append(hosts, "127.0.0.1")
		pgPorts = append(pgPorts, strconv.Itoa(node.Port))
	}
	c.DSN = fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write",
		strings.Join(hosts, ","), strings.Join(pgPorts, ","))
	// One node bootstraps (initdb), the others wait for it and clone it.
	for _, node := range c.Nodes {
		if err := node.start(patroniBin); err != nil {
			return nil, err
		}
	}
	if err := c.waitStreaming(n-1, 3*time.Minute); err != nil {
		return nil, fmt.Errorf("patroni: replicas not streaming: %v\n%s", err, c.Logs())
	}
	if _, err := c.WaitWritable(30 * time.Second); err != nil {
		return nil, fmt.Errorf("patroni: no write with a sync standby: %v\n%s", err, c.Logs())
	}
	c.Startup = time.Since(began)
	ok = true
	return c, nil
}

func freePorts(n int) ([]int, error) {
	// Claimed one by one as freePort claims (a port rejected there is not
	// held open: it may be a crashed server's, about to restart on it).
	ports := make([]int, n)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	return ports, nil
}

func patroniConfig(node *PatroniNode, etcdPort int, dir string) string {
	return fmt.Sprintf(`scope: sqlretry
namespace: /sqlretry-%[6]s/
name: %[1]s
log:
  level: INFO
restapi:
  listen: 127.0.0.1:%[2]d
  connect_address: 127.0.0.1:%[2]d
etcd3:
  host: 127.0.0.1:%[3]d
bootstrap:
  dcs:
    ttl: %[7]d
    loop_wait: %[8]d
    retry_timeout: %[9]d
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_log_hints: "on"
        max_connections: 100
        fsync: "off"
        full_page_writes: "on"
  initdb:
    - encoding: UTF8
    - auth: trust
    - no-sync
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:%[4]d
  connect_address: 127.0.0.1:%[4]d
  data_dir: %[5]s/data
  bin_dir: %[10]s
  pgpass: %[5]s/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
    rewind:
      username: postgres
  parameters:
    unix_socket_directories: %[5]s
  basebackup:
    - checkpoint: fast
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
`, node.Name, node.APIPort, etcdPort, node.Port, node.dir, filepath.Base(dir), PatroniTTL, PatroniLoopWait, PatroniRetryTimeout, pgBinDir())
}

func (c *Patroni) startEtcd(bin string, clientPort, peerPort int) error {
	data := filepath.Join(c.dir, "etcd")
	client := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peer := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	logf, err := os.Create(filepath.Join(c.dir, "etcd.log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, "--name", "e0", "--data-dir", data,
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "e0="+peer, "--initial-cluster-state", "new",
		"--heartbeat-interval", "50", "--election-timeout", "500", "--unsafe-no-fsync")
	cmd.Stdout, cmd.Stderr = logf, logf
	// Gone with the test binary even when it dies without cleaning up
	// (a test timeout's panic).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	logf.Close()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	c.etcd, c.etcdEnd = cmd, done
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := restClient.Get(client + "/health")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(body), `"true"`) {
				return nil
			}
			err = fmt.Errorf("health: %s", body)
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(c.dir, "etcd.log"))
			return fmt.Errorf("etcd exited at start:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("etcd not healthy: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// start starts the node's Patroni (again, after Kill).
func (node *PatroniNode) start(bin string) error {
	node.mu.Lock()
	defer node.mu.Unlock()
	if node.cmd != nil {
		return errors.New("dbserver: patroni node is running")
	}
	logf, err := os.OpenFile(filepath.Join(node.dir, "patroni.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin, node.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "PATRONI_LOG_LEVEL=INFO")
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return err
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Env = append(cmd.Env, "HOME="+node.dir)
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Patroni goes with the test binary even when it dies without cleaning
	// up (a test timeout's panic); the PostgreSQL it started does not.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	node.cmd, node.done = cmd, done
	return nil
}

// postmaster is the pid of the node's running postmaster, or 0.
func (node *PatroniNode) postmaster() int {
	b, err := os.ReadFile(filepath.Join(node.dir, "data", "postmaster.pid"))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil || pid <= 0 || syscall.Kill(pid, 0) != nil {
		return 0
	}
	return pid
}

// killPostmaster kills the node's postmaster alone (SIGKILL), as a crash of
// it: its backends notice their postmaster is gone and exit, a COMMIT in
// flight in one of them may still finish. It returns once the postmaster
// is gone.
func (node *PatroniNode) killPostmaster() error {
	pid := node.postmaster()
	if pid == 0 {
		return fmt.Errorf("dbserver: %s has no running postmaster", node.Name)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return err
	}
	for deadline := time.Now().Add(10 * time.Second); syscall.Kill(pid, 0) == nil && time.Now().Before(deadline); {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && strings.Contains(string(b), ") Z ") {
			break // a zombie, its parent reaps it
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// kill kills the node's Patroni and its PostgreSQL (SIGKILL), and waits
// until Patroni is gone.
func (node *PatroniNode) kill() {
	node.mu.Lock()
	defer node.mu.Unlock()
	if node.cmd != nil {
		killTree(node.cmd.Process.Pid)
		<-node.done
		node.cmd = nil
	}
	if pid := node.postmaster(); pid != 0 {
		killTree(pid)
	}
}

// killTree kills pid and every process descending from it (SIGKILL),
// found by their parent pids in /proc.
func killTree(pid int) {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so from the last ')'.
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil {
			children[ppid] = append(children[ppid], p)
		}
	}
	var tree []int
	var walk func(int)
	walk = func(p int) {
		tree = append(tree, p)
		for _, c := range children[p] {
			walk(c)
		}
	}
	walk(pid)
	for _, p := range tree {
		syscall.Kill(p, syscall.SIGKILL)
	}
	// Wait (a little) until they are gone.
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range tree {
		for syscall.Kill(p, 0) == nil && time.Now().Before(deadline) {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); err == nil && strings.Contains(string(b), ") Z ") {
				break // a zombie, its parent reaps it
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// restClient asks etcd and Patroni's REST API, keeping no connection
// (and no goroutine) once an answer is read.
var restClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// member is a node as Patroni's /cluster endpoint shows it.
type member struct {
	Name     string `json:"name"`
	Role     string `json:"role"`
	State    string `json:"state"`
	Port     int    `json:"port"`
	Timeline int    `json:"timeline"`
}

// members asks the first node whose REST API answers for the cluster.
func (c *Patroni) members() ([]member, error) {
	var last error = errors.New("no node")
	for _, node := range c.Nodes {
		if !node.running() {
			continue
		}
		resp, err := restClient.Get(fmt.Sprintf("http://127.0.0.1:%d/cluster", node.APIPort))
		if err != nil {
			last = err
			continue
		}
		var out struct {
			Members []member `json:"members"`
		}
		err = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if err != nil {
			last = err
			continue
		}
		return out.Members, nil
	}
	return nil, last
}

func (node *PatroniNode) running() bool {
	node.mu.Lock()
	defer node.mu.Unlock()
	return node.cmd != nil
}

// Leader is the node Patroni has as leader, or nil when there is none.
func (c *Patroni) Leader() (*PatroniNode, error) {
	ms, err := c.members()
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if m.Role == "leader" {
			for _, node := range c.Nodes {
				if node.Name == m.Name {
					return node, nil
				}
			}
		}
	}
	return nil, errors.New("patroni: no leader")
}

// SyncStandby is the node Patroni has as synchronous standby.
func (c *Patroni) SyncStandby() (*PatroniNode, error) {
	ms, err := c.members()
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if m.Role == "sync_standby" {
			for _, node := range c.Nodes {
				if node.Name == m.Name {
					return node, nil
				}
			}
		}
	}
	return nil, errors.New("patroni: no sync standby")
}

// KillLeaderPostmaster kills the leader's postmaster (SIGKILL); Patroni, still holding the leader key, restarts it (crash
// recovery). It returns the leader.
func (c *Patroni) KillLeaderPostmaster() (*PatroniNode, error) {
	leader, err := c.Leader()
	if err != nil {
		return nil, err
	}
	return leader, leader.killPostmaster()
}

// KillLeaderNode kills the leader's Patroni and PostgreSQL (SIGKILL): the
// leader key expires after the TTL and the sync standby is promoted. It
// returns the node killed.
func (c *Patroni) KillLeaderNode() (*PatroniNode, error) {
	leader, err := c.Leader()
	if err != nil {
		return nil, err
	}
	leader.kill()
	return leader, nil
}

// Switchover asks Patroni (REST API, POST /switchover) to hand the
// leadership to the sync standby now; it returns once Patroni has
// accepted, the old leader demoted and the new one promoted (Patroni
// answers when the switchover is done).
func (c *Patroni) Switchover() (from, to *PatroniNode, err error) {
	leader, err := c.Leader()
	if err != nil {
		return nil, nil, err
	}
	sync, err := c.SyncStandby()
	if err != nil {
		return nil, nil, err
	}
	body, _ := json.Marshal(map[string]string{"leader": leader.Name, "candidate": sync.Name})
	client := http.Client{Timeout: 60 * time.Second, Transport: restClient.Transport}
	resp, err := client.Post(fmt.Sprintf("http://127.0.0.1:%d/switchover", leader.APIPort), "application/json", bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("patroni: switchover: %s: %s", resp.Status, out)
	}
	return leader, sync, nil
}

// WaitWritable waits until some node takes a write (a row into a table of
// its own, committed with the cluster's synchronous replication) and
// returns that node. It asks every node directly, each attempt with a
// short timeout, so that it sees the cluster, not any client's pacing.
func (c *Patroni) WaitWritable(timeout time.Duration) (*PatroniNode, error) {
	return c.WaitWritableExcept(timeout, nil)
}

// WaitWritableExcept is WaitWritable asking every node but one (the old
// leader of a switchover, still writable until it is demoted).
func (c *Patroni) WaitWritableExcept(timeout time.Duration, except *PatroniNode) (*PatroniNode, error) {
	deadline := time.Now().Add(timeout)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	var last error
	for {
		for _, node := range c.Nodes {
			if node == except {
				continue
			}
			if err := node.tryWrite(ctx); err == nil {
				return node, nil
			} else {
				last = err
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no node took a write within %v: %v", timeout, last)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var writeProbeDB sync.Map // node DSN -> *sql.DB

// tryWrite writes one row on the node, within 1 s.
func (node *PatroniNode) tryWrite(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	v, ok := writeProbeDB.Load(node.DSN)
	if !ok {
		db, err := sql.Open("pgx", node.DSN+"&connect_timeout=1&application_name=bed-probe")
		if err != nil {
			return err
		}
		db.SetMaxIdleConns(1)
		db.SetConnMaxIdleTime(time.Minute)
		v, _ = writeProbeDB.LoadOrStore(node.DSN, db)
	}
	db := v.(*sql.DB)
	var standby bool
	if err := db.QueryRowContext(ctx, "SELECT pg_is_in_recovery()").Scan(&standby); err != nil {
		return err
	}
	if standby {
		return errors.New("in recovery")
	}
	_, err := db.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS bed_probe (at timestamptz); INSERT INTO bed_probe VALUES (now())")
	return err
}

// WaitHealthy waits until every running node is up, one leader taking
// writes and the others streaming from it, one of them the sync standby:
// the state a failover to the sync standby needs.
func (c *Patroni) WaitHealthy(timeout time.Duration) error {
	start := time.Now()
	running := 0
	for _, node := range c.Nodes {
		if node.running() {
			running++
		}
	}
	if err := c.waitStreaming(running-1, timeout); err != nil {
		return err
	}
	_, err := c.WaitWritable(timeout - time.Since(start))
	return err
}

// waitStreaming waits until want replicas stream from the leader, one of
// them synchronous.
func (c *Patroni) waitStreaming(want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		ms, err := c.members()
		if err == nil {
			streaming, sync := 0, false
			for _, m := range ms {
				if m.Role != "leader" && (m.State == "streaming" || m.State == "running") && m.Timeline == leaderTimeline(ms) {
					streaming++
				}
				sync = sync || m.Role == "sync_standby"
			}
			if streaming >= want && sync {
				return nil
			}
			b, _ := json.Marshal(ms)
			last = string(b)
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("within %v: %s", timeout, last)
}

func leaderTimeline(ms []member) int {
	for _, m := range ms {
		if m.Role == "leader" {
			return m.Timeline
		}
	}
	return -1
}

// Members is a one-line view of the cluster (name, role, state,
// timeline), for logs.
func (c *Patroni) Members() string {
	ms, err := c.members()
	if err != nil {
		return err.Error()
	}
	var parts []string
	for _, m := range ms {
		parts = append(parts, fmt.Sprintf("%s:%s/%s/tl%d", m.Name, m.Role, m.State, m.Timeline))
	}
	return strings.Join(parts, " ")
}

// Logs are the nodes' Patroni logs (their last 4 kB each) and etcd's.
func (c *Patroni) Logs() string {
	var b strings.Builder
	for _, node := range c.Nodes {
		out, _ := os.ReadFile(filepath.Join(node.dir, "patroni.log"))
		if len(out) > 4096 {
			out = out[len(out)-4096:]
		}
		fmt.Fprintf(&b, "--- %s patroni.log\n%s\n", node.Name, out)
	}
	return b.String()
}

// Stop kills every node (Patroni and PostgreSQL) and etcd and removes
// their files. It is safe to call twice and from t.Cleanup.
func (c *Patroni) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return
	}
	c.stopped = true
	for _, node := range c.Nodes {
		node.kill()
		if v, ok := writeProbeDB.LoadAndDelete(node.DSN); ok {
			v.(*sql.DB).Close()
		}
	}
	if c.etcd != nil {
		c.etcd.Process.Kill()
		<-c.etcdEnd
	}
	if c.dir != "" && os.Getenv("SQLRETRY_PATRONI_KEEP") == "" {
		os.RemoveAll(c.dir)
	}
}

// StartNode starts a killed node's Patroni again: it rejoins as a replica
// (pg_rewind when it needs to).
func (c *Patroni) StartNode(node *PatroniNode) error {
	bin, _, err := PatroniBinaries()
	if err != nil {
		return err
	}
	return node.start(bin)
}

// Dir is the directory holding etcd's and every node's files (node<i>/data,
// node<i>/patroni.log); kept after Stop with SQLRETRY_PATRONI_KEEP set.
func (c *Patroni) Dir() string { return c.dir }

// DataDir is the node's PostgreSQL data directory.
func (node *PatroniNode) DataDir() string { return filepath.Join(node.dir, "data") }

// FullLogs are the nodes' whole Patroni logs, for a post-mortem.
func (c *Patroni) FullLogs() string {
	var b strings.Builder
	for _, node := range c.Nodes {
		out, _ := os.ReadFile(filepath.Join(node.dir, "patroni.log"))
		fmt.Fprintf(&b, "--- %s patroni.log\n%s\n", node.Name, out)
	}
	return b.String()
}
