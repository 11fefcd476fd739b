"""The ``messages`` of an OpenAI chat request: one image, the last question, the history.

* The one image may be in any user message.  Images are not accepted in other roles.
* The last message must be from the user; its text is the question (no text: a caption).
* Earlier user / assistant messages become ``history``: (question, answer) pairs in order.
  Consecutive messages of the same role are merged (their texts joined with a space), so
  ``[user: <image>], [user: "what is it?"]`` is one user turn.
* ``system`` and ``developer`` messages are checked for shape and then ignored: BLIP and
  BLIP-2 have no system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from blipserve.errors import InvalidRequest
from blipserve.params import json_type

ROLES: Final = ("system", "developer", "user", "assistant")
IGNORED_ROLES: Final = ("system", "developer")
PART_TYPES: Final = ("text", "image_url")
DETAILS: Final = ("auto", "low", "high")

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


@dataclass(frozen=True)
class Conversation:
    """What a chat request's messages say."""

    #: the ``image_url``'s url: an http(s) URL or a ``data:`` URL (base64)
    image: str
    #: the text of the last user message; ``None`` when blank (a caption is wanted)
    question: str | None
    #: earlier (user text, assistant text) turns in order; the user text may be ``""``
    #: (e.g. a turn that only sent the image), the assistant text never is
    history: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Message:
    where: str
    role: str
    text: str
    #: (url, its JSON path)
    images: tuple[tuple[str, str], ...]


def parse_messages(messages: object, max_text_chars: int) -> Conversation:
    """Validate a request's ``messages`` into its one image, last question and history.

    ``max_text_chars`` bounds each message's text and the whole conversation's (system
    messages excluded); errors name the JSON path, e.g. ``messages[1].content[2].type``.
    """
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
    return Conversation(images[0][0], turns[-1][1] or None, tuple(history))


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
