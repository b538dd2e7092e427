package dbserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/modules/mariadb"
	"github.com/testcontainers/testcontainers-go/modules/postgres"
)

// The images match the versions Debian ships and the suite is measured on.
const (
	postgresImage = "postgres:15"
	mariadbImage  = "mariadb:10.11"
)

// DockerAvailable says why testcontainers cannot be used, or nil. It only
// looks for an engine's socket; StartContainer reports what the engine says.
func DockerAvailable() error {
	if os.Getenv("DOCKER_HOST") != "" {
		return nil
	}
	for _, p := range []string{"/var/run/docker.sock", os.ExpandEnv("$XDG_RUNTIME_DIR/docker.sock"), os.ExpandEnv("$HOME/.docker/run/docker.sock")} {
		if fi, err := os.Stat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
	}
	return errors.New("no Docker engine (DOCKER_HOST unset, no docker.sock)")
}

// StartContainer starts a server with testcontainers-go (crash and resume
// are not offered: the tests that need them use local binaries).
func StartContainer(ctx context.Context, kind Kind) (s *Server, err error) {
	if err := DockerAvailable(); err != nil {
		return nil, err
	}
	defer func() { // testcontainers panics on some engine misconfigurations
		if r := recover(); r != nil {
			s, err = nil, fmt.Errorf("testcontainers: %v", r)
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	switch kind {
	case Postgres:
		c, err := postgres.Run(ctx, postgresImage, postgres.WithDatabase("postgres"), postgres.WithUsername("postgres"),
			postgres.WithPassword("postgres"), postgres.BasicWaitStrategies())
		if err != nil {
			testcontainers.TerminateContainer(c)
			return nil, err
		}
		dsn, err := c.ConnectionString(ctx, "sslmode=disable")
		if err != nil {
			testcontainers.TerminateContainer(c)
			return nil, err
		}
		return &Server{Kind: kind, DSN: dsn, Source: "testcontainers", stop: func() { testcontainers.TerminateContainer(c) }}, nil
	case MariaDB:
		c, err := mariadb.Run(ctx, mariadbImage, mariadb.WithDatabase("test"), mariadb.WithUsername("root"), mariadb.WithPassword(""))
		if err != nil {
			testcontainers.TerminateContainer(c)
			return nil, err
		}
		dsn, err := c.ConnectionString(ctx)
		if err != nil {
			testcontainers.TerminateContainer(c)
			return nil, err
		}
		return &Server{Kind: kind, DSN: dsn, Source: "testcontainers", stop: func() { testcontainers.TerminateContainer(c) }}, nil
	}
	return nil, fmt.Errorf("dbserver: unknown kind %q", kind)
}
