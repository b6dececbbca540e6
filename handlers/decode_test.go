package handlers

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/valyala/fasthttp"
)

// checkField checks what a decoder promises of a field it accepted.
func checkField(t *testing.T, name, v string, max int, kind textKind) {
	t.Helper()
	if v == "" || v != strings.TrimSpace(v) || len(v) > max || !utf8.ValidString(v) {
		t.Errorf("accepted %s %q (%d bytes): want non-empty, trimmed, valid UTF-8, at most %d bytes", name, v, len(v), max)
	}
	// Written apart from required's switch, so that each checks the other.
	refused := "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
	for _, r := range v {
		if kind == prose && strings.ContainsRune("\t\n\r", r) {
			continue
		}
		if unicode.IsControl(r) || kind == label && strings.ContainsRune(refused, r) {
			t.Errorf("accepted %s %q holding %U", name, v, r)
		}
	}
}

// checkRejection checks what every refused request gets: a *requestError
// with status 400 and a lowercase, non-empty message.
func checkRejection(t *testing.T, in []byte, err error) {
	t.Helper()
	var re *requestError
	if !errors.As(err, &re) {
		t.Fatalf("decode(%q) error = %T %v, want a *requestError", in, err, err)
	}
	if re.status != fasthttp.StatusBadRequest {
		t.Errorf("decode(%q) status = %d, want 400", in, re.status)
	}
	if re.msg == "" || re.msg[:1] != strings.ToLower(re.msg[:1]) || !utf8.ValidString(re.msg) {
		t.Errorf("decode(%q) message = %q, want lowercase valid text", in, re.msg)
	}
	if status, obj := statusOf(err); status != 400 || obj.Code != "bad_request" || obj.Message != re.msg {
		t.Errorf("statusOf(decode(%q)) = %d %+v, want 400 bad_request with the message", in, status, obj)
	}
}

func FuzzDecodeChat(f *testing.F) {
	f.Add([]byte(`{"agent_id":"default","message":"hi"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := decodeChat(body)
		if err != nil {
			checkRejection(t, body, err)
			return
		}
		if !json.Valid(body) {
			t.Errorf("decodeChat(%q) accepted invalid JSON", body)
		}
		checkField(t, "agent_id", r.AgentID, maxIDLen, label)
		checkField(t, "message", r.Message, maxMessageLen, prose)
		var raw map[string]json.RawMessage
		if json.Unmarshal(body, &raw) != nil {
			t.Errorf("decodeChat(%q) accepted a body that is not a JSON object", body)
		}
	})
}

func FuzzDecodeAgent(f *testing.F) {
	f.Add([]byte(`{"name":"n","system_prompt":"p","model":"m"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := decodeAgent(body)
		if err != nil {
			checkRejection(t, body, err)
			return
		}
		if !json.Valid(body) {
			t.Errorf("decodeAgent(%q) accepted invalid JSON", body)
		}
		checkField(t, "name", r.Name, maxNameLen, label)
		checkField(t, "system_prompt", r.SystemPrompt, maxPromptLen, prose)
		if r.Model != "" {
			checkField(t, "model", r.Model, maxModelLen, label)
		}
	})
}

func FuzzActivityQuery(f *testing.F) {
	f.Add("after=1&limit=5&wait=0.5&agent_id=default&type=chat.completed")
	f.Fuzz(func(t *testing.T, query string) {
		var args fasthttp.Args
		args.Parse(query)
		q, err := parseActivityQuery(&args)
		if err != nil {
			checkRejection(t, []byte(query), err)
			msg := err.Error()
			if !strings.HasPrefix(msg, "parameter after=") && !strings.HasPrefix(msg, "parameter limit=") &&
				!strings.HasPrefix(msg, "parameter wait=") && !strings.HasPrefix(msg, "parameter type=") {
				t.Errorf("parseActivityQuery(%q) = %q, want a message naming the parameter", query, msg)
			}
			return
		}
		if f := q.filter; f.After < 0 || f.Limit < 1 || f.Limit > maxActivityLimit {
			t.Errorf("parseActivityQuery(%q) = after %d limit %d, want after >= 0 and limit 1..%d", query, f.After, f.Limit, maxActivityLimit)
		}
		if q.wait < 0 || q.wait > maxWait {
			t.Errorf("parseActivityQuery(%q) wait = %v, want 0..%v", query, q.wait, maxWait)
		}
		if q.filter.Type != "" && !slices.Contains(activityTypes, q.filter.Type) {
			t.Errorf("parseActivityQuery(%q) type = %q, want one of %q", query, q.filter.Type, activityTypes)
		}
	})
}

func TestDecodeChat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want chatRequest
	}{
		{`{"agent_id":"default","message":"hi"}`, chatRequest{"default", "hi", false, false, false}},
		{` {"agent_id":" a ","message":"\thi\n","stream":true} ` + "\n", chatRequest{"a", "hi", true, false, false}},
		{`{"agent_id":"a","message":"hi","stream":null,"future":{"x":[1,2]}}`, chatRequest{"a", "hi", false, false, false}},
		{`{"agent_id":"a","message":"\u00e9\ud83d\ude00"}`, chatRequest{"a", "é😀", false, false, false}},
		{`{"agent_id":"a","message":"line 1\r\n\tline 2\n"}`, chatRequest{"a", "line 1\r\n\tline 2", false, false, false}},
		{`{"agent_id":"a","message":"hi","background":true}`, chatRequest{"a", "hi", false, true, true}},
		{`{"agent_id":"a","message":"\u05e9\u05dc\u05d5\u05dd \u202e!"}`, chatRequest{"a", "שלום \u202e!", false, false, false}},
	} {
		got, err := decodeChat([]byte(tc.in))
		if err != nil || got != tc.want {
			t.Errorf("decodeChat(%s) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
}

func TestParseActivityQuery(t *testing.T) {
	var args fasthttp.Args
	args.Parse("after=12&limit=500&wait=1.5&agent_id=x&type=chat.failed")
	q, err := parseActivityQuery(&args)
	if err != nil || q.filter.After != 12 || q.filter.Limit != 500 || q.wait != 1500*time.Millisecond || q.filter.AgentID != "x" || q.filter.Type != "chat.failed" {
		t.Errorf("parseActivityQuery = %+v, %v; want after 12, limit 500, wait 1.5s, agent x, type chat.failed", q, err)
	}
	args.Reset()
	if q, err := parseActivityQuery(&args); err != nil || q.filter.Limit != defaultActivityLimit || q.wait != 0 {
		t.Errorf("parseActivityQuery() = %+v, %v; want the default limit %d and no wait", q, err, defaultActivityLimit)
	}
}
