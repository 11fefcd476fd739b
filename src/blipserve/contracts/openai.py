"""The OpenAI Chat Completions contract (``POST /v1/chat/completions``), with no HTTP in it.

Request (the public OpenAI shape; one image per request)::

    {"model": "blip", "max_tokens": 30,
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is on the table?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

Response: a ``chat.completion`` object with one choice (:func:`chat_response`), or ``n``:
each of the row's texts (``num_return_sequences``) a choice, best first; with ``"stream":
true``, ``chat.completion.chunk`` events (:mod:`blipserve.contracts.openai_stream`).

How a conversation maps onto the model: :mod:`blipserve.contracts.openai_messages` takes
the one image, the last user message (the question) and the earlier turns (the history)
from ``messages``; the model's adapter makes its prompt of them (``chat_prompt``: BLIP-2
uses the history, the single-turn BLIP heads only the question).

Generation settings use the OpenAI names and are validated through
:meth:`GenerationParams.parse`, so their bounds match the scoring route.  Settings this
server cannot honour (tools, ``stop``, ``logprobs``, penalties, a JSON
``response_format``, audio) are refused with a 400 naming the field rather than silently
ignored; harmless ones (``user``, ``seed``, ``metadata``, ``store``, ...) and unknown keys
are ignored.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from blipserve.contracts.openai_messages import parse_messages
from blipserve.errors import InvalidRequest
from blipserve.params import GenerationParams, json_type, load_json_object
from blipserve.types import Prediction

MAX_TEXT_CHARS: Final = 2000

#: OpenAI field -> GenerationParams field; ``top_k``, ``min_tokens``, ``num_beams``,
#: ``repetition_penalty``, ``length_penalty`` and ``no_repeat_ngram_size`` are vLLM-style
#: extensions.
_NUMERIC_FIELDS: Final = {
    "n": "num_return_sequences",
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_beams": "num_beams",
    "repetition_penalty": "repetition_penalty",
    "length_penalty": "length_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
}
_SAMPLING_FIELDS: Final = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, before its image is fetched or decoded."""

    #: the ``model`` as sent (echoed back in the response; this server serves one model)
    model: str
    #: the image, question and history: as :class:`~blipserve.contracts.openai_messages.
    #: Conversation` describes them
    image: str
    question: str | None
    history: tuple[tuple[str, str], ...]
    params: GenerationParams
    #: answer as server-sent events (:mod:`blipserve.contracts.openai_stream`)
    stream: bool = False
    #: ``stream_options.include_usage``: a last chunk with the usage
    include_usage: bool = False


def parse_chat_request(body: object, *, max_text_chars: int = MAX_TEXT_CHARS) -> ChatRequest:
    """Validate a chat completions request (raw JSON text/bytes or a decoded object).

    ``max_text_chars`` bounds each message's text and the text of the whole conversation
    (system messages excluded).  Raises :class:`InvalidRequest` with a message naming the
    JSON path of the problem, e.g. ``messages[1].content[2].type: ...``.
    """
    body = load_json_object(body, "with 'model' and 'messages' keys")
    model = body.get("model")
    if "model" not in body:
        raise InvalidRequest("request body has no 'model' key (the model name is required)")
    if not isinstance(model, str) or not model.strip():
        what = "an empty string" if isinstance(model, str) else json_type(model)
        raise InvalidRequest(f"model must be a non-empty string, got {what}")
    _check_unsupported(body)
    stream, include_usage = _parse_stream(body)
    params = _parse_params(body)
    if "messages" not in body:
        raise InvalidRequest("request body has no 'messages' key")
    said = parse_messages(body["messages"], max_text_chars)
    return ChatRequest(
        model, said.image, said.question, said.history, params, stream, include_usage
    )


@dataclass(frozen=True)
class Choice:
    """One answer of a chat completion: its text, its generated tokens, why it ended."""

    text: str
    tokens: int
    finish_reason: str


def choices_of(prediction: Prediction, max_new_tokens: int) -> list[Choice]:
    """The answers in a row's prediction, best first (one unless ``n`` was above 1); each
    ends with ``length`` when it used all ``max_new_tokens``, else ``stop``."""
    texts = prediction.texts or (prediction.text,)
    counts = prediction.texts_tokens or (prediction.tokens or 0,)
    return [
        Choice(text, tokens, "length" if tokens >= max_new_tokens else "stop")
        for text, tokens in zip(texts, counts, strict=True)
    ]


def chat_response(
    *,
    model: str,
    choices: Sequence[Choice],
    prompt_tokens: int,
    request_id: str,
    created: int | None = None,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object: a choice per answer (``index`` 0, 1, ...);
    ``usage`` counts the prompt once and every answer's tokens."""
    completion_tokens = sum(choice.tokens for choice in choices)
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason,
                "logprobs": None,
            }
            for index, choice in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_response(model_id: str, created: int | None = None) -> dict[str, Any]:
    """The ``GET /v1/models`` body: a list with the one served model."""
    return {
        "object": "list",
        "data": [
            {
                "id": model_id,
                "object": "model",
                "created": int(time.time()) if created is None else created,
                "owned_by": "blipserve",
            }
        ],
    }


# --- top-level settings -------------------------------------------------------------------


def _parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage`` (``null``: not set); the options
    without streaming are refused, as OpenAI refuses them."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, Mapping):
        raise InvalidRequest(f"stream_options must be an object, got {json_type(options)}")
    if not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequest(
            f"stream_options.include_usage must be true or false, got {include_usage!r}"
        )
    return True, bool(include_usage)


def _check_unsupported(body: Mapping[str, Any]) -> None:
    """Refuse settings this server cannot honour; ``null`` always means "not set"."""
    given = body.get
    for key in ("tools", "functions"):
        value = given(key)
        if value is not None and value != []:
            raise InvalidRequest(f"{key} is not supported: this model cannot call tools")
    for key in ("tool_choice", "function_call"):
        value = given(key)
        if value is not None and value != "none":
            raise InvalidRequest(
                f"{key} is not supported: this model cannot call tools (only 'none' is accepted)"
            )

    response_format = given("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        what = (
            repr(response_format.get("type"))
            if isinstance(response_format, Mapping)
            else json_type(response_format)
        )
        raise InvalidRequest(f"response_format {what} is not supported; only {{'type': 'text'}} is")

    logprobs = given("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest(f"logprobs must be true or false, got {logprobs!r}")
    if logprobs:
        raise InvalidRequest("logprobs is not supported; send 'logprobs': false or leave it out")
    if given("top_logprobs") not in (None, 0):
        raise InvalidRequest("top_logprobs is not supported")

    stop = given("stop")
    if stop is not None and stop != []:
        raise InvalidRequest("stop is not supported: this server has no stop sequences")

    for key in ("frequency_penalty", "presence_penalty"):
        value = given(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{key} must be a number, got {value!r}")
        if value != 0:
            raise InvalidRequest(
                f"{key} is not supported (only 0); use repetition_penalty to discourage repeats"
            )

    logit_bias = given("logit_bias")
    if logit_bias is not None and logit_bias != {}:
        raise InvalidRequest("logit_bias is not supported")

    modalities = given("modalities")
    if modalities is not None and modalities != ["text"] and modalities != []:
        raise InvalidRequest(f"modalities {modalities!r} is not supported; only ['text'] is")
    if given("audio") is not None:
        raise InvalidRequest("audio output is not supported")


def _parse_params(body: Mapping[str, Any]) -> GenerationParams:
    """Map the OpenAI generation settings onto :class:`GenerationParams`.

    ``temperature`` 0 means greedy decoding (``do_sample`` false; ``top_p``/``top_k`` are
    validated and then dropped); a positive temperature samples with it.  ``top_p`` or
    ``top_k`` without a temperature also sample (at the model's default temperature).
    ``n`` above 1 asks for that many answers: the best beams with ``num_beams``, else
    independent samples, as OpenAI's are (also when no temperature is given); ``n`` 1 is
    the same request as no ``n``.
    """
    given = {k: body[k] for k in _NUMERIC_FIELDS if body.get(k) is not None}
    if given.get("n") == 1 and type(given["n"]) is int:
        del given["n"]
    if "max_tokens" in given and "max_completion_tokens" in given:
        if given["max_tokens"] != given["max_completion_tokens"]:
            raise InvalidRequest(
                f"max_tokens ({given['max_tokens']!r}) and max_completion_tokens "
                f"({given['max_completion_tokens']!r}) disagree; send only one"
            )
        del given["max_tokens"]

    temperature = given.get("temperature")
    greedy = False
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if temperature < 0:
            raise InvalidRequest(
                f"temperature: Input should be greater than or equal to 0, got {temperature}"
            )
        greedy = temperature == 0
    raw = {_NUMERIC_FIELDS[k]: v for k, v in given.items() if not (greedy and k == "temperature")}
    names = {_NUMERIC_FIELDS[k]: k for k in given}
    params = _validate(raw, names)  # bounds and types, even for settings greedy drops
    n = params.num_return_sequences or 1
    if greedy:
        if n > 1 and (params.num_beams or 1) == 1:
            raise InvalidRequest(
                f"n ({n}) needs sampling (a temperature above 0) or num_beams of at least "
                f"{n}: with temperature 0 every answer would be the same"
            )
        kept = {k: v for k, v in raw.items() if names[k] not in _SAMPLING_FIELDS}
        return _validate({**kept, "do_sample": False}, names)
    if any(k in given for k in _SAMPLING_FIELDS) or (n > 1 and params.num_beams is None):
        return _validate({**raw, "do_sample": True}, names)
    return params


def _validate(raw: dict[str, Any], names: Mapping[str, str]) -> GenerationParams:
    """:meth:`GenerationParams.parse`, with its messages in the OpenAI field names."""
    try:
        return GenerationParams.parse(raw, where="params")
    except InvalidRequest as exc:
        message = exc.message
        for internal, name in names.items():
            prefix = f"params.{internal}"
            if message.startswith(prefix):
                raise InvalidRequest(name + message[len(prefix) :]) from None
        if message.startswith("params: "):  # a check across fields, naming them
            text = message[len("params: ") :]
            renamed = re.sub(r"\w+", lambda m: names.get(m.group(), m.group()), text)
            raise InvalidRequest(renamed) from None
        raise
