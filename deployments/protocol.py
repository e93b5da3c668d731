"""Pydantic models of the OpenAI-compatible API: request bodies (validated, and what
/openapi.json describes) and the documented shapes of responses and errors.

Requests ignore fields they do not know (clients written for OpenAI or vLLM send
many harmless extras); every field they do know is validated, so a bad value is
a 400 that names the parameter rather than something silently dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from engine.sampler import MAX_LOGIT_BIAS, Seed

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # as the SDK's ReasoningEffort
EFFORT_HELP = ("gpt-oss reasons at low, medium or high: none is low with no reasoning (max_reasoning_tokens 0, "
               "grammar-enforced), minimal is low, xhigh and max are high")


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ------------------------------------------------------------------ shared pieces


class TextPart(_Req):
    """A text content part. Images, audio and files are not supported by gpt-oss."""
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class JsonSchemaFormat(_Req):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[JsonSchemaFormat] = None


class StreamOptions(_Req):
    include_usage: bool = False


def _metadata_limits(v: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
    # OpenAI's bounds on `metadata`, so what it accepts is what this server accepts
    if v is not None:
        if len(v) > 16:
            raise ValueError("holds at most 16 key-value pairs")
        for k, val in v.items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError(f"key '{k[:64]}': keys hold at most 64 characters and values 512")
    return v


Metadata = Annotated[dict[str, str], AfterValidator(_metadata_limits)]


ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast"]
TIER_HELP = ("priority: scheduled before default and flex work, taking a running lower tier's place when the batch "
             "or KV cache is full; fast: priority (OpenAI's fast mode); flex: after the others, first to give way; "
             "auto, default and scale: default. The response names the tier it ran on")


CACHE_KEY_HELP = ("requests with the same key and prompt prefix go to the same replica group (whose prefix "
                  "cache holds it); give each user or conversation its own, and a prompt prefix many share spreads "
                  "over the groups by key")


class SamplingFields(_Req):
    """Sampling knobs shared by every endpoint (OpenAI names plus vLLM's common extras)."""
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="0 or -1 = disabled")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias in [-100, 100]; at most 1024")
    seed: Optional[Seed] = None
    stop: Optional[Union[str, list[str]]] = Field(None, description="up to 4 stop strings")
    user: Optional[str] = None
    service_tier: Optional[ServiceTier] = Field(None, description=TIER_HELP)
    prompt_cache_key: Optional[str] = Field(None, max_length=1024, description=CACHE_KEY_HELP)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {k}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


# ---------------------------------------------------------------- chat completions


class FunctionCall(_Req):
    name: str
    arguments: str = ""

    @field_validator("arguments", mode="before")
    @classmethod
    def _args_as_text(cls, v):
        return json.dumps(v) if isinstance(v, (dict, list)) else v


class ToolCall(_Req):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    reasoning_content: Optional[str] = Field(None, description="assistant chain of thought (analysis channel)")
    reasoning: Optional[str] = Field(None, description="alias of reasoning_content")
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None


class FunctionDef(_Req):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(_Req):
    type: Literal["function"] = "function"
    function: FunctionDef


class _Named(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"] = "function"
    function: _Named


class _AllowedTools(_Req):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolChoice(_Req):
    """Only these tools may be called (`mode` as tool_choice's auto/required); the prompt still lists every
    tool, so a conversation that narrows its tools turn by turn keeps its cached prefix."""
    type: Literal["allowed_tools"]
    allowed_tools: _AllowedTools

    @property
    def mode(self) -> str:
        return self.allowed_tools.mode

    def names(self) -> list[str]:
        return [t.function.name for t in self.allowed_tools.tools]


class PredictionContent(_Req):
    """Predicted Outputs: most of the answer, known ahead (a file to edit, a document to revise)."""
    type: Literal["content"]
    content: Union[str, list[TextPart]]


PREDICTION_HELP = ("the answer's content, mostly known ahead: the engine verifies it a few tokens a step (never "
                   "changing the output), so the output's spans that match it take one step per several tokens; "
                   "usage.completion_tokens_details counts accepted and rejected prediction tokens")


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: Optional[int] = Field(
        None, ge=1, description="cap on generated tokens, reasoning included")
    n: int = Field(1, ge=1, le=128)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice, AllowedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    reasoning_effort: Optional[Effort] = Field(None, description=EFFORT_HELP)
    max_reasoning_tokens: Optional[int] = Field(
        None, ge=0, description="extension: cap on reasoning tokens (0 = no reasoning), grammar-enforced")
    prediction: Optional[PredictionContent] = Field(None, description=PREDICTION_HELP)
    store: Optional[bool] = Field(None, description="keep the completion (and the messages it was asked) to be "
                                                    "listed and read at GET /v1/chat/completions; default false")
    metadata: Optional[Metadata] = Field(None, description="up to 16 key-value pairs, kept with a stored "
                                                           "completion and filtered on when listing them")
    # Declared so that they are refused rather than ignored: the model would not see the functions.
    functions: Optional[list[dict[str, Any]]] = Field(None, description="deprecated, not supported: use tools")
    function_call: Optional[Union[str, dict[str, Any]]] = Field(
        None, description="deprecated, not supported: use tool_choice")

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, v, info: ValidationInfo):
        if v is not None:
            raise ValueError(f"the deprecated `{info.field_name}` is not supported; send functions as `tools` "
                             "(and the choice as `tool_choice`)")
        return v


class ChatCompletionUpdateRequest(_Req):
    """POST /v1/chat/completions/{id}: a stored completion's new metadata (null: none)."""
    metadata: Optional[Metadata]


# ----------------------------------------------------------------- text completions


class CompletionRequest(SamplingFields):
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="raw text (no chat template) or token ids; a list of prompts makes one choice set each")
    max_tokens: Optional[int] = Field(16, ge=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="number of top logprobs per token")
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)
    ignore_eos: bool = False
    prediction: Optional[PredictionContent] = Field(None, description="extension (as chat's): the completion's "
                                                                      "text, mostly known ahead")


# --------------------------------------------------------------------- responses


class InputMessage(_Req):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[TextPart]]
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallItem(_Req):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Req):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[TextPart]]
    id: Optional[str] = None
    status: Optional[str] = None


class ReasoningText(_Req):
    type: str = "reasoning_text"
    text: str = ""


class ReasoningItem(_Req):
    """Earlier reasoning: its text goes back to the model ahead of the next call."""
    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    encrypted_content: Optional[str] = None


class CompactionItem(_Req):
    """What POST /v1/responses/compact returns in place of a conversation's turns: its summary, sealed (as
    reasoning is, deployments.sealed_reasoning); sent back as input, it is opened and goes into the prompt."""
    type: Literal["compaction"]
    encrypted_content: str
    id: Optional[str] = None
    created_by: Optional[str] = None


def _item_kind(v: Any) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("type") or ("message" if "role" in v else None)
    return getattr(v, "type", None)


InputItem = Annotated[
    Union[Annotated[InputMessage, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
          Annotated[FunctionCallOutputItem, Tag("function_call_output")],
          Annotated[ReasoningItem, Tag("reasoning")], Annotated[CompactionItem, Tag("compaction")]],
    Discriminator(_item_kind)]


class ConversationCreateRequest(_Req):
    items: Optional[list[InputItem]] = Field(None, max_length=20, description="up to 20 items, oldest first")
    metadata: Optional[Metadata] = None


class ConversationUpdateRequest(_Req):
    metadata: Metadata


class ConversationItemsRequest(_Req):
    items: list[InputItem] = Field(min_length=1, max_length=20, description="up to 20 items, oldest first")


class ResponsesTool(_Req):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ResponsesNamedToolChoice(_Req):
    type: Literal["function"]
    name: str


class ResponsesAllowedToolChoice(_Req):
    """As chat's AllowedToolChoice, in the Responses shape."""
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[ResponsesNamedToolChoice] = Field(min_length=1)

    def names(self) -> list[str]:
        return [t.name for t in self.tools]


class TextFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Req):
    format: Optional[TextFormat] = None


class ReasoningConfig(_Req):
    effort: Optional[Effort] = Field(None, description=EFFORT_HELP)
    summary: Optional[str] = None


class PromptRef(_Req):
    """A stored prompt (serve.prompts) and the values of its `{{variables}}`."""
    id: str = Field(min_length=1, max_length=128)
    version: Optional[str] = Field(None, description="default: the version the server lists last")
    variables: Optional[dict[str, Union[str, TextPart]]] = None


class ConversationRef(_Req):
    id: str = Field(max_length=128)


# OpenAI's `include` values; those for tools this server has not (file search, web search, computer use,
# the code interpreter, images) are accepted and have nothing to add
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs"]


class ContextManagement(_Req):
    type: Literal["compaction"]
    compact_threshold: Optional[int] = Field(None, ge=1, description="compact once the prompt has more tokens "
                                                                     "than this; unset: once it would not fit")


class ResponsesRequest(_Req):
    model: str
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    reasoning: Optional[ReasoningConfig] = None
    tools: Optional[list[ResponsesTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ResponsesNamedToolChoice,
                                ResponsesAllowedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    seed: Optional[Seed] = None
    stream: bool = False
    store: Optional[bool] = Field(None, description="keep the response to be read or continued later (default true "
                                                    "when the server stores responses)")
    metadata: Optional[Metadata] = None
    previous_response_id: Optional[str] = Field(
        None, max_length=128, description="continue a stored response: its conversation comes before `input`")
    conversation: Optional[Union[Annotated[str, Field(max_length=128)], ConversationRef]] = Field(
        None, description="the conversation (POST /v1/conversations) this response continues and joins: its "
                          "items come before `input`, and this response's input and output items are added to it")
    prompt: Optional[PromptRef] = Field(None, description="a stored prompt (the server's serve.prompts): its "
                                                          "instructions and messages come first, variables filled")
    background: Optional[bool] = Field(None, description="run on after the request returns; poll GET "
                                                         "/v1/responses/{id} (with stream: resume it with "
                                                         "?stream=true&starting_after=N), stop with POST .../cancel")
    context_management: Optional[list[ContextManagement]] = Field(
        None, max_length=1, description="[{type: compaction, compact_threshold}]: a prompt over the threshold (or "
                                        "over the context, without one) is compacted first (as POST "
                                        "/v1/responses/compact) and the response answers from the compaction, "
                                        "which is its first output item")
    truncation: Optional[Literal["auto", "disabled"]] = Field(
        None, description="auto: a conversation over the context length drops its oldest turns (from a user "
                          "message on) until it fits, keeping developer and system messages; disabled (default): "
                          "it is a 400 context_length_exceeded")
    include: Optional[list[Includable]] = Field(
        None, description="message.output_text.logprobs: each answer token's logprob (and `top_logprobs` "
                          "alternatives) in output_text parts and deltas; reasoning.encrypted_content: reasoning "
                          "items carry their text encrypted, to be sent back as input without a store")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="alternatives per answer token; over 0, "
                                                                       "logprobs are included without `include`")
    max_reasoning_tokens: Optional[int] = Field(None, ge=0, description="extension: cap on reasoning tokens")
    user: Optional[str] = None
    service_tier: Optional[ServiceTier] = Field(None, description=TIER_HELP)
    prompt_cache_key: Optional[str] = Field(None, max_length=1024, description=CACHE_KEY_HELP)

    @field_validator("conversation")
    @classmethod
    def _one_history(cls, v, info: ValidationInfo):  # declared after `previous_response_id`, so it sees it
        if v and info.data.get("previous_response_id"):
            raise ValueError("cannot be used together with previous_response_id: a response continues one or "
                             "the other")
        return v

    @field_validator("background")
    @classmethod
    def _background(cls, v, info: ValidationInfo):  # declared after `store`, so it sees it
        if v and info.data.get("store") is False:
            raise ValueError("needs store (a background response is read back from the store)")
        return v

    @field_validator("input")
    @classmethod
    def _some_input(cls, v):
        if isinstance(v, list) and not v:  # as chat's empty `messages`: nothing to answer
            raise ValueError("must hold at least one item")
        return v


class CompactRequest(_Req):
    """POST /v1/responses/compact: a conversation (`input`, after `previous_response_id`'s) made short: its user
    messages, then one compaction item holding a summary of the rest."""
    model: str
    input: Optional[Union[str, list[InputItem]]] = None
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = Field(None, max_length=128)
    max_output_tokens: Optional[int] = Field(None, ge=1, description="extension: cap on the summary's tokens "
                                                                     "(default 2048)")
    service_tier: Optional[ServiceTier] = Field(None, description=TIER_HELP)
    prompt_cache_key: Optional[str] = Field(None, max_length=1024, description=CACHE_KEY_HELP)


class CompactedResponse(BaseModel):
    id: str
    object: Literal["response.compaction"] = "response.compaction"
    created_at: int
    output: list[dict[str, Any]]
    usage: dict[str, Any]


class InputTokensRequest(ResponsesRequest):
    """POST /v1/responses/input_tokens: a response's fields, of which those shaping its prompt count."""
    model: Optional[str] = None
    input: Optional[Union[str, list[InputItem]]] = None


class InputTokenCount(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


# ------------------------------------------------------- documented response shapes


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[dict[str, int]] = None
    completion_tokens_details: Optional[dict[str, int]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    service_tier: Optional[str] = None
    choices: list[dict[str, Any]]
    usage: Usage


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "failed", "queued", "in_progress", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    output_text: Optional[str] = None
    usage: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None
    incomplete_details: Optional[dict[str, Any]] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[dict[str, Any]] = None
    store: bool = False
    background: bool = False
    service_tier: Optional[str] = None
