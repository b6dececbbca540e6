package handlers

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// modelSpy is an LLM that records the model of every request.
type modelSpy struct {
	mu     sync.Mutex
	models []string
}

func (m *modelSpy) Complete(_ context.Context, req llm.Request, _ func(string) error) (llm.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.models = append(m.models, req.Model)
	return llm.Response{Text: "ok", Provider: "spy", Model: req.Model}, nil
}

// TestModelOffTheListNeverSent: a background chat of an agent whose model
// is not on Config.Models (it was when the chat was queued, or the agent
// predates the list) fails with model_not_allowed when it runs, and the
// LLM never sees the model; a chat of an agent on the list runs.
func TestModelOffTheListNeverSent(t *testing.T) {
	spy := &modelSpy{}
	a := newAPI(t, Config{LLM: spy, Models: []string{"fast"}})
	ctx := t.Context()
	run := func(model string) store.ChatRow {
		t.Helper()
		agent, err := a.st.CreateAgent(ctx, store.Agent{Name: "n", SystemPrompt: "p", Model: model}, store.Origin{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.st.StartChat(ctx, store.Chat{ID: "chat-" + model, AgentID: agent.ID, Message: "hi", Background: true}); err != nil {
			t.Fatal(err)
		}
		if err := a.h.RunChat(ctx, "chat-"+model, ""); err != nil {
			t.Fatalf("RunChat(%s) = %v", model, err)
		}
		c, err := a.st.ChatByID(ctx, "chat-"+model)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := run("deep"); c.Status != store.ChatFailed || !strings.Contains(c.Detail, `"reason":"model_not_allowed"`) || !strings.Contains(c.Detail, "allowed: fast") {
		t.Errorf("chat of an agent naming deep: status %s, detail %s; want failed, model_not_allowed naming fast", c.Status, c.Detail)
	}
	if c := run("fast"); c.Status != store.ChatCompleted {
		t.Errorf("chat of an agent naming fast: status %s (%s), want completed", c.Status, c.Detail)
	}
	spy.mu.Lock()
	defer spy.mu.Unlock()
	if len(spy.models) != 1 || spy.models[0] != "fast" {
		t.Errorf("models sent to the LLM: %q, want only fast", spy.models)
	}
}
