package prefork

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// env returns a lookup over name, value pairs.
func env(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// greeter is an application with one setting of its own and a check
// across settings, as a user of the library writes one.
func greeter(greeting *string) App {
	return App{
		Name: "greeter",
		Options: []Option{{Group: "Greeting", Flag: "greeting", Arg: "TEXT", Env: []string{"GREETING"}, Default: "hello",
			Help: "what GET / answers",
			Set: func(s Setting) error {
				if s.Text() == "" {
					return s.Invalid("some text")
				}
				*greeting = s.Text()
				return nil
			}}},
		Check: func(c Config) error {
			if *greeting == "bye" && c.Workers > 1 {
				return errors.New("bye needs one worker")
			}
			return nil
		},
	}
}

func TestAppOptions(t *testing.T) {
	for _, tt := range []struct {
		args, env []string
		want      string
		wantErr   string
	}{
		{nil, nil, "hello", ""},
		{nil, []string{"GREETING", "hey"}, "hey", ""},
		{[]string{"--greeting", "yo"}, []string{"GREETING", "hey"}, "yo", ""},
		{[]string{"--greeting="}, nil, "", `invalid --greeting "": want some text`},
		{[]string{"--greeting", "bye"}, []string{"WORKERS", "2"}, "", "bye needs one worker"},
		{[]string{"--greeting", "bye"}, []string{"WORKERS", "1"}, "bye", ""},
	} {
		greeting := "hello"
		c, err := greeter(&greeting).Load(tt.args, env(tt.env...))
		switch {
		case tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr):
			t.Errorf("Load(%q, %q) error = %v, want %q", tt.args, tt.env, err, tt.wantErr)
		case tt.wantErr == "" && err != nil:
			t.Errorf("Load(%q, %q) error = %v", tt.args, tt.env, err)
		case tt.wantErr == "" && greeting != tt.want:
			t.Errorf("Load(%q, %q) greeting = %q, want %q", tt.args, tt.env, greeting, tt.want)
		case tt.wantErr == "" && c.Port != 8000:
			t.Errorf("Load(%q, %q) Port = %d, want the default 8000", tt.args, tt.env, c.Port)
		}
	}

	// --version reads nothing else, the application's settings included.
	greeting := "unset"
	c, err := greeter(&greeting).Load([]string{"--version"}, env("GREETING", "hey", "WORKERS", "junk"))
	if err != nil || !c.ShowVersion || greeting != "unset" {
		t.Errorf("Load(--version) = ShowVersion %v, greeting %q, %v; want true, unset, nil", c.ShowVersion, greeting, err)
	}
	if _, err := greeter(&greeting).Load([]string{"stray"}, env()); !IsUsageError(err) {
		t.Errorf("Load(stray) error = %v, want a usage error", err)
	}

	// An option that cannot work is an error naming it, not a panic.
	set := func(Setting) error { return nil }
	for _, tt := range []struct {
		opt  Option
		want string
	}{
		{Option{Flag: "color", Env: []string{"COLOR"}}, "option color has no Set"},
		{Option{Flag: "port", Env: []string{"MY_PORT"}, Set: set}, "option port: --port is already a flag of the program"},
		{Option{Flag: "help", Set: set}, "option help: --help is already a flag of the program"},
		{Option{Set: set}, "an option has neither a flag nor a variable"},
	} {
		app := App{Name: "t", Options: []Option{tt.opt}}
		if _, err := app.Load(nil, env()); err == nil || err.Error() != tt.want {
			t.Errorf("Load with option %+v: %v, want %q", tt.opt, err, tt.want)
		}
	}
}

func TestAppWithoutHandler(t *testing.T) {
	var stderr bytes.Buffer
	if code := (App{Name: "t"}).run(io.Discard, &stderr); code != ExitBoot || !strings.Contains(stderr.String(), "no Handler, FastHandler or Worker") {
		t.Errorf("run of an App without a handler = %d, %q; want ExitBoot and the reason", code, stderr.String())
	}
}

func TestAppUsage(t *testing.T) {
	var buf bytes.Buffer
	greeting := ""
	greeter(&greeting).Usage(&buf)
	help := buf.String()
	for _, want := range []string{"Usage: greeter [flags]", "Process model:", "Greeting:", "--greeting TEXT", "GREETING", "--workers N", "WORKERS, WEB_CONCURRENCY", "`greeter status`"} {
		if !strings.Contains(help, want) {
			t.Errorf("usage lacks %q:\n%s", want, help)
		}
	}
	// The application's group comes after the process model's (Reload is
	// the last of them) and before Operations.
	r, g, o := strings.Index(help, "Reload (development):"), strings.Index(help, "Greeting:"), strings.Index(help, "Operations:")
	if r < 0 || g < 0 || o < 0 || !(r < g && g < o) {
		t.Errorf("usage lists Reload at %d, Greeting at %d, Operations at %d; want them in that order", r, g, o)
	}
}

func TestConfigToLibraries(t *testing.T) {
	c := DefaultConfig()
	c.Reload, c.Workers, c.GracefulTimeout, c.ProxyHeaders = true, 8, 0, false
	sc := c.SupervisorConfig()
	if sc.Workers != 1 || sc.Reload == nil || sc.GracefulTimeout != time.Nanosecond {
		t.Errorf("SupervisorConfig() = Workers %d, Reload %v, GracefulTimeout %v; want 1 (reload runs one), set, 1ns (cut at once)", sc.Workers, sc.Reload, sc.GracefulTimeout)
	}
	wc := c.WorkerConfig()
	if wc.Proxies != nil || wc.MaxBodySize != 1<<20 || wc.DisableKeepAlive {
		t.Errorf("WorkerConfig() = Proxies %v, MaxBodySize %d, DisableKeepAlive %v; want nil, 1 MiB, false", wc.Proxies, wc.MaxBodySize, wc.DisableKeepAlive)
	}
}
