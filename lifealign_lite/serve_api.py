"""The request bodies ``serve`` accepts, as pydantic models, and the OpenAI-style error objects it answers with.

FastAPI's way: each body is checked by a model (types, ranges, required fields, text that can be encoded), and
the first problem pydantic finds is said in one sentence naming the field, with the same error object and status
as OpenAI (``{"error": {"message", "type", "param", "code"}}``, 400). What no type can say (the server's token
cap) is checked after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

AUTO = "auto"  # chat.AUTO (not imported: chat.py's imports stay off the server's request path)
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A bad request: answered with an OpenAI-style error object and ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One checked generation request."""

    prompt: str | list[dict]  # a conversation (chat completions) or a plain text (completions)
    model: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def _encodable(text: str) -> str:
    """Text that UTF-8 can hold: a lone surrogate (``"\\ud800"`` in JSON) is refused here, not by the tokenizer."""
    text.encode("utf-8")  # UnicodeEncodeError is a ValueError: pydantic reports it
    return text


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool fields... are accepted and ignored
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        return _encodable(value if isinstance(value, str) else "".join(p.text for p in value))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


Number = Union[StrictInt, StrictFloat]


class _Common(BaseModel):
    """What chat completions and completions share."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server does not use (user, logprobs, ...)
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, ge=0, le=1)
    n: Optional[StrictInt] = Field(None, ge=1, le=1)  # one choice per request
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=-2**63, le=2**64 - 1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("too many or empty")
        return stops


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr]]

    @field_validator("prompt")
    @classmethod
    def _one(cls, value):
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        if not isinstance(value, str) or not value:
            raise ValueError("empty")
        return _encodable(value)


_SAID = {  # field -> (what it must be, code) for a wrong type or value
    "model": ("'model' must be a string", "invalid_type"),
    "max_tokens": ("'max_tokens' must be an integer of at least 1", "invalid_type"),
    "max_completion_tokens": ("'max_completion_tokens' must be an integer of at least 1", "invalid_type"),
    "temperature": ("'temperature' must be a number between 0 and 2", "invalid_value"),
    "top_p": ("'top_p' must be a number between 0 and 1", "invalid_value"),
    "n": ("'n' must be 1 (one choice per request)", "invalid_value"),
    "stop": ("'stop' must be a string or a list of at most 4 non-empty strings", "invalid_type"),
    "seed": ("'seed' must be an integer", "invalid_type"),
    "stream": ("'stream' must be true or false", "invalid_type"),
    "stream_options": ("'stream_options' must be an object like {\"include_usage\": true}", "invalid_type"),
    "prompt": ("'prompt' must be a non-empty string of valid Unicode", "invalid_type"),
}


def _got(value) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


def explain(error: dict) -> RequestError:
    """One pydantic error as the sentence (and ``param``, ``code``) a client gets."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    key = str(loc[0]) if loc else None
    if kind == "missing" and len(loc) == 1:
        return RequestError(400, f"'{key}' is required", key, "missing_required_parameter")
    if key == "messages":
        if len(loc) == 1:
            if kind == "too_short":
                return RequestError(400, "'messages' is empty; give at least one message", key, "invalid_value")
            return RequestError(400, "'messages' must be a list of {role, content} objects", key, "invalid_type")
        i, part = loc[1], (loc[2] if len(loc) > 2 else None)
        if kind == "missing" and part in ("role", "content"):
            return RequestError(400, f"messages[{i}].{part} is required", key, "missing_required_parameter")
        if part == "role":
            return RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_got(value)}", key, "invalid_value")
        if part == "content":
            if kind == "value_error":
                return RequestError(400, f"messages[{i}].content is not valid Unicode (a lone surrogate?)", key, "invalid_value")
            if isinstance(value, list) or len(loc) > 4:  # a list of parts, one of them not text
                return RequestError(400, f"messages[{i}].content: only text parts are supported", key, "invalid_value")
            return RequestError(400, f"messages[{i}].content must be a string, got {_got(value)}", key, "invalid_type")
        return RequestError(400, f"messages[{i}] must be an object with 'role' and 'content', got {_got(value)}", key, "invalid_type")
    said, code = _SAID.get(key, (f"'{key}' is not valid", "invalid_value"))
    return RequestError(400, f"{said}, got {_got(value)}", key, code)


def parse_job(body, kind: str, max_tokens_cap: int) -> Job:
    """Check a chat-completions (``kind="chat"``) or completions request body; raise RequestError (400) on the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_type")
    try:
        req = (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        raise explain(exc.errors()[0]) from None
    prompt = [{"role": m.role, "content": m.content} for m in req.messages] if kind == "chat" else req.prompt
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap) if asked is None else asked
    if max_tokens > max_tokens_cap:
        raise RequestError(400, f"'max_tokens' is {max_tokens}, above this server's cap of {max_tokens_cap} (serve --max-tokens-cap)",
                           "max_tokens", "max_tokens_above_cap")
    options = req.stream_options or StreamOptions()
    return Job(prompt=prompt, model=req.model or AUTO, max_tokens=max_tokens, temperature=float(req.temperature or 0.0),
               top_p=float(1.0 if req.top_p is None else req.top_p), stop=req.stop or [], seed=req.seed, stream=bool(req.stream),
               include_usage=bool(req.stream) and options.include_usage)
