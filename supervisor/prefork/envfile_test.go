package prefork

import (
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

func writeEnvFile(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), ".env")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadEnvFile(t *testing.T) {
	p := writeEnvFile(t, `# settings
WORKERS=2

export LOG_LEVEL=debug
  PORT = 9000  
BARE=a b # a comment
HASH=a#b
DQ="two\nlines \"quoted\" \$HOME" # comment
SQ='as \n written'
EMPTY=
EQ=a=b
`)
	got, err := ReadEnvFile(p)
	if err != nil {
		t.Fatalf("ReadEnvFile: %v", err)
	}
	want := map[string]string{"WORKERS": "2", "LOG_LEVEL": "debug", "PORT": "9000", "BARE": "a b", "HASH": "a#b",
		"DQ": "two\nlines \"quoted\" $HOME", "SQ": `as \n written`, "EMPTY": "", "EQ": "a=b"}
	if !maps.Equal(got, want) {
		t.Errorf("ReadEnvFile =\n%q\nwant\n%q", got, want)
	}
}

func TestReadEnvFileErrors(t *testing.T) {
	for _, tc := range []struct{ text, want string }{
		{"A=1\nnot a setting\n", "line 2: want NAME=VALUE"},
		{"1A=x\n", "line 1: want NAME=VALUE"},
		{"MY-VAR=x\n", "line 1: want NAME=VALUE"},
		{"\n\nKEY=\"secret-value\n", `line 3: KEY: a double-quoted value must end with " on the same line`},
		{"KEY='secret-value\n", "line 1: KEY: a single-quoted value must end with ' on the same line"},
		{"KEY=\"secret-value\" trailing\n", "line 1: KEY: text after the closing quote"},
	} {
		p := writeEnvFile(t, tc.text)
		_, err := ReadEnvFile(p)
		if err == nil || !strings.Contains(err.Error(), p+" "+tc.want) {
			t.Errorf("ReadEnvFile(%q) error = %v, want one naming the file and %q", tc.text, err, tc.want)
		} else if strings.Contains(err.Error(), "secret-value") {
			t.Errorf("ReadEnvFile(%q) error = %v shows the value", tc.text, err)
		}
	}
	if _, err := ReadEnvFile(filepath.Join(t.TempDir(), "missing.env")); err == nil || !strings.Contains(err.Error(), "missing.env") {
		t.Errorf("ReadEnvFile(missing) error = %v, want one naming the file", err)
	}
}

func TestEnvFileArg(t *testing.T) {
	env := func(v string) func(string) (string, bool) {
		return func(k string) (string, bool) { return v, k == "ENV_FILE" && v != "" }
	}
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{nil, "", ""},
		{nil, "/etc/x.env", "/etc/x.env"},
		{[]string{"--env-file", "a.env"}, "/etc/x.env", "a.env"},
		{[]string{"--env-file=a.env", "--workers", "2", "--env-file", "b.env"}, "", "b.env"},
		{[]string{"--", "--env-file", "a.env"}, "", ""},
	} {
		if got := envFileArg(tc.args, env(tc.env)); got != tc.want {
			t.Errorf("envFileArg(%q, ENV_FILE=%q) = %q, want %q", tc.args, tc.env, got, tc.want)
		}
	}
}

// TestBadValueInEnvFileNamesTheFile: a bad value that came from the env
// file is reported with the file; one from the process environment is not.
func TestBadValueInEnvFileNamesTheFile(t *testing.T) {
	path := writeEnvFile(t, "WORKERS=abc\n")
	t.Setenv("ENV_FILE", path)
	app := App{Name: "t", FastHandler: func(*fasthttp.RequestCtx) {}}
	var stderr strings.Builder
	if code := app.run(io.Discard, &stderr); code != ExitUsage || !strings.Contains(stderr.String(), `invalid WORKERS "abc"`) || !strings.Contains(stderr.String(), "set in the env file "+path) {
		t.Errorf("run with WORKERS=abc in the env file = %d, %q; want ExitUsage naming the value and the file", code, stderr.String())
	}
	t.Setenv("WORKERS", "xyz") // the process environment wins over the file
	stderr.Reset()
	if code := app.run(io.Discard, &stderr); code != ExitUsage || !strings.Contains(stderr.String(), `invalid WORKERS "xyz"`) || strings.Contains(stderr.String(), "env file") {
		t.Errorf("run with WORKERS=xyz in the environment = %d, %q; want ExitUsage, not blaming the file", code, stderr.String())
	}
}
