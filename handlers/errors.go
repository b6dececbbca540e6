package handlers

import (
	"encoding/json"
	"errors"

	"github.com/valyala/fasthttp"
)

var (
	errNotFound = errors.New("no such route")
	errMethod   = errors.New("method not allowed")
)

// codes names the error code of the JSON body for each status.
var codes = map[int]string{
	fasthttp.StatusBadRequest:            "bad_request",
	fasthttp.StatusUnauthorized:          "unauthorized",
	fasthttp.StatusNotFound:              "not_found",
	fasthttp.StatusMethodNotAllowed:      "method_not_allowed",
	fasthttp.StatusRequestTimeout:        "request_timeout",
	fasthttp.StatusRequestEntityTooLarge: "body_too_large",
	fasthttp.StatusUnsupportedMediaType:  "unsupported_media_type",
	fasthttp.StatusInternalServerError:   "internal",
	fasthttp.StatusBadGateway:            "upstream_error",
	fasthttp.StatusServiceUnavailable:    "unavailable",
	fasthttp.StatusGatewayTimeout:        "upstream_timeout",
}

type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// WriteError answers with status and the one JSON error shape of the API,
// {"error":{"code":"...","message":"..."}}. It is also the worker's hook for
// the errors it answers itself (panics, overload, unreadable requests), so
// every error a client sees has that shape.
func WriteError(ctx *fasthttp.RequestCtx, status int, err error) {
	var body errorBody
	body.Error.Code = codes[status]
	if body.Error.Code == "" {
		body.Error.Code = "error"
	}
	body.Error.Message = publicMessage(status, err)
	b, _ := json.Marshal(body)
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}

// publicMessage is what a client may read about err: server-side failures
// are not described, so no internal detail or upstream body leaks.
func publicMessage(status int, err error) string {
	switch {
	case status == fasthttp.StatusInternalServerError:
		return "internal server error"
	case status == fasthttp.StatusRequestEntityTooLarge:
		return "request body too large"
	case status == fasthttp.StatusRequestTimeout:
		return "request not received in time"
	case status == fasthttp.StatusServiceUnavailable && err != nil:
		return err.Error()
	case err == nil:
		return fasthttp.StatusMessage(status)
	}
	return err.Error()
}
