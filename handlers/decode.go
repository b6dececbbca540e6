package handlers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/valyala/fasthttp"
)

// Field limits. The body limit bounds the total; these keep single fields
// sane for the store and the LLM.
const (
	maxNameLen    = 200
	maxIDLen      = 128
	maxModelLen   = 200
	maxPromptLen  = 64 << 10
	maxMessageLen = 256 << 10
)

// chatRequest is the body of POST /api/chat.
type chatRequest struct {
	AgentID    string
	Message    string
	Stream     bool
	Background bool
	// BackgroundSet: the body has "background", which then overrides a
	// Prefer: respond-async header.
	BackgroundSet bool
}

// agentRequest is the body of POST /api/agents.
type agentRequest struct {
	Name         string
	SystemPrompt string
	Model        string
}

// decodeChat parses and validates a chat request body.
func decodeChat(body []byte) (chatRequest, error) {
	var raw struct {
		AgentID    *string `json:"agent_id"`
		Message    *string `json:"message"`
		Stream     *bool   `json:"stream"`
		Background *bool   `json:"background"`
	}
	if err := decodeJSON(body, &raw); err != nil {
		return chatRequest{}, err
	}
	var r chatRequest
	var err error
	if r.AgentID, err = required("agent_id", raw.AgentID, maxIDLen, label); err != nil {
		return chatRequest{}, err
	}
	if r.Message, err = required("message", raw.Message, maxMessageLen, prose); err != nil {
		return chatRequest{}, err
	}
	if raw.Stream != nil {
		r.Stream = *raw.Stream
	}
	if raw.Background != nil {
		r.Background, r.BackgroundSet = *raw.Background, true
	}
	if r.Stream && r.Background {
		return chatRequest{}, badRequest(`"stream" and "background" exclude each other: a background chat streams from GET /api/chats/{id}/events`)
	}
	return r, nil
}

// decodeAgent parses and validates an agent creation body.
func decodeAgent(body []byte) (agentRequest, error) {
	var raw struct {
		Name         *string `json:"name"`
		SystemPrompt *string `json:"system_prompt"`
		Model        *string `json:"model"`
	}
	if err := decodeJSON(body, &raw); err != nil {
		return agentRequest{}, err
	}
	var r agentRequest
	var err error
	if r.Name, err = required("name", raw.Name, maxNameLen, label); err != nil {
		return agentRequest{}, err
	}
	if r.SystemPrompt, err = required("system_prompt", raw.SystemPrompt, maxPromptLen, prose); err != nil {
		return agentRequest{}, err
	}
	if raw.Model != nil {
		if r.Model, err = required("model", raw.Model, maxModelLen, label); err != nil {
			return agentRequest{}, err
		}
	}
	return r, nil
}

// decodeJSON decodes one JSON object into v, naming the field of a type
// mismatch. Unknown fields are ignored, for clients newer than the server.
func decodeJSON(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return badRequest("request body is empty: want a JSON object")
	}
	if !utf8.Valid(body) {
		return badRequest("request body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &te) && te.Field != "":
			return badRequest(fmt.Sprintf("field %q must be %s", te.Field, jsonKind(te.Type.String())))
		case errors.As(err, &te):
			return badRequest("request body must be a JSON object")
		case errors.As(err, &se):
			return badRequest(fmt.Sprintf("invalid JSON at byte %d", se.Offset))
		}
		return badRequest("invalid JSON")
	}
	// Not dec.More: it reports false for a stray "}" or "]", which would
	// accept `{...}}` as valid JSON.
	if len(bytes.TrimLeft(body[dec.InputOffset():], " \t\r\n")) > 0 {
		return badRequest("invalid JSON: more than one value in the body")
	}
	// null decodes into a struct without error, as if it were {}; every
	// other value that is not an object failed above.
	if bytes.TrimLeft(body, " \t\r\n")[0] != '{' {
		return badRequest("request body must be a JSON object")
	}
	return nil
}

func jsonKind(goType string) string {
	switch strings.TrimPrefix(goType, "*") {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	}
	return "of another type"
}

// textKind says which characters a text field may hold.
type textKind int

const (
	// label is a short single-line text (a name, a model, an id) that ends
	// up in the status page, the logs and the feeds: no control character
	// at all, and no bidi override or isolate (U+202A to U+202E, U+2066 to
	// U+2069), which reorder the text displayed after them and can make a
	// name read as another ("Trojan Source", CVE-2021-42574). U+2028 and
	// U+2029 are refused too: they break a line like a newline does.
	label textKind = iota
	// prose is text for the LLM (a system prompt, a message): tab, LF and
	// CR are its own; other control characters, NUL first, are noise that
	// no model needs and some tools choke on.
	prose
)

// required returns *v trimmed, or an error naming field when it is absent,
// null, blank, longer than max bytes or holds a character kind refuses.
func required(field string, v *string, max int, kind textKind) (string, error) {
	if v == nil {
		return "", badRequest(fmt.Sprintf("field %q is required", field))
	}
	s := strings.TrimSpace(*v)
	if s == "" {
		return "", badRequest(fmt.Sprintf("field %q must not be empty", field))
	}
	if len(s) > max {
		return "", badRequest(fmt.Sprintf("field %q is longer than %d bytes", field, max))
	}
	for _, r := range s {
		switch {
		case kind == prose && (r == '\t' || r == '\n' || r == '\r'):
		case unicode.IsControl(r):
			return "", badRequest(fmt.Sprintf("field %q must not contain control characters (found %U)", field, r))
		case kind == label && (r >= '\u202A' && r <= '\u202E' || r >= '\u2066' && r <= '\u2069'):
			return "", badRequest(fmt.Sprintf("field %q must not contain bidi override or isolate characters (found %U)", field, r))
		case kind == label && (r == '\u2028' || r == '\u2029'):
			return "", badRequest(fmt.Sprintf("field %q must not contain line breaks (found %U)", field, r))
		}
	}
	return s, nil
}

// requireJSON reports whether the request says its body is plain JSON,
// and answers 415 when it does not.
func requireJSON(ctx *fasthttp.RequestCtx) bool {
	ct := string(ctx.Request.Header.ContentType())
	mt, _, _ := strings.Cut(ct, ";")
	if !strings.EqualFold(strings.TrimSpace(mt), "application/json") {
		fail(ctx, &requestError{fasthttp.StatusUnsupportedMediaType, fmt.Sprintf("content type %q: want application/json", ct)})
		return false
	}
	// Bodies are at most a few hundred KiB of text: compression would save
	// little and cost a decompression-bomb guard. A compressed body must be
	// refused, not read as if plain (RFC 9110 15.5.16, RFC 7694).
	for _, v := range ctx.Request.Header.PeekAll("Content-Encoding") {
		for _, enc := range strings.Split(string(v), ",") {
			if enc = strings.TrimSpace(enc); enc != "" && !strings.EqualFold(enc, "identity") {
				ctx.Response.Header.Set("Accept-Encoding", "identity")
				fail(ctx, &requestError{fasthttp.StatusUnsupportedMediaType, fmt.Sprintf("header Content-Encoding %q: want identity (an uncompressed body)", v)})
				return false
			}
		}
	}
	return true
}
