package handlers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
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
	AgentID string
	Message string
	Stream  bool
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
		AgentID *string `json:"agent_id"`
		Message *string `json:"message"`
		Stream  *bool   `json:"stream"`
	}
	if err := decodeJSON(body, &raw); err != nil {
		return chatRequest{}, err
	}
	var r chatRequest
	var err error
	if r.AgentID, err = required("agent_id", raw.AgentID, maxIDLen); err != nil {
		return chatRequest{}, err
	}
	if r.Message, err = required("message", raw.Message, maxMessageLen); err != nil {
		return chatRequest{}, err
	}
	if raw.Stream != nil {
		r.Stream = *raw.Stream
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
	if r.Name, err = required("name", raw.Name, maxNameLen); err != nil {
		return agentRequest{}, err
	}
	if r.SystemPrompt, err = required("system_prompt", raw.SystemPrompt, maxPromptLen); err != nil {
		return agentRequest{}, err
	}
	if raw.Model != nil {
		if r.Model, err = required("model", raw.Model, maxModelLen); err != nil {
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

// required returns *v trimmed, or an error naming field when it is absent,
// null, blank or longer than max bytes.
func required(field string, v *string, max int) (string, error) {
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
	return s, nil
}

// requireJSON reports whether the request says its body is JSON, and
// answers 415 when it does not.
func requireJSON(ctx *fasthttp.RequestCtx) bool {
	ct := string(ctx.Request.Header.ContentType())
	mt, _, _ := strings.Cut(ct, ";")
	if strings.EqualFold(strings.TrimSpace(mt), "application/json") {
		return true
	}
	fail(ctx, &requestError{fasthttp.StatusUnsupportedMediaType, fmt.Sprintf("content type %q: want application/json", ct)})
	return false
}
