// Package handlers is the HTTP API of a worker: routing, request decoding
// and validation, and the one place where errors become HTTP statuses.
//
// Handlers keep no state a client can observe between requests: workers are
// separate processes, so everything shared lives in the store.
package handlers
