package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
)

// instanceLockClass is the first key of the two-key advisory lock a
// PostgreSQL claim holds ("corr"); the second is hashtext(host). Two-key
// locks never conflict with the one-key locks of postgres.go.
const instanceLockClass = 0x636f7272

// instanceLockHeld is the condition on pg_locks l that the claim of the
// instance id host (an SQL expression) is held in this database. Advisory
// locks are per database, and a one-key lock shows its key's high half in
// classid: objsubid 2 marks the two-key locks.
func instanceLockHeld(host string) string {
	return fmt.Sprintf(`l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %d::oid AND l.objid = hashtext(%s)::oid`, instanceLockClass, host)
}

// ClaimInstance makes this Store the only running claimant of its host name
// (Options.Host, the --instance-id) on this database until Close, and fails
// with ErrInstanceInUse when another process holds it. The supervisor claims
// before FailAllStarted, which fails every started chat of the host name: a
// second server sharing the name would fail the first one's chats in flight.
//
// On SQLite the claim is an open-file-description lock on a file beside the
// database (server.db.instance-HOST.lock, holding the claimant's pid); on
// PostgreSQL it is a session advisory lock on a connection of its own. The
// operating system or the database server drops it when the process dies.
// A PostgreSQL claim whose connection breaks is taken again on a new one
// within claimCheckEvery of the database answering again.
func (s *Store) ClaimInstance(ctx context.Context) error {
	if s.claim != nil {
		return nil
	}
	var err error
	if s.pg != nil {
		s.claim, err = s.claimPostgres(ctx)
	} else {
		s.claim, err = claimFile(s.path, s.host)
	}
	return err
}

// InstanceClaim returns the file whose lock is this Store's SQLite claim,
// for a new master to inherit in an upgrade (see TakeOverInstance); nil on
// PostgreSQL or before ClaimInstance. The Store keeps it.
func (s *Store) InstanceClaim() *os.File {
	f, _ := s.claim.(*os.File)
	return f
}

// TakeOverInstance claims the instance id from the master this process
// replaces in an upgrade, with no moment at which a third server could take
// it. On SQLite, inherited is that master's InstanceClaim: the lock belongs
// to the open file description, which both processes share, so it passes
// at once and stays when the old master exits. On PostgreSQL, where a
// session lock cannot change hands, the claim is waited for on a
// connection of its own (pg_advisory_lock, in the background) and granted
// by the database the moment the old master's session ends; a third server
// trying meanwhile finds it held. A claim of another instance id or
// database than this Store's (the old master ran with other settings) is
// closed, and this Store claims its own as ClaimInstance does.
func (s *Store) TakeOverInstance(inherited *os.File) error {
	if s.claim != nil {
		return nil
	}
	if s.pg != nil {
		c := &pgClaim{stop: make(chan struct{}), done: make(chan struct{}), waiting: true}
		go s.keepClaim(c)
		s.claim = c
		return nil
	}
	// The old master may have run with another --instance-id or database
	// than this process: its claim is then not ours to keep, and ours is
	// claimed as at any start.
	var got, want unix.Stat_t
	if inherited == nil || unix.Fstat(int(inherited.Fd()), &got) != nil ||
		unix.Stat(claimName(s.path, s.host), &want) != nil || got.Dev != want.Dev || got.Ino != want.Ino {
		if inherited != nil {
			inherited.Close()
		}
		c, err := claimFile(s.path, s.host)
		if err != nil {
			return err
		}
		s.claim = c
		return nil
	}
	// Our own description's lock: setting it again succeeds, and fails if
	// the file is not the claim after all.
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(inherited.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("claim instance id %q: inherited claim: %w", s.host, err)
	}
	inherited.Truncate(0)
	inherited.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	s.claim = inherited
	return nil
}

// claimName is the SQLite claim's lock file of instance id host.
func claimName(path, host string) string {
	return path + ".instance-" + url.PathEscape(host) + ".lock"
}

// claimFile locks path.instance-HOST.lock and writes the pid into it.
func claimFile(path, host string) (io.Closer, error) {
	name := claimName(path, host)
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("claim instance id %q: %w", host, err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		holder, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("claim instance id %q: %w: another running server on %s holds it (pid %s, lock file %s); give each server on one database its own --instance-id",
				host, ErrInstanceInUse, path, strings.TrimSpace(string(holder)), name)
		}
		return nil, fmt.Errorf("claim instance id %q: lock %s: %w", host, name, err)
	}
	// The pid is for the next claimant's message; best effort.
	f.Truncate(0)
	f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	return f, nil
}

// claimCheckEvery is how often a PostgreSQL claim checks its connection.
var claimCheckEvery = 5 * time.Second

// pgClaim holds the instance lock on a connection of its own, and takes
// it again on a new connection when that one breaks (a database restart, a
// terminated backend), so that the claim lasts as long as the server.
type pgClaim struct {
	conn *pgx.Conn // owned by keep once it runs; nil while the claim is lost
	stop chan struct{}
	done chan struct{}
	// waiting: the claim is being taken over from an upgrading master, and
	// is waited for rather than tried.
	waiting bool
}

func (c *pgClaim) Close() error {
	close(c.stop)
	<-c.done
	if c.conn != nil {
		closeListenConn(c.conn)
	}
	return nil
}

func (s *Store) claimPostgres(ctx context.Context) (io.Closer, error) {
	conn, err := s.lockInstance(ctx)
	if err != nil {
		return nil, err
	}
	c := &pgClaim{conn: conn, stop: make(chan struct{}), done: make(chan struct{})}
	go s.keepClaim(c)
	return c, nil
}

// lockInstance connects and takes the instance lock, or says who holds it.
func (s *Store) lockInstance(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, s.pg.listen)
	if err != nil {
		return nil, s.wrap(ctx, "claim instance id "+s.host, err)
	}
	var ok bool
	err = conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, int32(instanceLockClass), s.host).Scan(&ok)
	if err == nil && !ok {
		client := "another session"
		conn.QueryRow(ctx, `SELECT 'connected from ' || coalesce(host(a.client_addr), 'a local socket') || ', backend pid ' || a.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE `+instanceLockHeld("$1"), s.host).Scan(&client)
		err = fmt.Errorf("claim instance id %q: %w: another running server on %s holds it (%s); give each server on one database its own --instance-id",
			s.host, ErrInstanceInUse, s.path, client)
	}
	if err != nil {
		closeListenConn(conn)
		if errors.Is(err, ErrInstanceInUse) {
			return nil, err
		}
		return nil, s.wrap(ctx, "claim instance id "+s.host, err)
	}
	return conn, nil
}

// waitInstance takes the instance lock, waiting until whoever holds it
// lets go, on a connection of its own; nil once stop closes first.
func (s *Store) waitInstance(stop <-chan struct{}) *pgx.Conn {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		conn, err := pgx.ConnectConfig(ctx, s.pg.listen)
		if err == nil {
			_, err = conn.Exec(ctx, `SELECT pg_advisory_lock($1, hashtext($2))`, int32(instanceLockClass), s.host)
			if err == nil {
				return conn
			}
			closeListenConn(conn)
		}
		if ctx.Err() != nil {
			return nil
		}
		s.log.Error().Err(err).Msg("instance claim not taken over yet")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(claimCheckEvery):
		}
	}
}

// keepClaim checks c's connection every claimCheckEvery and, once it is
// broken, takes the lock again on a new one until it succeeds or c closes.
func (s *Store) keepClaim(c *pgClaim) {
	defer close(c.done)
	if c.waiting {
		c.conn = s.waitInstance(c.stop)
		if c.conn == nil {
			return
		}
		s.log.Info().Str("instance_id", s.host).Str("database", s.path).Msg("instance claim taken over from the old master")
	}
	tick := time.NewTicker(claimCheckEvery)
	defer tick.Stop()
	var lastErr string
	for {
		select {
		case <-c.stop:
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), claimCheckEvery)
		if c.conn != nil {
			if c.conn.Ping(ctx) == nil {
				cancel()
				continue
			}
			closeListenConn(c.conn)
			c.conn = nil
			s.log.Warn().Str("instance_id", s.host).Str("database", s.path).Msg("instance claim lost with its connection; taking it again")
		}
		conn, err := s.lockInstance(ctx)
		cancel()
		if err != nil {
			if err.Error() != lastErr {
				lastErr = err.Error()
				s.log.Error().Err(err).Msg("instance claim not taken again yet")
			}
			continue
		}
		c.conn, lastErr = conn, ""
		s.log.Info().Str("instance_id", s.host).Str("database", s.path).Msg("instance claim taken again")
	}
}
