package integration

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Private throwaway servers for tests that kill sessions: started from the
// locally installed server binaries on a free port, as the packages' system
// user when running as root, once per test binary, removed at exit
// (shared/SERVERS.md).

type privateServer struct {
	dsn    string
	err    error
	stop   func()
	crash  func() error // PostgreSQL: stop like a crash (pg_ctl -m immediate)
	resume func() error // PostgreSQL: start again on the same port
}

var (
	privMu  sync.Mutex
	privPG  *privateServer
	privMy  *privateServer
	cleanup []func()
)

func TestMain(m *testing.M) {
	code := m.Run()
	privMu.Lock()
	for _, f := range cleanup {
		f()
	}
	privMu.Unlock()
	os.Exit(code)
}

// needPrivate returns the DSN of a private server, or skips (fails under CI).
func needPrivate(t *testing.T, driverName string) string {
	t.Helper()
	privMu.Lock()
	defer privMu.Unlock()
	var s **privateServer
	start := startPostgres
	if driverName == "pgx" {
		s = &privPG
	} else {
		s, start = &privMy, startMariaDB
	}
	if *s == nil {
		*s = start()
		if (*s).stop != nil {
			cleanup = append(cleanup, (*s).stop)
		}
	}
	if (*s).err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("private %s server: %v", driverName, (*s).err)
		}
		t.Skipf("private %s server: %v", driverName, (*s).err)
	}
	return (*s).dsn
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// asUser runs a server command as the given system user when we are root
// (the servers refuse to run as root).
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

func startPostgres() *privateServer {
	bin := pgBinDir()
	if bin == "" {
		return &privateServer{err: fmt.Errorf("no PostgreSQL server binaries (initdb) found")}
	}
	dir, err := tempDirFor("postgres")
	if err != nil {
		return &privateServer{err: err}
	}
	port, err := freePort()
	if err != nil {
		return &privateServer{err: err}
	}
	data := filepath.Join(dir, "data")
	if out, err := asUser("postgres", filepath.Join(bin, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return &privateServer{err: fmt.Errorf("initdb: %v: %s", err, out)}
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", port, dir)
	if out, err := asUser("postgres", filepath.Join(bin, "pg_ctl"), "-D", data, "-w", "-l", filepath.Join(dir, "log"), "-o", opts, "start").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return &privateServer{err: fmt.Errorf("pg_ctl start: %v: %s", err, out)}
	}
	pgctl := func(args ...string) error {
		out, err := asUser("postgres", filepath.Join(bin, "pg_ctl"), append([]string{"-D", data}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("pg_ctl %v: %v: %s", args, err, out)
		}
		return nil
	}
	return &privateServer{
		dsn:    fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port),
		crash:  func() error { return pgctl("-m", "immediate", "stop") },
		resume: func() error { return pgctl("-w", "-l", filepath.Join(dir, "log"), "-o", opts, "start") },
		stop: func() {
			pgctl("-m", "immediate", "stop")
			os.RemoveAll(dir)
		},
	}
}

func startMariaDB() *privateServer {
	mariadbd, err := exec.LookPath("mariadbd")
	if err != nil {
		if mariadbd, err = exec.LookPath("/usr/sbin/mariadbd"); err != nil {
			return &privateServer{err: fmt.Errorf("no mariadbd binary found")}
		}
	}
	dir, err := tempDirFor("mysql")
	if err != nil {
		return &privateServer{err: err}
	}
	port, err := freePort()
	if err != nil {
		return &privateServer{err: err}
	}
	data := filepath.Join(dir, "data")
	install := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+data, "--auth-root-authentication-method=normal", "--skip-test-db")
	if os.Geteuid() == 0 {
		install.Args = append(install.Args, "--user=mysql")
	}
	if out, err := install.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return &privateServer{err: fmt.Errorf("mariadb-install-db: %v: %s", err, out)}
	}
	args := []string{"--no-defaults", "--datadir=" + data, fmt.Sprintf("--port=%d", port), "--bind-address=127.0.0.1",
		"--socket=" + filepath.Join(dir, "sock"), "--pid-file=" + filepath.Join(dir, "pid"), "--log-error=" + filepath.Join(dir, "err.log"),
		"--innodb-flush-log-at-trx-commit=2", "--skip-log-bin", "--innodb-buffer-pool-size=64M"}
	if os.Geteuid() == 0 {
		args = append(args, "--user=mysql")
	}
	cmd := exec.Command(mariadbd, args...)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return &privateServer{err: err}
	}
	stop := func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll(dir)
	}
	root := fmt.Sprintf("root@tcp(127.0.0.1:%d)/", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		db, _ := sql.Open("mysql", root)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = db.ExecContext(ctx, "CREATE DATABASE IF NOT EXISTS test")
		cancel()
		db.Close()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "err.log"))
			stop()
			return &privateServer{err: fmt.Errorf("mariadbd did not answer: %v\n%s", err, log)}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &privateServer{dsn: root + "test", stop: stop}
}
