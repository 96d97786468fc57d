"""OpenAI's wire format: request models (validated by pydantic), response and error bodies.

Only the fields rayft serves; an unknown field is ignored, as OpenAI's clients send extras. Types
are strict where OpenAI's are (`"max_tokens": "5"` and `"stream": "yes"` are errors, not coerced),
text must be valid Unicode (no lone surrogates) and seeds fit a signed 64-bit integer.
No Ray, no torch.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rayft import names
from rayft.config import MERGE_METHODS

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's and vLLM's seed: a signed 64-bit integer


def _unicode(text: str) -> str:
    """Text that can be tokenised and sent back: JSON's \\ud800 escapes let lone surrogates in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"character {e.start} is a lone surrogate ({text[e.start]!r}): not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI reads an explicit null as the parameter left out."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in ("temperature", "top_p", "stream", "n")}
        return data

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a chunk holding the usage (and no choices)."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Text | list[Text]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: give one prompt per request")
        return self.prompt[0]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class MergeSpec(_Body):
    """A merge of served adapters (`rayft merge`'s settings)."""

    adapters: list[Annotated[str, AfterValidator(names.check_name)]] = Field(min_length=1)
    method: Literal[MERGE_METHODS]
    weights: list[float] | None = None
    density: float = Field(default=1.0, gt=0, le=1)
    rank: int | None = Field(default=None, ge=1)
    majority_sign: Literal["total", "frequency"] = "total"
    seed: int = 0


class LoadAdapterRequest(_Body):
    """Serve an adapter under `name`: one in the store (`path`), or a merge of served ones (`merge`).
    A `path` to a compressed store serves every adapter in it, each under its own name (`name`
    names the store)."""

    name: Annotated[str, AfterValidator(names.check_name)]
    merge: MergeSpec | None = None  # before `path`, so path's check sees it
    path: Text | None = Field(default=None, validate_default=True,
                              description="A directory inside the store, relative to it: an adapter, "
                                          "or a compressed store (all its adapters).")

    @field_validator("path")
    @classmethod
    def _one_source(cls, path, info: ValidationInfo):
        if (path is None) == (info.data.get("merge") is None):
            raise ValueError("give exactly one of path (an adapter in the store) or merge (of served adapters)")
        return path


def sse(body: dict) -> str:
    """One server-sent event (the stream ends with `data: [DONE]`)."""
    return f"data: {json.dumps(body)}\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    # a message may quote what the client sent: lone surrogates become escapes, so it encodes
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(id_: str, model: str, text: str, finish: str | None, use: dict | None = None) -> dict:
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def completion_usage_chunk(id_: str, model: str, use: dict) -> dict:
    """A stream's last chunk with `stream_options.include_usage`: no choices, the usage (the
    chunks before it have `"usage": null`)."""
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [], "usage": use}


def chat_body(id_: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": use}


def chat_chunk(id_: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}


def chat_usage_chunk(id_: str, model: str, use: dict) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": use}
