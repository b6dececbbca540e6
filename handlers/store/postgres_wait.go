package store

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Timing of the LISTEN connection.
const (
	// listenIdleCheck is how long the LISTEN connection may stay silent
	// before it is pinged: a peer that vanished without closing the TCP
	// connection (a partition, a failover) is noticed within about this
	// plus listenPingTimeout instead of the kernel's keepalive time.
	listenIdleCheck   = 30 * time.Second
	listenPingTimeout = 5 * time.Second
	// Reconnect backoff: doubles from min to max, with jitter, so that every
	// worker on every host does not knock at once when the server returns.
	listenMinBackoff = 100 * time.Millisecond
	listenMaxBackoff = 5 * time.Second
)

// listenConnect opens a LISTEN connection and catches up: it reads the
// highest activity id after LISTEN took effect, so a commit from before is
// in that read and one from after is notified; none falls in between. The
// catch-up wakes the waiters that have something new to read (they re-read
// by cursor), which is what makes a reconnect lose nothing.
func (s *Store) listenConnect(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, s.pg.listen)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "LISTEN "+activityChannel); err != nil {
		closeListenConn(conn)
		return nil, err
	}
	id, err := listenMaxID(ctx, conn)
	if err != nil {
		closeListenConn(conn)
		return nil, err
	}
	s.feed.advance(id)
	return conn, nil
}

// listenMaxID returns the highest activity id, 0 before Migrate made the
// table (workers never run then, but Open may precede Migrate).
func listenMaxID(ctx context.Context, conn *pgx.Conn) (int64, error) {
	var id int64
	err := conn.QueryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM activities`).Scan(&id)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return 0, nil
	}
	return id, err
}

func closeListenConn(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn.Close(ctx)
}

// listen is the PostgreSQL Store's one listener goroutine, the counterpart
// of poll; Close stops it through ctx. It owns conn, a connection that has
// run LISTEN, and turns each notified id into feed.advance. When the
// connection breaks it reconnects with backoff and, through listenConnect,
// catches up on what was committed meanwhile. Waiters are never failed by
// an outage: they keep waiting until the feed moves, their ctx ends or the
// Store closes.
func (s *Store) listen(ctx context.Context, conn *pgx.Conn) {
	defer close(s.polled)
	backoff := listenMinBackoff
	attempts := 0
	for {
		if conn != nil {
			err := s.listenOn(ctx, conn)
			closeListenConn(conn)
			conn = nil
			if ctx.Err() != nil {
				return
			}
			s.log.Warn().Err(err).Str("database", s.path).Msg("activity listener disconnected")
			backoff, attempts = listenMinBackoff, 0
		}
		// Full jitter over [backoff/2, backoff).
		wait := backoff/2 + rand.N(backoff/2)
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return
		}
		c, err := s.listenConnect(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			attempts++
			if attempts == 1 || attempts%20 == 0 {
				s.log.Warn().Err(err).Str("database", s.path).Int("attempts", attempts).Msg("activity listener reconnect failed")
			}
			backoff = min(2*backoff, listenMaxBackoff)
			continue
		}
		s.log.Info().Str("database", s.path).Int("attempts", attempts+1).Msg("activity listener reconnected")
		conn = c
	}
}

// listenOn reads notifications from conn until it breaks or ctx ends, and
// returns why.
func (s *Store) listenOn(ctx context.Context, conn *pgx.Conn) error {
	for {
		wctx, cancel := context.WithTimeout(ctx, listenIdleCheck)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			id, perr := strconv.ParseInt(n.Payload, 10, 64)
			if perr != nil {
				// Not one of ours (someone NOTIFYs by hand): ask.
				if id, err = listenMaxID(ctx, conn); err != nil {
					return err
				}
			}
			s.feed.advance(id)
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded) && !conn.IsClosed():
			pctx, cancel := context.WithTimeout(ctx, listenPingTimeout)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return err
			}
		default:
			return err
		}
	}
}
