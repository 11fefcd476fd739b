"""A streamed chat completion (``"stream": true``) as OpenAI's server-sent events.

Each event is ``data: <chat.completion.chunk>`` and a blank line: for each choice a chunk
with ``delta.role``, then chunks with ``delta.content`` pieces as the model decodes them,
then a chunk with its ``finish_reason``; with ``stream_options.include_usage`` a last chunk
with ``usage`` and no choices (and ``"usage": null`` in the others, as OpenAI sends them);
then ``data: [DONE]``.  An error after the first chunk ends the stream with an ``error``
event instead (before it, the request fails with a normal JSON error).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from blipserve.contracts.openai import Choice

DONE: Final = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True)
class ChunkWriter:
    """The chunks of one streamed completion (they share its id, time and model)."""

    request_id: str
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = usage
        return event(payload)

    def delta(self, index: int, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        """A chunk of one choice: its ``delta`` and, last, why it ended."""
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.chunk([choice])

    def role(self, index: int) -> bytes:
        return self.delta(index, {"role": "assistant", "content": ""})

    def content(self, index: int, text: str) -> bytes:
        return self.delta(index, {"content": text})

    def finish(self, index: int, reason: str) -> bytes:
        return self.delta(index, {}, reason)

    def usage(self, choices: Sequence[Choice], prompt_tokens: int) -> bytes:
        """The last chunk with ``include_usage``: no choices, the tokens of all of them."""
        completion_tokens = sum(choice.tokens for choice in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return self.chunk([], usage)


def error_event(message: str, status: int) -> bytes:
    """The event that ends a stream that failed after its first chunk (the OpenAI client
    raises an ``APIError`` with ``message``)."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return event({"error": {"message": message, "type": kind, "code": status}})
