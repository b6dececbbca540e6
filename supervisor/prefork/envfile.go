package prefork

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
)

// ReadEnvFile reads an env file, as uvicorn's --env-file, docker's
// --env-file and systemd's EnvironmentFile take them: one NAME=VALUE per
// line, blank lines and lines starting with # ignored, an optional
// "export " before the name. A value may be in double quotes (with \n, \t,
// \", \\ and \$ escapes), in single quotes (taken as written), or bare
// (trimmed, and cut at " #", a comment). Nothing is expanded.
//
// The error names the file and the line, never the value, which may be a
// secret.
func ReadEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("env file: %w", err)
	}
	defer f.Close()
	vars := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, value, err := parseEnvLine(line)
		if err != nil {
			return nil, fmt.Errorf("env file %s line %d: %w", path, n, err)
		}
		vars[name] = value
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("env file %s: %w", path, err)
	}
	return vars, nil
}

var errEnvLine = errors.New("want NAME=VALUE, NAME of letters, digits and _ not starting with a digit")

func parseEnvLine(line string) (name, value string, err error) {
	line = strings.TrimPrefix(line, "export ")
	name, raw, ok := strings.Cut(line, "=")
	name = strings.TrimSpace(name)
	if !ok || !isEnvName(name) {
		return "", "", errEnvLine
	}
	raw = strings.TrimSpace(raw)
	switch {
	case strings.HasPrefix(raw, `"`):
		var b strings.Builder
		for i := 1; i < len(raw); i++ {
			c := raw[i]
			switch {
			case c == '"':
				if !isComment(raw[i+1:]) {
					return "", "", fmt.Errorf("%s: text after the closing quote", name)
				}
				return name, b.String(), nil
			case c == '\\' && i+1 < len(raw):
				i++
				switch raw[i] {
				case 'n':
					b.WriteByte('\n')
				case 't':
					b.WriteByte('\t')
				case '"', '\\', '$':
					b.WriteByte(raw[i])
				default:
					b.WriteByte('\\')
					b.WriteByte(raw[i])
				}
			default:
				b.WriteByte(c)
			}
		}
		return "", "", fmt.Errorf("%s: a double-quoted value must end with \" on the same line", name)
	case strings.HasPrefix(raw, "'"):
		end := strings.IndexByte(raw[1:], '\'')
		if end < 0 || !isComment(raw[end+2:]) {
			return "", "", fmt.Errorf("%s: a single-quoted value must end with ' on the same line", name)
		}
		return name, raw[1 : end+1], nil
	}
	if i := strings.Index(raw, " #"); i >= 0 {
		raw = strings.TrimSpace(raw[:i])
	}
	return name, raw, nil
}

// isComment reports whether rest, what follows a closing quote, is
// nothing or a comment.
func isComment(rest string) bool {
	rest = strings.TrimSpace(rest)
	return rest == "" || rest[0] == '#'
}

func isEnvName(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// envFileArg returns the env file args or lookupEnv name: the last
// --env-file flag, else ENV_FILE. The file is read before the other
// settings, whose values it may hold, so it is found here ahead of Load.
func envFileArg(args []string, lookupEnv func(string) (string, bool)) string {
	path, found := "", false
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--":
			i = len(args)
		case a == "--env-file" && i+1 < len(args):
			path, found = args[i+1], true
			i++
		case strings.HasPrefix(a, "--env-file="):
			path, found = strings.TrimPrefix(a, "--env-file="), true
		}
	}
	if !found {
		path, _ = lookupEnv("ENV_FILE")
	}
	return strings.TrimSpace(path)
}

// withEnvFile returns a lookup that takes a variable from the process
// environment and, when the process does not set it, from vars: the
// process environment wins over the file, as with uvicorn.
func withEnvFile(lookupEnv func(string) (string, bool), vars map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		if v, ok := lookupEnv(name); ok {
			return v, ok
		}
		v, ok := vars[name]
		return v, ok
	}
}

// blameEnvFile adds to err, a bad setting, the env file at path when the
// variable it names came from the file (vars) rather than the process.
func blameEnvFile(err error, vars map[string]string, path string) error {
	msg := err.Error()
	for name := range vars {
		if _, set := os.LookupEnv(name); !set && strings.Contains(msg, " "+name+" ") {
			return fmt.Errorf("%w (set in the env file %s)", err, path)
		}
	}
	return err
}
