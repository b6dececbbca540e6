package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestPrune runs on both engines: finished chats created before the cutoff
// go with their deltas, in batches; a running chat and the newest activity
// stay, whatever their age; on PostgreSQL a second pruner is turned away
// while the first holds the lock.
func TestPrune(t *testing.T) {
	for _, engine := range []string{"sqlite", "postgres"} {
		t.Run(engine, func(t *testing.T) {
			url := "sqlite:" + filepath.Join(t.TempDir(), "server.db")
			if engine == "postgres" {
				url = newPostgresDB(t).url
			}
			s, err := Open(t.Context(), url, Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			ctx := t.Context()
			if err := s.Migrate(ctx); err != nil {
				t.Fatal(err)
			}
			var finished []string
			for range 5 {
				act, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: 1}})
				if err != nil {
					t.Fatal(err)
				}
				if err := s.AppendChatEvents(ctx, []ChatDelta{{ChatID: act.ChatID, Attempt: 1, Text: "x"}}); err != nil {
					t.Fatal(err)
				}
				if _, err := s.FinishChat(ctx, act.ChatID, ChatCompleted, nil); err != nil {
					t.Fatal(err)
				}
				finished = append(finished, act.ChatID)
			}
			running, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "still running", Origin: Origin{Worker: 1, PID: 1}})
			if err != nil {
				t.Fatal(err)
			}
			// Everything so far is made a day old.
			old := timeArg(time.Now().Add(-24 * time.Hour))
			for _, q := range []string{`UPDATE chats SET created_at = ?`, `UPDATE chats SET finished_at = ? WHERE finished_at IS NOT NULL`, `UPDATE activities SET time = ?`} {
				if _, err := s.db.ExecContext(ctx, s.q(q), old); err != nil {
					t.Fatal(err)
				}
			}
			// A chat created a day ago that finishes now keeps its result
			// for the period: it counts from its finish.
			late, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "late", Origin: Origin{Worker: 1, PID: 1}})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.db.ExecContext(ctx, s.q(`UPDATE chats SET created_at = ? WHERE id = ?`), old, late.ChatID); err != nil {
				t.Fatal(err)
			}
			if _, err := s.FinishChat(ctx, late.ChatID, ChatCompleted, nil); err != nil {
				t.Fatal(err)
			}
			// Its activities are aged too: they are not what this checks.
			if _, err := s.db.ExecContext(ctx, s.q(`UPDATE activities SET time = ?`), old); err != nil {
				t.Fatal(err)
			}
			last, _ := s.LastActivityID(ctx)
			if engine == "postgres" {
				other, err := Open(ctx, url, Options{})
				if err != nil {
					t.Fatal(err)
				}
				defer other.Close()
				conn, err := other.db.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, pruneLockKey)
				if _, err := s.Prune(ctx, PruneOptions{Before: time.Now().Add(-time.Hour)}); !errors.Is(err, ErrPruneBusy) {
					t.Errorf("Prune() while another holds the lock = %v, want ErrPruneBusy", err)
				}
				conn.ExecContext(ctx, `SELECT pg_advisory_unlock($1)`, pruneLockKey)
				conn.Close()
			}
			got, err := s.Prune(ctx, PruneOptions{Before: time.Now().Add(-time.Hour), Batch: 2})
			if err != nil {
				t.Fatalf("Prune() = %v", err)
			}
			if got.Chats != 5 || got.Activities != int(last)-1 {
				t.Errorf("Prune() = %+v, want 5 chats and %d activities (all but the newest)", got, last-1)
			}
			for _, id := range finished {
				if _, err := s.ChatByID(ctx, id); !errors.Is(err, ErrNotFound) {
					t.Errorf("ChatByID(%s) after Prune = %v, want ErrNotFound", id, err)
				}
			}
			if _, err := s.ChatByID(ctx, running.ChatID); err != nil {
				t.Errorf("the running chat: %v, want kept", err)
			}
			if _, err := s.ChatByID(ctx, late.ChatID); err != nil {
				t.Errorf("the chat created long ago but finished now: %v, want kept", err)
			}
			var events int
			if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM chat_events`).Scan(&events); err != nil {
				t.Fatal(err)
			}
			if events != 0 {
				t.Errorf("%d chat events left, want 0", events)
			}
			acts, _ := s.Activities(ctx, Filter{})
			if len(acts) != 1 || acts[0].ID != last {
				t.Errorf("activities after Prune: %+v, want only the newest, %d", acts, last)
			}
			if again, err := s.Prune(ctx, PruneOptions{Before: time.Now().Add(-time.Hour)}); err != nil || again != (Pruned{}) {
				t.Errorf("second Prune() = %+v, %v; want nothing", again, err)
			}
		})
	}
}

// TestPruneFreesThePoolBetweenBatches holds a PostgreSQL pool of one
// connection (--database-max-conns 1): Migrate does not wait for a second
// one, and a read made while a pass waits between its batches gets the
// connection instead of waiting for the pass to end.
func TestPruneFreesThePoolBetweenBatches(t *testing.T) {
	ctx := t.Context()
	s, err := Open(ctx, newPostgresDB(t).url, Options{MaxOpenConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 3 {
		act, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: 1}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.FinishChat(ctx, act.ChatID, ChatCompleted, nil); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, act.ChatID)
	}
	// Three batches of one chat with a minute between them: the pass
	// lasts two minutes unless the test ends it.
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	pruned := make(chan error, 1)
	go func() {
		_, err := s.Prune(pctx, PruneOptions{Before: time.Now().Add(time.Hour), Batch: 1, Pause: time.Minute})
		pruned <- err
	}()
	// Once the first batch has gone, reads must not wait for the rest.
	deadline := time.Now().Add(10 * time.Second)
	for gone := 0; gone == 0; {
		for _, id := range ids {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := s.ChatByID(rctx, id)
			cancel()
			switch {
			case errors.Is(err, ErrNotFound):
				gone++
			case err != nil:
				t.Fatalf("ChatByID during a pruning pass = %v: the pass holds the only connection", err)
			}
		}
		if gone == 0 && time.Now().After(deadline) {
			t.Fatal("the first batch deleted no chat within 10 s")
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronization
	}
	select {
	case err := <-pruned:
		t.Fatalf("Prune returned %v before its pauses ended", err)
	default:
	}
	stop()
	if err := <-pruned; !errors.Is(err, context.Canceled) {
		t.Errorf("Prune after its context ended = %v, want context.Canceled", err)
	}
}

// BenchmarkPruneNothingDue times a retention pass that finds nothing to
// delete, the pass a server runs most often, on an SQLite store of
// CORRAL_BENCH_ROWS (default 200,000) finished chats and as many
// activities, all newer than the cutoff:
//
//	CORRAL_BENCH_ROWS=1000000 go test -run '^$' -bench PruneNothingDue ./handlers/store
func BenchmarkPruneNothingDue(b *testing.B) {
	rows := 200_000
	if v := os.Getenv("CORRAL_BENCH_ROWS"); v != "" {
		var err error
		if rows, err = strconv.Atoi(v); err != nil {
			b.Fatalf("CORRAL_BENCH_ROWS=%q: %v", v, err)
		}
	}
	ctx := b.Context()
	s := newMigrated(b)
	t := timeArg(time.Now())
	if _, err := s.db.ExecContext(ctx, `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO chats (id, agent_id, message, status, attempts, worker, pid, host, created_at, started_at, finished_at, reply)
SELECT printf('c%08d', i), 'default', 'hello', 'completed', 1, 1, 1, 'h', ?, ?, ?, 'a reply' FROM n`, rows, t, t, t); err != nil {
		b.Fatal(err)
	}
	if _, err := s.db.ExecContext(ctx, `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO activities (time, type, agent_id, chat_id, worker, pid, host)
SELECT ?, 'chat.completed', 'default', printf('c%08d', i), 1, 1, 'h' FROM n`, rows, t); err != nil {
		b.Fatal(err)
	}
	cutoff := time.Now().Add(-time.Hour)
	for b.Loop() {
		n, err := s.Prune(ctx, PruneOptions{Before: cutoff})
		if err != nil || n != (Pruned{}) {
			b.Fatalf("Prune() = %+v, %v, want nothing deleted", n, err)
		}
	}
}

// BenchmarkStartFinishChat times a chat's two writes on SQLite, its start
// and its finish: what the index of finished chats (chats_finished) costs
// every chat, with retention on or not.
func BenchmarkStartFinishChat(b *testing.B) {
	ctx := b.Context()
	s := newMigrated(b)
	for b.Loop() {
		act, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: 1}})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.FinishChat(ctx, act.ChatID, ChatCompleted, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// TestPruneReadsIndexes: on SQLite, the queries that find what a retention
// batch deletes search an index (chats_finished, the activities' primary
// key) rather than scan the table, which the batch's write transaction
// would hold SQLite's lock for (BenchmarkPruneNothingDue).
func TestPruneReadsIndexes(t *testing.T) {
	s := newMigrated(t)
	for _, tc := range []struct {
		query string
		args  []any
		want  string
	}{
		{pruneChats, []any{"", 1}, "SEARCH chats USING INDEX chats_finished (finished_at<?)"},
		{pruneActivities, []any{"", 0, 1}, "SEARCH activities USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"},
	} {
		query, want := tc.query, tc.want
		rows, err := s.db.QueryContext(t.Context(), "EXPLAIN QUERY PLAN "+query, tc.args...)
		if err != nil {
			t.Fatal(err)
		}
		var plan []string
		for rows.Next() {
			var id, parent, unused int
			var detail string
			if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, detail)
		}
		rows.Close()
		scansTable := func(d string) bool {
			return strings.HasPrefix(d, "SCAN chats") || strings.HasPrefix(d, "SCAN activities")
		}
		if !slices.Contains(plan, want) || slices.ContainsFunc(plan, scansTable) {
			t.Errorf("plan of %s:\n%s\nwant %q and no scan of a table", query, strings.Join(plan, "\n"), want)
		}
	}
}

// TestPruneActivitiesOutOfTimeOrder: activities whose times do not follow
// their ids (hosts whose clocks differ) do not end a pass early: every old
// one but the newest activity goes in one pass, the young ones among them
// stay.
func TestPruneActivitiesOutOfTimeOrder(t *testing.T) {
	ctx := t.Context()
	s := newMigrated(t)
	cutoff := time.Now().Add(-time.Hour)
	oldAt, youngAt := timeArg(cutoff.Add(-time.Hour)), timeArg(time.Now())
	// Old, but every third one young; the last (the newest) is old.
	for i := range 20 {
		at := oldAt
		if i%3 == 0 {
			at = youngAt
		}
		if _, err := s.db.ExecContext(ctx, `INSERT INTO activities (time, type, worker, pid, host) VALUES (?, 'agent.created', 1, 1, 'h')`, at); err != nil {
			t.Fatal(err)
		}
	}
	n, err := s.Prune(ctx, PruneOptions{Before: cutoff, Batch: 3})
	if err != nil {
		t.Fatal(err)
	}
	var young, oldLeft int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE time >= ?), count(*) FILTER (WHERE time < ?) FROM activities`,
		timeArg(cutoff), timeArg(cutoff)).Scan(&young, &oldLeft); err != nil {
		t.Fatal(err)
	}
	// 13 of the 20 are old, the newest of them kept; 7 are young, and so is
	// the default agent's creation (Migrate).
	if n.Activities != 12 || oldLeft != 1 || young != 8 {
		t.Errorf("Prune() deleted %d activities and left %d old and %d young; want 12 deleted, the newest old one and 8 young left", n.Activities, oldLeft, young)
	}
}

// TestPostgresPruneCanReadIndexes: on PostgreSQL, whose planner picks by
// cost (a small table is read whole), the same queries can use the index:
// with sequential scans priced out, with the values bound as parameters
// (the partial index's condition must not depend on them), the plan reads
// a range of chats_finished and of the activities' primary key.
func TestPostgresPruneCanReadIndexes(t *testing.T) {
	ctx := t.Context()
	s := openPostgresTest(t, newPostgresDB(t).url, "")
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := s.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `SET enable_seqscan = off`); err != nil {
		t.Fatal(err)
	}
	cutoff := time.Now()
	for query, c := range map[string]struct {
		args []any
		want []string
	}{
		pruneChats:      {[]any{cutoff, 1}, []string{"Index Scan using chats_finished on chats", "Index Cond: (finished_at < "}},
		pruneActivities: {[]any{cutoff, 0, 1}, []string{"Index Scan using activities_pkey on activities", "Index Cond: ((id > "}},
	} {
		rows, err := conn.QueryContext(ctx, "EXPLAIN "+s.q(query), c.args...)
		if err != nil {
			t.Fatal(err)
		}
		var plan []string
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, line)
		}
		rows.Close()
		text := strings.Join(plan, "\n")
		for _, want := range c.want {
			if !strings.Contains(text, want) || strings.Contains(text, "Seq Scan") {
				t.Errorf("plan of %s:\n%s\nwant %q and no Seq Scan", query, text, want)
			}
		}
	}
}
