"""The OpenAI Chat Completions contract (``POST /v1/chat/completions``), with no HTTP in it.

Request (the public OpenAI shape; one image per request)::

    {"model": "blip", "max_tokens": 30,
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is on the table?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

Response: a ``chat.completion`` object with one choice (:func:`chat_response`).

How a conversation maps onto BLIP:

* The one image may be in any user message.  Images are not accepted in other roles.
* The last message must be from the user; its text is the question (no text: a caption).
* Earlier user / assistant messages become ``history``: (question, answer) pairs in order.
  Consecutive messages of the same role are merged (their texts joined with a space), so
  ``[user: <image>], [user: "what is it?"]`` is one user turn.
* ``system`` and ``developer`` messages are checked for shape and then ignored: BLIP and
  BLIP-2 have no system prompt.
* Only BLIP-2 (``text_role == "prompt"``) uses the history (see :func:`build_prompt`); the
  BLIP captioning, VQA and matching heads are single-turn and see only the last question.

Generation settings use the OpenAI names and are validated through
:meth:`GenerationParams.parse`, so their bounds match the scoring route.  Settings this
server cannot honour (``stream``, ``n > 1``, tools, ``stop``, ``logprobs``, penalties, a
JSON ``response_format``, audio) are refused with a 400 naming the field rather than
silently ignored; harmless ones (``user``, ``seed``, ``metadata``, ``store``, ...) and
unknown keys are ignored.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from blipserve.errors import InvalidRequest
from blipserve.params import GenerationParams, json_type

MAX_TEXT_CHARS: Final = 2000

ROLES: Final = ("system", "developer", "user", "assistant")
IGNORED_ROLES: Final = ("system", "developer")
PART_TYPES: Final = ("text", "image_url")
DETAILS: Final = ("auto", "low", "high")
TEXT_ROLES: Final = ("prefix", "question", "match", "prompt")

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)

#: OpenAI field -> GenerationParams field; ``top_k``, ``min_tokens``, ``num_beams``,
#: ``repetition_penalty`` and ``length_penalty`` are vLLM-style extensions.
_NUMERIC_FIELDS: Final = {
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_beams": "num_beams",
    "repetition_penalty": "repetition_penalty",
    "length_penalty": "length_penalty",
}
_SAMPLING_FIELDS: Final = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, before its image is fetched or decoded."""

    #: the ``model`` as sent (echoed back in the response; this server serves one model)
    model: str
    #: the ``image_url``'s url: an http(s) URL or a ``data:`` URL (base64)
    image: str
    #: the text of the last user message; ``None`` when blank (a caption is wanted)
    question: str | None
    #: earlier (user text, assistant text) turns in order; the user text may be ``""``
    #: (e.g. a turn that only sent the image), the assistant text never is
    history: tuple[tuple[str, str], ...]
    params: GenerationParams


def parse_chat_request(body: object, *, max_text_chars: int = MAX_TEXT_CHARS) -> ChatRequest:
    """Validate a chat completions request (raw JSON text/bytes or a decoded object).

    ``max_text_chars`` bounds each message's text and the text of the whole conversation
    (system messages excluded).  Raises :class:`InvalidRequest` with a message naming the
    JSON path of the problem, e.g. ``messages[1].content[2].type: ...``.
    """
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, Mapping):
        raise InvalidRequest(
            "request body must be a JSON object with 'model' and 'messages' keys, "
            f"got {json_type(body)}"
        )
    model = body.get("model")
    if "model" not in body:
        raise InvalidRequest("request body has no 'model' key (the model name is required)")
    if not isinstance(model, str) or not model.strip():
        what = "an empty string" if isinstance(model, str) else json_type(model)
        raise InvalidRequest(f"model must be a non-empty string, got {what}")
    _check_unsupported(body)
    params = _parse_params(body)
    if "messages" not in body:
        raise InvalidRequest("request body has no 'messages' key")
    image, question, history = _parse_messages(body["messages"], max_text_chars)
    return ChatRequest(model=model, image=image, question=question, history=history, params=params)


def build_prompt(req: ChatRequest, text_role: str) -> str | None:
    """The text the model gets for ``req``, by what the model does with text.

    * ``"prefix"`` (BLIP captioning): the question is a caption prefix the caption continues;
      ``None`` for a plain caption.
    * ``"question"`` (BLIP VQA): the question; ``None`` stays ``None`` (the engine refuses it).
    * ``"match"`` (BLIP image-text matching): the text to match (``None`` is refused likewise).
    * ``"prompt"`` (BLIP-2): ``None`` when there is no question (a plain caption; the history
      alone asks nothing).  Otherwise each history turn becomes ``"Question: {q} Answer:
      {a}."`` (just ``"{a}."`` when the turn had no text, e.g. it only sent the image; no
      second period when the answer already ends in ``.``, ``!`` or ``?``), joined by
      spaces, followed by ``"Question: {q} Answer:"``.  A question that already contains
      ``"Answer:"`` (any case) is taken to be a full BLIP-2 prompt and used as-is after the
      history.

    History is used only for ``"prompt"``: the BLIP heads are single-turn.
    """
    if text_role not in TEXT_ROLES:
        raise ValueError(f"text_role must be one of {', '.join(TEXT_ROLES)}, got {text_role!r}")
    question = req.question
    if text_role != "prompt" or question is None:
        return question
    turns = [_history_turn(q, a) for q, a in req.history]
    turns.append(ask_prompt(question, text_role))
    return " ".join(turns)


def ask_prompt(question: str, text_role: str) -> str:
    """A bare question as the model takes questions: BLIP-2 (``"prompt"``) gets
    ``Question: {q} Answer:`` unless the text already holds ``Answer:``; others get it as is."""
    if text_role != "prompt" or _ANSWER.search(question):
        return question
    return f"Question: {question} Answer:"


def chat_response(
    *,
    model: str,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    request_id: str,
    created: int | None = None,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object with one choice."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
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


def _check_unsupported(body: Mapping[str, Any]) -> None:
    """Refuse settings this server cannot honour; ``null`` always means "not set"."""
    given = body.get
    stream = given("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    if stream:
        raise InvalidRequest("stream is not supported; send 'stream': false or leave it out")

    n = given("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidRequest(f"n must be an integer, got {n!r}")
        if n > 1:
            raise InvalidRequest(f"n>1 is not supported (got n={n}); send one request per answer")
        if n < 1:
            raise InvalidRequest(f"n must be 1, got {n}")

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
    """
    given = {k: body[k] for k in _NUMERIC_FIELDS if body.get(k) is not None}
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
    if greedy:
        kept = {k: v for k, v in raw.items() if names[k] not in _SAMPLING_FIELDS}
        return _validate({**kept, "do_sample": False}, names)
    if any(k in given for k in _SAMPLING_FIELDS):
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
        if "min_new_tokens" in raw and "max_new_tokens" in raw:  # the only cross-field check
            raise InvalidRequest(
                f"min_tokens ({raw['min_new_tokens']}) must not exceed "
                f"{names['max_new_tokens']} ({raw['max_new_tokens']})"
            ) from None
        raise


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    where: str
    role: str
    text: str
    #: (url, its JSON path)
    images: tuple[tuple[str, str], ...]


def _parse_messages(
    messages: object, max_text_chars: int
) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if isinstance(messages, list) else json_type(messages)
        raise InvalidRequest(f"messages must be a non-empty array of message objects, got {what}")
    parsed = [_parse_message(i, m, max_text_chars) for i, m in enumerate(messages)]

    images = [img for m in parsed for img in m.images]
    if not images:
        raise InvalidRequest("this model needs an image: add an image_url part to a user message")
    if len(images) > 1:
        paths = ", ".join(where for _, where in images)
        raise InvalidRequest(
            f"several images are not supported; send one image per request (found {paths})"
        )

    last = parsed[-1]
    if last.role != "user":
        raise InvalidRequest(
            f"the last message must be from the user ({last.where}.role is {last.role!r})"
        )

    # The dialogue: user/assistant messages, consecutive ones of one role merged; each turn
    # is [role, text, path of its first message].
    turns: list[tuple[str, str, str]] = []
    for m in parsed:
        if m.role in IGNORED_ROLES:
            continue
        if turns and turns[-1][0] == m.role:
            role, text, where = turns[-1]
            turns[-1] = (role, " ".join(t for t in (text, m.text) if t), where)
        elif not turns and m.role == "assistant":
            raise InvalidRequest(
                f"{m.where}: an assistant message must follow a user message "
                "(the conversation starts with an assistant turn)"
            )
        else:
            turns.append((m.role, m.text, m.where))
    total = sum(len(text) for _, text, _ in turns)
    if total > max_text_chars:
        raise InvalidRequest(
            f"messages: the conversation has {total} characters of text; "
            f"at most {max_text_chars} per request"
        )
    # turns alternate user, assistant, ..., user: they start and end with a user turn.
    history = []
    for (_, question, _), (_, answer, where) in zip(turns[:-1:2], turns[1::2], strict=True):
        if not answer:
            raise InvalidRequest(f"{where}.content: an assistant message must have text")
        history.append((question, answer))
    return images[0][0], turns[-1][1] or None, tuple(history)


def _parse_message(i: int, message: object, max_text_chars: int) -> _Message:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidRequest(
            f"{where} must be an object with 'role' and 'content', got {json_type(message)}"
        )
    if "role" not in message:
        raise InvalidRequest(f"{where} has no 'role' (one of {', '.join(ROLES)})")
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        got = repr(role) if isinstance(role, str) else json_type(role)
        hint = " (tool calls are not supported)" if role in ("tool", "function") else ""
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {got}{hint}")
    if "content" not in message:
        raise InvalidRequest(f"{where} has no 'content'")
    content = message["content"]
    texts: list[str] = []
    images: list[tuple[str, str]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _parse_part(f"{where}.content[{j}]", role, part, texts, images)
    else:
        raise InvalidRequest(
            f"{where}.content must be a string or an array of content parts, "
            f"got {json_type(content)}"
        )
    text = " ".join(t.strip() for t in texts if t.strip())
    if role not in IGNORED_ROLES and len(text) > max_text_chars:
        raise InvalidRequest(
            f"{where}.content has {len(text)} characters of text; at most {max_text_chars}"
        )
    return _Message(where=where, role=role, text=text, images=tuple(images))


def _parse_part(
    where: str, role: str, part: object, texts: list[str], images: list[tuple[str, str]]
) -> None:
    if not isinstance(part, Mapping):
        raise InvalidRequest(
            f"{where} must be a content part object like "
            f'{{"type": "text", "text": "..."}}, got {json_type(part)}'
        )
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.text must be a string, got {json_type(text)}")
        texts.append(text)
        return
    if kind == "image_url":
        if role != "user":
            raise InvalidRequest(
                f"{where}: images are only supported in user messages, not {role!r} messages"
            )
        images.append((_parse_image_url(where, part.get("image_url")), where))
        return
    supported = f"supported part types: {', '.join(PART_TYPES)}"
    if "type" not in part:
        raise InvalidRequest(f"{where} has no 'type'; {supported}")
    got = repr(kind) if isinstance(kind, str) else json_type(kind)
    raise InvalidRequest(f"{where}.type {got} is not supported; {supported}")


def _parse_image_url(where: str, image_url: object) -> str:
    where = f"{where}.image_url"
    if isinstance(image_url, Mapping):
        detail = image_url.get("detail")
        if detail is not None and detail not in DETAILS:
            raise InvalidRequest(
                f"{where}.detail must be one of {', '.join(DETAILS)}, got {detail!r}"
            )
        where, raw = f"{where}.url", image_url.get("url")
        if not isinstance(raw, str):
            raise InvalidRequest(f"{where} must be a string, got {json_type(raw)}")
    elif isinstance(image_url, str):
        raw = image_url
    else:
        raise InvalidRequest(
            f'{where} must be an object like {{"url": "https://..."}} or a URL string, '
            f"got {json_type(image_url)}"
        )
    url = raw.strip()
    match = _URL_SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in ("http", "https", "data"):
        what = "an empty string" if not url else (f"scheme {scheme!r}" if scheme else "no scheme")
        raise InvalidRequest(
            f"{where} must be an http(s) URL or a data URL "
            f"('data:image/png;base64,...'), got {what}"
        )
    return url


def _history_turn(question: str, answer: str) -> str:
    end = "" if answer.endswith((".", "!", "?")) else "."
    if not question:
        return f"{answer}{end}"
    return f"Question: {question} Answer: {answer}{end}"
