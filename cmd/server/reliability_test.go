package main

// Helpers shared by the reliability tests (chaos_test.go, faults_test.go,
// hostile_test.go): /proc readings, the database read back after a run,
// and a chat client that reads streams to their last event.

import (
	"bufio"
	"bytes"
	"database/sql"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	_ "github.com/ncruces/go-sqlite3/driver"
)

// procValue reads "Name:" from /proc/pid/status as a number (the first
// field), such as VmRSS in kB or Threads.
func procValue(pid int, name string) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return -1
}

// procFDs counts the open file descriptors of pid.
func procFDs(pid int) int {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// procFDsButSQLite is procFDs less the SQLite database's own files (the
// database, -wal and -shm): the connection pool keeps an idle connection
// that a burst of concurrent queries opened, three descriptors that are
// not a leak.
func procFDsButSQLite(pid int) int {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range ents {
		l, _ := os.Readlink(dir + e.Name())
		if !strings.HasSuffix(l, ".db") && !strings.HasSuffix(l, ".db-wal") && !strings.HasSuffix(l, ".db-shm") {
			n++
		}
	}
	return n
}

// procCPU is the CPU time pid has used (user and system), from
// /proc/pid/stat.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	// Fields after the comm: state is f[0], utime f[11], stime f[12].
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const hz = 100 // USER_HZ is 100 on every Linux architecture Go supports
	return time.Duration(ut+st) * time.Second / hz
}

// socketFDs counts the open sockets of pid.
func socketFDs(pid int) int {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink(dir + e.Name()); strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// zombiesOf lists the zombie children of ppid.
func zombiesOf(ppid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := procStat(pid); err == nil && st.ppid == ppid && st.state == "Z" {
			out = append(out, pid)
		}
	}
	return out
}

// metricsText returns the master's /metrics text.
func (s *server) metricsText(t *testing.T) string {
	t.Helper()
	code, body := get(t, s.metricsURL(t)+"metrics", "")
	if code != 200 {
		t.Fatalf("GET /metrics = %d", code)
	}
	return body
}

// chatRecord is one chat as the database holds it after the server stopped.
type chatRecord struct {
	ID, Message, Status string
	PID                 int
	Activities          []dbActivity
}

type dbActivity struct {
	ID   int64
	Type string
	Data map[string]any
}

// openReadOnly opens the SQLite database at path read-only, for checks
// made after the server stopped.
func openReadOnly(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// readChats returns every chat of the stopped server's database by
// message, with its activities in id order, and every activity id.
func readChats(t *testing.T, path string) (map[string]*chatRecord, []int64) {
	t.Helper()
	db := openReadOnly(t, path)
	chats := map[string]*chatRecord{}
	byID := map[string]*chatRecord{}
	rows, err := db.Query(`SELECT id, message, status, pid FROM chats`)
	if err != nil {
		t.Fatalf("read chats: %v", err)
	}
	for rows.Next() {
		c := &chatRecord{}
		if err := rows.Scan(&c.ID, &c.Message, &c.Status, &c.PID); err != nil {
			t.Fatal(err)
		}
		chats[c.Message], byID[c.ID] = c, c
	}
	rows.Close()
	rows, err = db.Query(`SELECT id, type, chat_id, COALESCE(data, '') FROM activities ORDER BY id`)
	if err != nil {
		t.Fatalf("read activities: %v", err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var a dbActivity
		var chatID, data string
		if err := rows.Scan(&a.ID, &a.Type, &chatID, &data); err != nil {
			t.Fatal(err)
		}
		if data != "" {
			json.Unmarshal([]byte(data), &a.Data)
		}
		ids = append(ids, a.ID)
		if c := byID[chatID]; c != nil {
			c.Activities = append(c.Activities, a)
		}
	}
	return chats, ids
}

// integrityCheck runs PRAGMA integrity_check on the stopped server's
// database and returns its answer ("ok" when sound).
func integrityCheck(t *testing.T, path string) string {
	t.Helper()
	var res string
	if err := openReadOnly(t, path).QueryRow(`PRAGMA integrity_check`).Scan(&res); err != nil {
		t.Fatalf("integrity_check: %v", err)
	}
	return res
}

// types lists the activity types of c in order.
func (c *chatRecord) types() []string {
	var out []string
	for _, a := range c.Activities {
		out = append(out, a.Type)
	}
	return out
}

// terminal returns c's one terminal activity and how many it has.
func (c *chatRecord) terminal() (dbActivity, int) {
	var last dbActivity
	n := 0
	for _, a := range c.Activities {
		switch a.Type {
		case "chat.completed", "chat.failed", "chat.cancelled":
			last = a
			n++
		}
	}
	return last, n
}

// chatReply is what a client got for one chat: the status, and for a
// stream the last event's name and data.
type chatReply struct {
	status int
	event  string // last SSE event of a stream: done or error
	body   string
	took   time.Duration
	err    error
}

// chat posts one chat on a new connection with client c and reads the
// whole answer.
func (s *server) chat(c *http.Client, message string, stream bool) chatReply {
	b, _ := json.Marshal(map[string]any{"agent_id": "default", "message": message, "stream": stream})
	start := time.Now()
	resp, err := c.Post(s.url("/api/chat"), "application/json", bytes.NewReader(b))
	if err != nil {
		return chatReply{err: err, took: time.Since(start)}
	}
	defer resp.Body.Close()
	r := chatReply{status: resp.StatusCode}
	if stream && resp.StatusCode == 200 {
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			if ev, ok := strings.CutPrefix(sc.Text(), "event: "); ok {
				r.event = ev
			} else if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				r.body = d
			}
		}
		r.err = sc.Err()
	} else {
		raw, err := io.ReadAll(resp.Body)
		r.body, r.err = string(raw), err
	}
	r.took = time.Since(start)
	return r
}
