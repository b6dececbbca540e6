package main

import (
	"strings"
	"testing"
)

// secretVars are the variables whose values must never be shown.
var secretVars = map[string]bool{"LLM_API_KEY": true, "OPENAI_API_KEY": true, "LLM_HEADERS": true, "SSL_KEYFILE_PASSWORD": true, "API_TOKEN": true, "METRICS_TOKEN": true}

// secretMark starts every secret the fuzzer sets, so that a message that
// quotes even the start of one is caught.
const secretMark = "ZQX"

// FuzzLoadConfig feeds loadConfig arbitrary arguments and environment
// values. args is NUL-separated arguments; env is NUL-separated values given,
// in turn, to every variable the server reads (secrets excepted); secret
// is the tail of the three secrets. Invariants: no panic; an error is one
// line; no secret appears in an error or in the configuration's string form.
func FuzzLoadConfig(f *testing.F) {
	f.Add("", "", "")
	f.Add("--workers\x002\x00--port=0", "4\x00\x00 8000 ", "key")
	f.Add("--reload=false\x00--limit-request-body=1.5MiB", "abc\x00-1\x001e3\x00yes", "sk-abc")
	f.Add("--llm-base-url=http://u:pw@host/v1", "postgres://user:hunter2@db/x?password=p", "tok,en")
	f.Add("--timeout-keep-alive\x00bogus", "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00x", "a b")
	f.Add("--llm-provider=openai", "", "\n")
	f.Add("--no-access-log\x00--access-log=on\x00--cors-origins=https://a.example,*", "", ",,")
	f.Add("stray", "", "")
	var names []string
	for _, o := range allOptions() {
		for _, e := range o.Env {
			if !secretVars[e] {
				names = append(names, e)
			}
		}
	}
	f.Fuzz(func(t *testing.T, args, env, secret string) {
		var argv []string
		if args != "" {
			argv = strings.Split(args, "\x00")
		}
		vals := map[string]string{}
		if env != "" {
			for i, v := range strings.Split(env, "\x00") {
				if i >= len(names) {
					break
				}
				vals[names[i]] = v
			}
		}
		secrets := map[string]string{
			"LLM_API_KEY":   secretMark + "k" + secret,
			"API_TOKEN":     secretMark + "t" + secret,
			"METRICS_TOKEN": secretMark + "m" + secret,
			"LLM_HEADERS":   "api-key: " + secretMark + "h" + secret,
			// Refused without a certificate, with the value not shown.
			"SSL_KEYFILE_PASSWORD": secretMark + "p" + secret,
		}
		for k, v := range secrets {
			vals[k] = v
		}
		// A secret may only be quoted back if the same text came from a
		// place that is not secret.
		public := strings.Join(argv, " ") + " " + env
		checkSecrets := !strings.Contains(public, secretMark)
		lookup := func(name string) (string, bool) {
			v, ok := vals[name]
			return v, ok
		}
		c, err := loadConfig(argv, lookup)
		if err != nil {
			msg := err.Error()
			if strings.ContainsAny(msg, "\n\r") {
				t.Errorf("loadConfig(%q) error is not one line: %q", argv, msg)
			}
			if checkSecrets && strings.Contains(msg, secretMark) {
				t.Errorf("loadConfig(%q) error shows a secret: %q", argv, msg)
			}
			return
		}
		for _, s := range []string{c.String(), c.GoString()} {
			if checkSecrets && strings.Contains(s, secretMark) {
				t.Errorf("config string shows a secret: %s", s)
			}
		}
	})
}
