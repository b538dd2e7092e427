// Package dbserver starts throwaway PostgreSQL and MariaDB servers for
// sqlretry's tests and programs: from the locally installed server binaries
// (initdb/pg_ctl, mariadbd) in a temporary directory on a free port, or,
// where a Docker engine answers, with testcontainers-go. Servers refuse to
// run as root, so as root they run as the packages' system users.
package dbserver

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	_ "github.com/go-sql-driver/mysql" // the MariaDB readiness check
)

// Kind names a server: "postgres" or "mariadb".
type Kind string

const (
	Postgres Kind = "postgres"
	MariaDB  Kind = "mariadb"
)

// KindFor is the server a database/sql driver name talks to: "pgx"
// PostgreSQL, "mysql" MariaDB; false for any other name.
func KindFor(driverName string) (Kind, bool) {
	switch driverName {
	case "pgx":
		return Postgres, true
	case "mysql":
		return MariaDB, true
	}
	return "", false
}

// Driver is the database/sql driver name the tests and programs use for
// the server.
func (k Kind) Driver() string {
	if k == Postgres {
		return "pgx"
	}
	return "mysql"
}

// Server is a running throwaway server.
type Server struct {
	Kind   Kind
	DSN    string // pgx URL, or go-sql-driver/mysql DSN with database test
	Source string // "local binaries" or "testcontainers"
	stop   func()
	crash  func() error
	resume func() error
}

// Stop stops the server and removes its data. It is safe to call twice.
func (s *Server) Stop() {
	if s.stop != nil {
		s.stop()
		s.stop = nil
	}
}

// Crash stops the server at once, like a crash (servers from local binaries
// only), keeping its data and port for Resume.
func (s *Server) Crash() error {
	if s.crash == nil {
		return errors.New("dbserver: this server cannot be crashed and resumed")
	}
	return s.crash()
}

// Resume starts a crashed server again on the same port.
func (s *Server) Resume() error {
	if s.resume == nil {
		return errors.New("dbserver: this server cannot be crashed and resumed")
	}
	return s.resume()
}

// Start starts a server from the local binaries or, failing that, in a
// container; the error names both reasons when neither works.
func Start(ctx context.Context, kind Kind) (*Server, error) {
	s, errLocal := StartLocal(kind)
	if errLocal == nil {
		return s, nil
	}
	s, errDocker := StartContainer(ctx, kind)
	if errDocker == nil {
		return s, nil
	}
	return nil, fmt.Errorf("no %s server could be started: local binaries: %v; testcontainers: %v", kind, errLocal, errDocker)
}

// StartLocal starts a server from the locally installed binaries.
func StartLocal(kind Kind) (*Server, error) {
	switch kind {
	case Postgres:
		return startPostgres()
	case MariaDB:
		return startMariaDB()
	}
	return nil, fmt.Errorf("dbserver: unknown kind %q", kind)
}

// freePort is a port free now that no server of this process was given
// before: a server crashed on purpose leaves its port free during its
// outage, and another test's server given that port would take the
// restart's place (a CI rehearsal's MariaDB restart "came back" as another
// test's server, which then stopped: connection refused).
func freePort() (int, error) {
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if claimPort(port) {
			return port, nil
		}
	}
	return 0, errors.New("dbserver: no port free that was not given before")
}

// claimPort marks port as given to a server of this process; false: it
// was given before.
func claimPort(port int) bool {
	portsMu.Lock()
	defer portsMu.Unlock()
	if portsGiven[port] {
		return false
	}
	portsGiven[port] = true
	return true
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// asUser runs a server command as the given system user when we are root.
func asUser(user string, name string, args ...string) *exec.Cmd {
	if os.Geteuid() == 0 {
		return exec.Command("runuser", append([]string{"-u", user, "--", name}, args...)...)
	}
	return exec.Command(name, args...)
}

func tempDirFor(user string) (string, error) {
	dir, err := os.MkdirTemp("", "sqlretry-"+user+"-")
	if err != nil {
		return "", err
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("chown", user+":"+user, dir).CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("chown: %v: %s", err, out)
		}
	}
	return dir, nil
}

func pgBinDir() string {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dir := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Strings(dirs)
	if len(dirs) > 0 {
		return dirs[len(dirs)-1]
	}
	return ""
}

func startPostgres() (*Server, error) {
	bin := pgBinDir()
	if bin == "" {
		return nil, errors.New("no PostgreSQL server binaries (initdb) found")
	}
	dir, err := tempDirFor("postgres")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	if out, err := asUser("postgres", filepath.Join(bin, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", port, dir)
	pgctl := func(args ...string) error {
		out, err := asUser("postgres", filepath.Join(bin, "pg_ctl"), append([]string{"-D", data}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("pg_ctl %v: %v: %s", args, err, out)
		}
		return nil
	}
	start := func() error { return pgctl("-w", "-l", filepath.Join(dir, "log"), "-o", opts, "start") }
	if err := start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return &Server{
		Kind:   Postgres,
		DSN:    fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port),
		Source: "local binaries",
		crash:  func() error { return pgctl("-m", "immediate", "stop") },
		resume: start,
		stop: func() {
			pgctl("-m", "immediate", "stop")
			os.RemoveAll(dir)
		},
	}, nil
}

func startMariaDB() (*Server, error) {
	mariadbd, err := exec.LookPath("mariadbd")
	if err != nil {
		if mariadbd, err = exec.LookPath("/usr/sbin/mariadbd"); err != nil {
			return nil, errors.New("no mariadbd binary found")
		}
	}
	dir, err := tempDirFor("mysql")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	install := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+data, "--auth-root-authentication-method=normal", "--skip-test-db")
	if os.Geteuid() == 0 {
		install.Args = append(install.Args, "--user=mysql")
	}
	if out, err := install.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("mariadb-install-db: %v: %s", err, out)
	}
	args := []string{"--no-defaults", "--datadir=" + data, fmt.Sprintf("--port=%d", port), "--bind-address=127.0.0.1",
		"--socket=" + filepath.Join(dir, "sock"), "--pid-file=" + filepath.Join(dir, "pid"), "--log-error=" + filepath.Join(dir, "err.log"),
		"--innodb-flush-log-at-trx-commit=2", "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--max-connections=300"}
	if os.Geteuid() == 0 {
		args = append(args, "--user=mysql")
	}
	var cmd *exec.Cmd
	start := func() error {
		cmd = exec.Command(mariadbd, args...)
		return cmd.Start()
	}
	kill := func() error {
		if cmd == nil || cmd.Process == nil {
			return nil
		}
		err := cmd.Process.Kill()
		cmd.Wait()
		cmd = nil
		return err
	}
	if err := start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	stop := func() {
		kill()
		os.RemoveAll(dir)
	}
	root := fmt.Sprintf("root@tcp(127.0.0.1:%d)/", port)
	if err := waitMariaDB(root, 30*time.Second); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "err.log"))
		stop()
		return nil, fmt.Errorf("mariadbd did not answer: %v\n%s", err, log)
	}
	return &Server{Kind: MariaDB, DSN: root + "test", Source: "local binaries", stop: stop,
		crash: kill, // SIGKILL: InnoDB recovers on the next start
		resume: func() error {
			if err := start(); err != nil {
				return err
			}
			if err := waitMariaDB(root, 60*time.Second); err != nil {
				return err
			}
			// The server that answers must be this one (its data
			// directory), not another that took the port during the outage.
			db, _ := sql.Open("mysql", root)
			defer db.Close()
			var got string
			if err := db.QueryRow("SELECT @@datadir").Scan(&got); err != nil {
				return err
			}
			if filepath.Clean(got) != filepath.Clean(data) {
				return fmt.Errorf("dbserver: the server on port %d after the restart is another one (datadir %s, want %s)", port, got, data)
			}
			return nil
		},
	}, nil
}

// waitMariaDB waits until the server answers and has a database test.
func waitMariaDB(root string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		db, _ := sql.Open("mysql", root)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := db.ExecContext(ctx, "CREATE DATABASE IF NOT EXISTS test")
		cancel()
		db.Close()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
