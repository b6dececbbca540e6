package prefork

import (
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
