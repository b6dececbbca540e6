package handlers

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/corralhq/corral/handlers/store"
)

func TestDefaultAgentAfterMigrate(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})

	r := a.get("/api/agents/default")
	wantStatus(t, "GET /api/agents/default", r, http.StatusOK)
	got := decodeBody[store.Agent](t, "GET /api/agents/default", r)
	if got.ID != store.DefaultAgentID || got.Name != store.DefaultAgentName || got.SystemPrompt != store.DefaultAgentSystemPrompt {
		t.Errorf("default agent = %+v, want id %q, name %q and the default prompt", got, store.DefaultAgentID, store.DefaultAgentName)
	}

	r = a.get("/api/agents")
	wantStatus(t, "GET /api/agents", r, http.StatusOK)
	list := decodeBody[struct {
		Agents []store.Agent `json:"agents"`
	}](t, "GET /api/agents", r)
	if len(list.Agents) != 1 || list.Agents[0].ID != store.DefaultAgentID {
		t.Errorf("GET /api/agents = %+v, want just the default agent", list.Agents)
	}
}

func TestAgentLifecycle(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)

	before := time.Now().Add(-time.Second)
	r := a.post("/api/agents", `{"name": "  Researcher ", "system_prompt": "You research.", "model": "gpt-x"}`)
	wantStatus(t, "POST /api/agents", r, http.StatusCreated)
	created := decodeBody[store.Agent](t, "POST /api/agents", r)
	if created.ID == "" || created.Name != "Researcher" || created.SystemPrompt != "You research." || created.Model != "gpt-x" {
		t.Errorf("created agent = %+v, want a new id, name %q (trimmed), the prompt and model gpt-x", created, "Researcher")
	}
	if created.CreatedAt.Before(before) || created.CreatedAt.After(time.Now().Add(time.Second)) {
		t.Errorf("created_at = %v, want about now", created.CreatedAt)
	}
	if loc, want := r.header.Get("Location"), "/api/agents/"+created.ID; loc != want {
		t.Errorf("Location = %q, want %q", loc, want)
	}
	for _, field := range []string{`"id"`, `"name"`, `"system_prompt"`, `"model"`, `"created_at"`} {
		if !strings.Contains(string(r.body), field) {
			t.Errorf("POST /api/agents answer %s has no %s field", r.body, field)
		}
	}

	r = a.get("/api/agents/" + created.ID)
	wantStatus(t, "GET agent", r, http.StatusOK)
	if got := decodeBody[store.Agent](t, "GET agent", r); !got.CreatedAt.Equal(created.CreatedAt) || got.Name != created.Name || got.Model != created.Model {
		t.Errorf("GET agent = %+v, want %+v", got, created)
	}

	list := decodeBody[struct {
		Agents []store.Agent `json:"agents"`
	}](t, "GET /api/agents", a.get("/api/agents"))
	if len(list.Agents) != 2 || list.Agents[1].ID != created.ID {
		t.Errorf("agents = %+v, want the default agent then %s", list.Agents, created.ID)
	}

	r = a.do(http.MethodDelete, "/api/agents/"+created.ID, nil)
	if r.status != http.StatusNoContent || len(r.body) != 0 {
		t.Fatalf("DELETE agent = %d %q, want 204 with no body", r.status, r.body)
	}
	wantError(t, "GET deleted agent", a.get("/api/agents/"+created.ID), http.StatusNotFound, "not_found", `no agent "`+created.ID+`"`, "GET /api/agents")
	wantError(t, "DELETE deleted agent", a.do(http.MethodDelete, "/api/agents/"+created.ID, nil), http.StatusNotFound, "not_found", `no agent "`+created.ID+`"`)

	acts := activitiesAfter(t, a.st, cursor)
	if len(acts) != 2 || acts[0].Type != "agent.created" || acts[1].Type != "agent.deleted" ||
		acts[0].AgentID != created.ID || acts[1].AgentID != created.ID {
		t.Fatalf("activities = %+v, want agent.created then agent.deleted of %s", acts, created.ID)
	}
	if acts[0].Worker != testWorkerSlot || acts[0].PID != 4242 {
		t.Errorf("agent.created by worker %d pid %d, want worker %d pid 4242", acts[0].Worker, acts[0].PID, testWorkerSlot)
	}
	// Once the default agent is gone, no message points at it.
	if r := a.do(http.MethodDelete, "/api/agents/"+store.DefaultAgentID, nil); r.status != http.StatusNoContent {
		t.Fatalf("DELETE the default agent = %d %s, want 204", r.status, r.body)
	}
	e := wantError(t, "chat with the deleted default agent", a.post("/api/chat", `{"agent_id":"default","message":"hi"}`), http.StatusNotFound, "not_found", `no agent "default" (it was deleted)`)
	if strings.Contains(e.Error.Message, "the default one is") {
		t.Errorf("404 for the deleted default agent = %q, still pointing at it", e.Error.Message)
	}
	wantError(t, "GET /api/agents/", a.get("/api/agents/"), http.StatusNotFound, "not_found", "no agent id given")
}

func TestCreateAgentModelIsOptional(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	r := a.post("/api/agents", `{"name": "n", "system_prompt": "p", "unknown_future_field": [1, {"x": null}]}`)
	wantStatus(t, "POST /api/agents without model", r, http.StatusCreated)
	if got := decodeBody[store.Agent](t, "POST /api/agents", r); got.Model != "" {
		t.Errorf("model = %q, want empty (the provider's default)", got.Model)
	}
}

func TestCreateAgentValidation(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	long := strings.Repeat("é", 101) // 202 bytes
	for _, tc := range []struct {
		name, body string
		want       []string // parts of the message
	}{
		{"no name", `{"system_prompt": "p"}`, []string{`"name"`, "required"}},
		{"null name", `{"name": null, "system_prompt": "p"}`, []string{`"name"`, "required"}},
		{"blank name", `{"name": " \t\n", "system_prompt": "p"}`, []string{`"name"`, "must not be empty"}},
		{"name not a string", `{"name": 7, "system_prompt": "p"}`, []string{`"name"`, "must be a string"}},
		{"name too long", `{"name": "` + long + `", "system_prompt": "p"}`, []string{`"name"`, "longer than 200 bytes"}},
		{"no system_prompt", `{"name": "n"}`, []string{`"system_prompt"`, "required"}},
		{"system_prompt an object", `{"name": "n", "system_prompt": {"a": 1}}`, []string{`"system_prompt"`, "must be a string"}},
		{"model not a string", `{"name": "n", "system_prompt": "p", "model": true}`, []string{`"model"`, "must be a string"}},
		{"blank model", `{"name": "n", "system_prompt": "p", "model": ""}`, []string{`"model"`, "must not be empty"}},
		{"NUL in name", `{"name": "a\u0000b", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+0000"}},
		{"escape in name", `{"name": "a\u001b[31mb", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+001B"}},
		{"newline in name", `{"name": "a\nb", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+000A"}},
		{"tab in name", `{"name": "a\tb", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+0009"}},
		{"C1 control in name", `{"name": "a\u009bb", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+009B"}},
		{"DEL in name", `{"name": "a\u007fb", "system_prompt": "p"}`, []string{`"name"`, "control characters", "U+007F"}},
		{"RLO in name", `{"name": "invoice\u202egpj.exe", "system_prompt": "p"}`, []string{`"name"`, "bidi", "U+202E"}},
		{"LRE in name", `{"name": "a\u202ab", "system_prompt": "p"}`, []string{`"name"`, "bidi", "U+202A"}},
		{"LRI in name", `{"name": "a\u2066b", "system_prompt": "p"}`, []string{`"name"`, "bidi", "U+2066"}},
		{"PDI in name", `{"name": "a\u2069b", "system_prompt": "p"}`, []string{`"name"`, "bidi", "U+2069"}},
		{"line separator in name", `{"name": "a\u2028b", "system_prompt": "p"}`, []string{`"name"`, "line breaks", "U+2028"}},
		{"NUL in model", `{"name": "n", "system_prompt": "p", "model": "gpt\u0000"}`, []string{`"model"`, "control characters", "U+0000"}},
		{"newline in model", `{"name": "n", "system_prompt": "p", "model": "gpt\r\nX-Injected: 1"}`, []string{`"model"`, "control characters", "U+000D"}},
		{"RLO in model", `{"name": "n", "system_prompt": "p", "model": "\u202Egpt"}`, []string{`"model"`, "bidi", "U+202E"}},
		{"NUL in system_prompt", `{"name": "n", "system_prompt": "be\u0000nice"}`, []string{`"system_prompt"`, "control characters", "U+0000"}},
		{"bell in system_prompt", `{"name": "n", "system_prompt": "be\u0007nice"}`, []string{`"system_prompt"`, "control characters", "U+0007"}},
		{"array body", `[{"name": "n", "system_prompt": "p"}]`, []string{"must be a JSON object"}},
		{"string body", `"agent"`, []string{"must be a JSON object"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := a.on(t)
			wantError(t, "POST /api/agents "+tc.body, a.post("/api/agents", tc.body), http.StatusBadRequest, "bad_request", tc.want...)
		})
	}
	if acts := activitiesAfter(t, a.st, cursor); len(acts) != 0 {
		t.Errorf("invalid requests wrote activities %+v, want none", acts)
	}
}

// TestCreateAgentText: what the character rules leave alone. Prompts keep
// their tabs and line breaks; names may be in any script, right-to-left
// included, with the bidi marks (not overrides) such text may need.
func TestCreateAgentText(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	for _, want := range []store.Agent{
		{Name: "Researcher", SystemPrompt: "Rules:\n\t1. Cite sources.\r\n\t2. Be brief.", Model: "llama3.2:3b-instruct-q4_K_M"},
		{Name: "\u05e2\u05d5\u05d6\u05e8 \u200fv2", SystemPrompt: "\u0623\u062c\u0628 \u0628\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u202e\u2066 (bidi characters are fine in a prompt)", Model: "qwen/qwen2.5-7b"},
		{Name: "Équipe 日本 😀", SystemPrompt: "p", Model: "m"},
	} {
		body, _ := json.Marshal(map[string]string{"name": want.Name, "system_prompt": want.SystemPrompt, "model": want.Model})
		r := a.post("/api/agents", string(body))
		wantStatus(t, "POST /api/agents "+string(body), r, http.StatusCreated)
		got := decodeBody[store.Agent](t, "POST /api/agents", r)
		if got.Name != want.Name || got.SystemPrompt != want.SystemPrompt || got.Model != want.Model {
			t.Errorf("POST /api/agents %s = %+v, want the fields unchanged", body, got)
		}
	}
}

func TestAgentNotFound(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	wantError(t, "GET unknown agent", a.get("/api/agents/nope"), http.StatusNotFound, "not_found", `no agent "nope"; GET /api/agents lists them`)
	wantError(t, "GET empty agent id", a.get("/api/agents/"), http.StatusNotFound, "not_found")
	wantError(t, "GET agent sub-path", a.get("/api/agents/default/chats"), http.StatusNotFound, "not_found", "no such route")
}
