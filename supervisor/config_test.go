package supervisor

import (
	"reflect"
	"testing"
)

// TestNewLeavesConfigAlone checks that New applies its defaults to its own
// copy: the caller's slices and ReloadConfig are as they were.
func TestNewLeavesConfigAlone(t *testing.T) {
	rc := &ReloadConfig{Dirs: []string{".", "testdata/../"}, Include: []string{"*.tmpl"}, Exclude: []string{"gen"}}
	cfg := Config{Addr: "127.0.0.1:0", Workers: 1, Args: []string{"--port", "0"}, Env: []string{"A=1"}, Reload: rc}
	want := cfg
	wantReload := *rc
	wantReload.Dirs = append([]string(nil), rc.Dirs...)
	wantReload.Include = append([]string(nil), rc.Include...)
	wantReload.Exclude = append([]string(nil), rc.Exclude...)

	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer s.closeSockets()
	if !reflect.DeepEqual(*rc, wantReload) {
		t.Errorf("New changed the caller's ReloadConfig to %+v, want %+v", *rc, wantReload)
	}
	if cfg.Reload != want.Reload || !reflect.DeepEqual(cfg.Args, want.Args) || !reflect.DeepEqual(cfg.Env, want.Env) {
		t.Errorf("New changed the caller's Config")
	}
	if got := s.reload.cfg.Dirs; len(got) != 2 || got[0] == "." {
		t.Errorf("the supervisor's own reload folders = %q, want two absolute paths", got)
	}
}
