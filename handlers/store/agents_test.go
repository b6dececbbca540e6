package store

import (
	"errors"
	"path/filepath"
	"sync"
	"testing"
)

// TestAgentLimitAndPages runs on both engines: four handles (as good as
// four processes) with MaxAgents 20 create 60 agents at once and exactly
// 20 exist after, the default agent included; then pages of 3 with the
// returned cursors list each agent once, in creation order.
func TestAgentLimitAndPages(t *testing.T) {
	for _, engine := range []string{"sqlite", "postgres"} {
		t.Run(engine, func(t *testing.T) {
			url := "sqlite:" + filepath.Join(t.TempDir(), "server.db")
			if engine == "postgres" {
				url = newPostgresDB(t).url
			}
			var handles []*Store
			for range 4 {
				s, err := Open(t.Context(), url, Options{MaxAgents: 20})
				if err != nil {
					t.Fatalf("Open() = %v", err)
				}
				t.Cleanup(func() { s.Close() })
				handles = append(handles, s)
			}
			if err := handles[0].Migrate(t.Context()); err != nil {
				t.Fatalf("Migrate() = %v", err)
			}
			var mu sync.Mutex
			created, refused := 0, 0
			var wg sync.WaitGroup
			for i := range 60 {
				wg.Go(func() {
					_, err := handles[i%4].CreateAgent(t.Context(), Agent{Name: "a", SystemPrompt: "p"}, Origin{})
					var le *AgentLimitError
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						created++
					case errors.As(err, &le) && le.Max == 20 && errors.Is(err, ErrAgentLimit):
						refused++
					default:
						t.Errorf("CreateAgent() = %v, want nil or an AgentLimitError", err)
					}
				})
			}
			wg.Wait()
			if created != 19 || refused != 41 {
				t.Fatalf("created %d, refused %d; want 19 and 41", created, refused)
			}
			all, next, err := handles[1].Agents(t.Context(), AgentPage{Limit: MaxAgentLimit})
			if err != nil || len(all) != 20 || next != "" {
				t.Fatalf("Agents(all) = %d agents, next %q, %v; want 20 and no next", len(all), next, err)
			}
			var paged []string
			after := ""
			for range 10 {
				page, next, err := handles[2].Agents(t.Context(), AgentPage{After: after, Limit: 3})
				if err != nil {
					t.Fatalf("Agents(after %q) = %v", after, err)
				}
				paged = append(paged, agentIDs(page)...)
				if next == "" {
					break
				}
				after = next
			}
			if got, want := paged, agentIDs(all); len(got) != len(want) {
				t.Fatalf("paged %v, want %v", got, want)
			} else {
				for i := range want {
					if got[i] != want[i] {
						t.Fatalf("paged %v, want %v", got, want)
					}
				}
			}
			if _, _, err := handles[3].Agents(t.Context(), AgentPage{After: "not-a-cursor"}); !errors.Is(err, ErrBadCursor) {
				t.Errorf("Agents(bad cursor) = %v, want ErrBadCursor", err)
			}
		})
	}
}
