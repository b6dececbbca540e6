package store

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
)

// PostgreSQL tests run against the server named by CORRAL_TEST_POSTGRES
// (a URL to a database the user may CREATE DATABASE from). Each test gets
// its own database, dropped when it ends. Without a reachable server they
// skip, except under CI, where a skipped backend would be a silent hole.
const (
	envTestPostgres     = "CORRAL_TEST_POSTGRES"
	defaultTestPostgres = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
)

// pgTestDB is one test's database.
type pgTestDB struct {
	url   string    // to open it
	name  string    // its name
	admin *pgx.Conn // a connection to the base database, for faults
}

// newPostgresDB creates an empty database for t and drops it when t ends.
func newPostgresDB(t *testing.T) *pgTestDB {
	t.Helper()
	base := cmp.Or(os.Getenv(envTestPostgres), defaultTestPostgres)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		msg := fmt.Sprintf("PostgreSQL at %s (%s) is not reachable: %v", redactURL(base), envTestPostgres, err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	db := &pgTestDB{name: "corral_test_" + newID(), admin: admin}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+db.name); err != nil {
		admin.Close(ctx)
		t.Fatalf("CREATE DATABASE %s: %v", db.name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+db.name+" WITH (FORCE)"); err != nil {
			t.Errorf("DROP DATABASE %s: %v", db.name, err)
		}
		admin.Close(ctx)
	})
	u, err := url.Parse(base)
	if err != nil {
		t.Fatalf("%s: want a postgres:// URL: %v", envTestPostgres, err)
	}
	u.Path = "/" + db.name
	db.url = u.String()
	return db
}

// redactURL drops a URL's password, for test messages.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable url)"
	}
	return u.Redacted()
}

// openPostgresTest opens url with host and closes it when t ends.
func openPostgresTest(t *testing.T, url, host string) *Store {
	t.Helper()
	s, err := Open(t.Context(), url, Options{Host: host})
	if err != nil {
		t.Fatalf("Open(%s) = %v", redactURL(url), err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close() = %v", err)
		}
	})
	return s
}

func TestPostgresSuite(t *testing.T) {
	runSuite(t, func(t *testing.T) opener {
		db := newPostgresDB(t)
		return func(t *testing.T, host string) backend { return openPostgresTest(t, db.url, host) }
	})
}

func TestPostgresProcessesWriteConcurrently(t *testing.T) {
	db := newPostgresDB(t)
	testProcessesWriteConcurrently(t, db.url, openPostgresTest(t, db.url, "test-host"))
}

func TestPostgresWaitActivityWakesAcrossProcesses(t *testing.T) {
	db := newPostgresDB(t)
	testWaitActivityWakesAcrossProcesses(t, db.url, openPostgresTest(t, db.url, "test-host"))
}

// syncBuffer is a log sink several Stores write to at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestPostgresConcurrentMigrate starts several "hosts" at once on an empty
// database: exactly one migrates, the others wait on the advisory lock and
// find nothing to do.
func TestPostgresConcurrentMigrate(t *testing.T) {
	const hosts = 6
	db := newPostgresDB(t)
	var logs syncBuffer
	stores := make([]*Store, hosts)
	for i := range stores {
		s, err := Open(t.Context(), db.url, Options{Host: fmt.Sprintf("host-%d", i), Logger: zerolog.New(&logs)})
		if err != nil {
			t.Fatalf("Open() = %v", err)
		}
		t.Cleanup(func() { s.Close() })
		stores[i] = s
	}
	start := make(chan struct{})
	errs := make(chan error, hosts)
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Go(func() {
			<-start
			errs <- s.Migrate(t.Context())
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Migrate() = %v", err)
		}
	}
	if n := strings.Count(logs.String(), `"message":"schema migrated"`); n != 1 {
		t.Errorf("%d of %d concurrent Migrates logged \"schema migrated\", want exactly 1\n%s", n, hosts, logs.String())
	}
	var versions, agents, acts int
	err := stores[0].db.QueryRowContext(t.Context(),
		`SELECT (SELECT count(*) FROM schema_version), (SELECT count(*) FROM agents), (SELECT count(*) FROM activities)`).
		Scan(&versions, &agents, &acts)
	if err != nil {
		t.Fatal(err)
	}
	if versions != stores[0].SchemaVersion() || agents != 1 || acts != 1 {
		t.Fatalf("after %d concurrent Migrates: %d schema versions, %d agents, %d activities, want %d, 1, 1",
			hosts, versions, agents, acts, stores[0].SchemaVersion())
	}
}

// TestPostgresCursorMissesNothing is the ordering invariant under load:
// a reader that follows "id > cursor" while many transactions commit at
// once must end up with every id. Without the activity lock, a sequence
// commits ids out of order and this reader skips some.
func TestPostgresCursorMissesNothing(t *testing.T) {
	const writers, chats = 8, 60
	db := newPostgresDB(t)
	s := openPostgresTest(t, db.url, "host-a")
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	other := openPostgresTest(t, db.url, "host-b")
	base, _ := s.LastActivityID(t.Context())

	ctx := t.Context()
	done := make(chan struct{})
	var seen []int64
	var readErr error
	read := make(chan struct{})
	go func() {
		defer close(read)
		cursor := base
		for finished := false; ; {
			select {
			case <-done:
				finished = true // one more full read after the last commit
			default:
			}
			page, err := s.Activities(ctx, Filter{After: cursor, Limit: MaxLimit})
			if err != nil {
				readErr = err
				return
			}
			for _, a := range page {
				seen = append(seen, a.ID)
				cursor = a.ID
			}
			if finished && len(page) == 0 {
				return
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		h := []*Store{s, other}[w%2]
		wg.Go(func() {
			for range chats {
				st, err := h.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: w, PID: w}})
				if err == nil {
					_, err = h.FinishChat(ctx, st.ChatID, ChatCompleted, nil)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(done)
	<-read
	close(errs)
	for err := range errs {
		t.Fatalf("writer: %v", err)
	}
	if readErr != nil {
		t.Fatalf("reader: %v", readErr)
	}
	var all []int64
	rows, err := s.db.QueryContext(ctx, `SELECT id FROM activities WHERE id > $1 ORDER BY id`, base)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		rows.Scan(&id)
		all = append(all, id)
	}
	if len(all) != 2*writers*chats {
		t.Fatalf("%d activities stored, want %d", len(all), 2*writers*chats)
	}
	if !slices.Equal(seen, all) {
		missed := 0
		for _, id := range all {
			if _, ok := slices.BinarySearch(seen, id); !ok {
				missed++
			}
		}
		t.Fatalf("a reader following id > cursor saw %d of %d activities (missed %d)", len(seen), len(all), missed)
	}
}

// TestPostgresOutage takes the database away while a waiter is blocked:
// calls fail with ErrUnavailable, the store recovers by itself when the
// database returns, and the waiter is woken by a write made after the
// recovery.
func TestPostgresOutage(t *testing.T) {
	db := newPostgresDB(t)
	a := openPostgresTest(t, db.url, "host-a")
	if err := a.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	b := openPostgresTest(t, db.url, "host-b")
	ctx := t.Context()
	last, err := a.LastActivityID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	woke := make(chan error, 1)
	go func() { woke <- a.WaitActivity(ctxTimeout(t, 60*time.Second), last) }()
	waitFor(t, 2*time.Second, func() error {
		if !a.feed.hasWaiters() {
			return errors.New("WaitActivity has not started waiting")
		}
		return nil
	})

	admin := func(sql string) {
		t.Helper()
		if _, err := db.admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	down := time.Now()
	admin("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS false")
	restored := false
	t.Cleanup(func() {
		if !restored {
			db.admin.Exec(context.Background(), "ALTER DATABASE "+db.name+" ALLOW_CONNECTIONS true")
		}
	})
	admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db.name + "'")

	for name, call := range map[string]func() error{
		"CreateAgent":    func() error { _, err := a.CreateAgent(ctx, Agent{Name: "x"}, Origin{}); return err },
		"StartChat":      func() error { _, err := b.StartChat(ctx, Chat{AgentID: DefaultAgentID}); return err },
		"Agents":         func() error { _, _, err := a.Agents(ctx, AgentPage{}); return err },
		"LastActivityID": func() error { _, err := b.LastActivityID(ctx); return err },
	} {
		err := call()
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("%s() with the database down = %v, want ErrUnavailable", name, err)
			continue
		}
		t.Logf("%s() with the database down: %v", name, err)
	}
	if _, err := Open(ctx, db.url, Options{}); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), db.name) {
		t.Errorf("Open() with the database down = %v, want ErrUnavailable naming %s", err, db.name)
	}
	select {
	case err := <-woke:
		t.Fatalf("WaitActivity() returned %v during the outage, want it still waiting", err)
	default:
	}

	admin("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS true")
	restored = true
	up := time.Now()
	waitFor(t, 10*time.Second, func() error { _, _, err := a.Agents(ctx, AgentPage{}); return err })
	t.Logf("down %v; first call succeeded %v after the database returned", up.Sub(down).Round(time.Millisecond), time.Since(up).Round(time.Millisecond))

	act, err := b.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "after the outage", Origin: Origin{Worker: 1, PID: 1}})
	if err != nil {
		t.Fatalf("StartChat() after recovery = %v", err)
	}
	wrote := time.Now()
	select {
	case err := <-woke:
		if err != nil {
			t.Fatalf("WaitActivity(%d) after recovery = %v", last, err)
		}
		t.Logf("waiter woke %v after the first write following recovery", time.Since(wrote).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatalf("WaitActivity(%d) still waiting 15s after a write that followed recovery", last)
	}
	got, err := a.Activities(ctx, Filter{After: last})
	if err != nil || len(got) != 1 || got[0].ID != act.ID {
		t.Fatalf("Activities(after %d) = %+v, %v, want only %d", last, got, err, act.ID)
	}
}

func TestRebindDollar(t *testing.T) {
	for in, want := range map[string]string{
		`SELECT 1`:                        `SELECT 1`,
		`WHERE id = ?`:                    `WHERE id = $1`,
		`VALUES (?, ?, ?) LIMIT ?`:        `VALUES ($1, $2, $3) LIMIT $4`,
		`a = ? AND b = ? AND c = 'x'`:     `a = $1 AND b = $2 AND c = 'x'`,
		`SELECT pg_advisory_xact_lock(1)`: `SELECT pg_advisory_xact_lock(1)`,
	} {
		if got := rebindDollar(in); got != want {
			t.Errorf("rebindDollar(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestPostgresClaimSurvivesBrokenConnection: a claim whose connection is
// terminated is taken again on a new one, so a second server with the same
// instance id is still refused afterwards.
func TestPostgresClaimSurvivesBrokenConnection(t *testing.T) {
	every := claimCheckEvery
	t.Cleanup(func() { claimCheckEvery = every }) // after the stores close
	claimCheckEvery = 50 * time.Millisecond
	db := newPostgresDB(t)
	ctx := t.Context()
	a := openPostgresTest(t, db.url, "host-a")
	if err := a.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	if err := a.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance() = %v", err)
	}
	holder := func() (int32, error) {
		var pid int32
		err := db.admin.QueryRow(ctx, `SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = $1::oid AND l.objid = hashtext($2)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = $3)`, int64(instanceLockClass), "host-a", db.name).Scan(&pid)
		return pid, err
	}
	first, err := holder()
	if err != nil {
		t.Fatalf("the claim's lock is not in pg_locks: %v", err)
	}
	if _, err := db.admin.Exec(ctx, "SELECT pg_terminate_backend($1)", first); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		pid, err := holder()
		if err != nil {
			return fmt.Errorf("lock not held: %v", err)
		}
		if pid == first {
			return fmt.Errorf("lock still held by the terminated backend %d", pid)
		}
		return nil
	})
	if err := openPostgresTest(t, db.url, "host-a").ClaimInstance(ctx); !errors.Is(err, ErrInstanceInUse) {
		t.Errorf("ClaimInstance() of a second handle after the first one's connection broke = %v, want ErrInstanceInUse", err)
	}
}

// TestPostgresLostHostGrace: HandBackLostHosts leaves alone an instance
// whose claim's connection broke for a moment (it takes the claim again),
// and hands back the chats of one whose claim stays gone, once lostGrace
// has passed, whatever claims of the same id other databases hold.
func TestPostgresLostHostGrace(t *testing.T) {
	every := claimCheckEvery
	t.Cleanup(func() { claimCheckEvery = every }) // after the stores close
	// The claim comes back within claimCheckEvery and a reconnection;
	// the grace is twice that.
	claimCheckEvery = time.Second
	grace := lostGrace()
	db := newPostgresDB(t)
	ctx := t.Context()
	a := openPostgresTest(t, db.url, "host-a")
	if err := a.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	if err := a.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance() = %v", err)
	}
	b := openPostgresTest(t, db.url, "host-b")
	act, err := a.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: 100}, Background: true})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	if _, err := a.BeginAttempt(ctx, act.ChatID, Origin{Worker: 1, PID: 100}); err != nil {
		t.Fatalf("BeginAttempt() = %v", err)
	}
	holder := func() (int32, error) {
		var pid int32
		err := db.admin.QueryRow(ctx, `SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objid = hashtext($2)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = $3)`, int64(instanceLockClass), "host-a", db.name).Scan(&pid)
		return pid, err
	}
	handBack := func() int {
		t.Helper()
		n, err := b.HandBackLostHosts(ctx, 3)
		if err != nil {
			t.Fatalf("HandBackLostHosts() = %v", err)
		}
		return n
	}

	// A flap: the claim's connection is terminated, and taken again.
	first, err := holder()
	if err != nil {
		t.Fatalf("the claim's lock is not in pg_locks: %v", err)
	}
	if _, err := db.admin.Exec(ctx, "SELECT pg_terminate_backend($1)", first); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() error {
		if pid, err := holder(); err == nil && pid == first {
			return fmt.Errorf("lock still held by the terminated backend %d", pid)
		}
		return nil
	})
	lost := time.Now()
	if n := handBack(); n != 0 {
		t.Fatalf("HandBackLostHosts() as the claim went = %d, want 0 (within the grace)", n)
	}
	var back time.Duration
	waitFor(t, 2*grace+5*time.Second, func() error {
		if n := handBack(); n != 0 {
			t.Fatalf("HandBackLostHosts() %v after a claim that came back = %d chats, want 0", time.Since(lost), n)
		}
		if pid, err := holder(); err != nil || pid == first {
			return fmt.Errorf("claim not taken again (%v)", err)
		}
		if back == 0 {
			back = time.Since(lost)
		}
		if time.Since(lost) < 2*grace {
			return fmt.Errorf("watching for %v of %v", time.Since(lost).Round(time.Millisecond), 2*grace)
		}
		return nil
	})

	t.Logf("claim taken again %v after its connection was terminated", back.Round(time.Millisecond))

	// A death: the claim goes for good. Another deployment on the same
	// server (another database) runs an instance of the same id: its
	// claim is no claim here.
	a.Close()
	gone := time.Now()
	other := openPostgresTest(t, newPostgresDB(t).url, "host-a")
	if err := other.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() of another database = %v", err)
	}
	if err := other.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-a) in another database = %v", err)
	}
	waitFor(t, grace+10*time.Second, func() error {
		if n := handBack(); n != 1 {
			return fmt.Errorf("HandBackLostHosts() = %d, want 1", n)
		}
		return nil
	})
	if d := time.Since(gone); d < grace {
		t.Fatalf("chats of a lost instance handed back %v after it went, want no sooner than %v", d, grace)
	}
	c, err := b.ChatByID(ctx, act.ChatID)
	if err != nil || c.Status != ChatQueued {
		t.Fatalf("chat of the lost instance = %+v, %v, want queued", c, err)
	}
}
