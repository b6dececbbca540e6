package llm

// Provider names reported in Response.Provider.
const (
	ProviderSimulated = "simulated"
	ProviderOpenAI    = "openai"
)

// Message is one chat message. It marshals as an OpenAI chat message.
type Message struct {
	// Role is "system", "user" or "assistant"; it is passed through as given.
	Role string `json:"role"`
	// Content is the message text.
	Content string `json:"content"`
}

// Request is one chat completion request.
type Request struct {
	// Model names the upstream model; "" means the provider's configured model.
	Model string
	// Messages are sent in order; an agent's system prompt is a "system" message.
	Messages []Message
	// RequestID, if set, is sent upstream as X-Request-ID, so that one id
	// follows a chat from the client to the LLM.
	RequestID string
	// NoRetry makes a provider try once: a caller that retries on its own,
	// with its own backoff (a background chat's job), gets every failure
	// at once instead of after the provider's retries.
	NoRetry bool
}

// Usage counts tokens as upstream reported them (zero if it did not) or, for
// the simulated provider, as whitespace-separated words.
type Usage struct {
	PromptTokens     int
	CompletionTokens int
}

// Response is the result of one completed chat completion.
type Response struct {
	// Text is the whole reply: the concatenation of every delta.
	Text string
	// Provider is ProviderSimulated or ProviderOpenAI.
	Provider string
	// Model is the model upstream reported, or the requested one if it did not.
	Model string
	// Usage is the token count of the call.
	Usage Usage
}
