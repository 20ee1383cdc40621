"""OpenAI-compatible request bodies (validated by pydantic) and the OpenAI error shape."""
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.sequence import MAX_LOGPROBS

MAX_N = 16


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one readable line, and the first offending field. A union field's
    alternatives (prompt: str | list[str] | ...) collapse into one "expected one of" message."""
    by_field: dict[str | None, list[dict]] = {}
    for err in e.errors():
        loc = err.get("loc", ())
        by_field.setdefault(str(loc[0]) if loc else None, []).append(err)
    parts = []
    for field, errs in by_field.items():
        if len(errs) > 1 and all(len(err.get("loc", ())) > 1 for err in errs):
            kinds = ", ".join(dict.fromkeys(str(err["loc"][1]) for err in errs))
            parts.append(f"{field}: expected one of {kinds}")
        else:
            parts += [f"{field + ': ' if field else ''}{err['msg']}" for err in errs]
    return "; ".join(parts), next(iter(by_field))


def error_json(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": ErrorBody(message=message, type=kind, param=param, code=code).model_dump()}


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, plus vLLM-style extras)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: 0 disables")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    repetition_penalty: float = Field(1.0, gt=0, description="extension")
    min_tokens: int = Field(0, ge=0, description="extension")
    ignore_eos: bool = Field(False, description="extension")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per generated token whose log-probabilities the answer carries; None: none asked."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True,
                                 description="log-probabilities of the generated tokens and this many alternatives")

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if (isinstance(value, (str, list)) and len(value) == 0) or \
                (isinstance(value, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in value)):
            raise ValueError("prompt must not be empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a text prompt, or chat messages through the chat template."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="prompts: default true; messages: default false "
                                            "(the template writes its own)")
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize`: token ids -> text."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
