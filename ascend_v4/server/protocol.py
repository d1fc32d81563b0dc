"""Request and response models of the HTTP API (pydantic): OpenAI chat / completions / models, Anthropic
messages / count_tokens, the tokenizer endpoints, and both error shapes.

Requests ignore fields they do not know (clients send many: `store`, `metadata`, `service_tier`, ...).
Numeric ranges are enforced here, so a bad value is a 400 naming the field before anything is rendered.
Responses are built from these models and dumped to JSON by the routes (no response_model round trip).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ascend_v4.tokenizer import first_unencodable

# DeepSeek's documented output cap for V4 (serving-notes §1.1); the context length bounds it further.
MAX_OUTPUT_TOKENS = 393_216
MAX_N = 8  # choices per request (each one is a separate engine request)
MAX_STOP = 16
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch generators take 64-bit seeds; negatives wrap

EffortName = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def _unicode_text(value: str) -> str:
    if first_unencodable(value) is not None:
        raise ValueError("must be valid Unicode text (it holds a lone UTF-16 surrogate)")
    return value


# A requested model name: echoed in responses, so it must be encodable (other text fields are checked where the
# tokenizer takes them: a 400 naming the field, see errors.unencodable_text_handler).
ModelName = Annotated[str, AfterValidator(_unicode_text)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ============================================================================================ OpenAI requests
class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    """One message. `developer` is treated as `system` (see docs/serving.md); `reasoning` is vLLM's name for
    `reasoning_content`. Content is a string or a list of `{"type": "text", "text": ...}` parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str = Field(min_length=1)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension: usage on every chunk


class ThinkingParam(_Request):
    """DeepSeek's switch (also accepted on /v1/messages). `adaptive` / `between_tools` count as enabled."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None  # Anthropic's; accepted and ignored (no thinking budget in V4)


class SamplingFields(_Request):
    """Sampling fields shared by chat and completions, with vLLM's extensions (top_k, min_p, ...)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=MAX_OUTPUT_TOKENS)
    ignore_eos: bool = False  # keep generating past EOS: fixed output lengths for benchmarks
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    # vLLM's detokenization switches. skip_special_tokens: leave tokens the tokenizer flags special out of the
    # text (V4: BOS / EOS / pad and `<｜place▁holder▁no▁N｜>`; `</think>`, `｜DSML｜` and role tokens are not
    # flagged and always reach the parser). spaces_between_special_tokens: accepted; V4's byte-level decoder
    # never puts spaces between tokens, so both values give the same text (as in vLLM's fast-tokenizer path).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # vLLM: log-probs of every prompt token (with this many alternatives), computed during prefill
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatCompletionRequest(SamplingFields):
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # DeepSeek thinking controls (serving-notes §1.2, §2)
    thinking: ThinkingParam | None = None
    reasoning_effort: EffortName | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    model: ModelName
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0: score the prompt only (with echo + logprobs: evaluation harnesses' log-likelihood requests)
    max_tokens: int | None = Field(16, ge=0, le=MAX_OUTPUT_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


# ============================================================================================ OpenAI responses
class PromptLogprob(_Out):
    """vLLM's per-token entry of `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # one per prompt token; the first is None


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0


class Usage(_Out):
    """OpenAI usage plus DeepSeek's cache split (prompt_cache_hit_tokens + prompt_cache_miss_tokens =
    prompt_tokens) and reasoning count (serving-notes §1.4)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[LogprobEntry] = Field(default_factory=list)


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM extension: the stop string / token that ended it


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension (request field prompt_logprobs)


class DeltaFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ascend-v4"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIError(_Out):
    error: OpenAIErrorBody


# ============================================================================================ Anthropic
class AnthropicTool(_Request):
    """A client tool (`input_schema`). Server tools (`type` such as `web_search_...`) are skipped."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class AnthropicToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class OutputConfig(_Request):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class AnthropicCountTokensRequest(_Request):
    model: ModelName
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfig | None = None


class AnthropicMessagesRequest(AnthropicCountTokensRequest):
    max_tokens: int = Field(ge=1, le=MAX_OUTPUT_TOKENS)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    metadata: dict[str, Any] | None = None


class AnthropicUsage(_Out):
    """`input_tokens` excludes cache reads, as in Anthropic's API: prompt = input + cache_read."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class AnthropicResponse(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicCountTokensResponse(_Out):
    input_tokens: int


class AnthropicErrorBody(_Out):
    type: str
    message: str


class AnthropicError(_Out):
    type: Literal["error"] = "error"
    error: AnthropicErrorBody


# ============================================================================================ tokenizer
class TokenizeRequest(_Request):
    """Either `prompt` (raw text; BOS prepended when add_special_tokens) or `messages` (rendered exactly as
    /v1/chat/completions would render them, with the same thinking fields)."""

    model: ModelName | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    tools: list[ChatTool] | None = None
    thinking: ThinkingParam | None = None
    reasoning_effort: EffortName | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: ModelName | None = None
    tokens: list[int] = Field(max_length=1_048_576)


class DetokenizeResponse(_Out):
    prompt: str
