"""The OpenAI chat completions contract: accepted shapes, responses, every 400."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from blipserve.contracts.openai import (
    ChatRequest,
    Choice,
    chat_response,
    choices_of,
    models_response,
    parse_chat_request,
)
from blipserve.contracts.openai_stream import DONE, ChunkWriter, error_event
from blipserve.errors import InvalidRequest
from blipserve.params import GenerationParams
from blipserve.types import Prediction


def _data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 60)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMG = _data_url()
URL = "https://example.com/cat.jpg"


def image_part(url: str = IMG, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def body(*messages: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "blip", "messages": list(messages), **extra}


def one(**extra: Any) -> dict[str, Any]:
    """The smallest valid request (an image, no text) plus top-level settings."""
    return body(user(image_part()), **extra)


def refused(raw: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        parse_chat_request(raw)
    assert info.value.status == 400


# --- happy paths ----------------------------------------------------------------------------


def test_caption_with_image_only() -> None:
    req = parse_chat_request(one())
    assert req == ChatRequest(
        model="blip", image=IMG, question=None, history=(), params=GenerationParams()
    )


def test_question_with_data_url_image_and_json_text_or_bytes() -> None:
    raw = body(user(text_part(" what colour "), image_part(), text_part("is it? ")))
    for form in (raw, json.dumps(raw), json.dumps(raw).encode()):
        req = parse_chat_request(form)
        assert req.image == IMG
        assert req.question == "what colour is it?"  # text parts joined with a space
        assert req.history == ()


def test_http_url_image_detail_and_plain_string_image_url() -> None:
    assert parse_chat_request(body(user(image_part(URL, detail="low")))).image == URL
    plain = {"type": "image_url", "image_url": f"  {URL} "}
    assert parse_chat_request(body(user(plain))).image == URL


def test_string_content_and_image_in_an_earlier_user_message() -> None:
    req = parse_chat_request(
        body(
            {"role": "system", "content": "You are a helpful assistant."},
            user(image_part()),
            {"role": "user", "content": "What is it?"},
        )
    )
    # system is ignored; consecutive user messages are one turn
    assert (req.image, req.question, req.history) == (IMG, "What is it?", ())


def test_blank_question_is_a_caption() -> None:
    req = parse_chat_request(body(user(image_part(), text_part("   "))))
    assert req.question is None
    assert parse_chat_request(body({"role": "user", "content": [image_part()]})).question is None


def test_history_pairs_in_order_system_and_developer_ignored() -> None:
    req = parse_chat_request(
        body(
            {"role": "developer", "content": [text_part("be terse")]},
            user(image_part(), text_part("what is it?")),
            {"role": "assistant", "content": "a cat"},
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "what colour?"},
            {"role": "assistant", "content": [text_part("black")]},
            {"role": "user", "content": "where is it?"},
        )
    )
    assert req.history == (("what is it?", "a cat"), ("what colour?", "black"))
    assert req.question == "where is it?"


def test_image_only_first_turn_gives_empty_question_in_history() -> None:
    req = parse_chat_request(
        body(user(image_part()), {"role": "assistant", "content": "a dog"}, user(text_part("q")))
    )
    assert req.history == (("", "a dog"),)


def test_model_is_echoed_as_sent_and_unknown_or_harmless_keys_ignored() -> None:
    req = parse_chat_request(
        one(
            model="Salesforce/blip2-opt-2.7b",
            user="u1",
            seed=3,
            metadata={"a": "b"},
            store=False,
            frequency_penalty=0,
            presence_penalty=0.0,
            stream=False,
            n=1,
            logprobs=False,
            response_format={"type": "text"},
            tools=[],
            tool_choice="none",
            stop=None,
            something_new={"x": 1},
        )
    )
    assert req.model == "Salesforce/blip2-opt-2.7b"
    assert req.params == GenerationParams()


# --- generation settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_tokens": 12}, {"max_new_tokens": 12}),
        ({"max_completion_tokens": 9}, {"max_new_tokens": 9}),
        ({"max_tokens": 9, "max_completion_tokens": 9}, {"max_new_tokens": 9}),
        ({"max_tokens": None, "temperature": None}, {}),
        ({"temperature": 0}, {"do_sample": False}),
        (
            {"temperature": 0, "top_p": 0.5, "max_tokens": 5},
            {"do_sample": False, "max_new_tokens": 5},
        ),
        ({"temperature": 0.7}, {"do_sample": True, "temperature": 0.7}),
        ({"temperature": 1, "top_p": 0.9}, {"do_sample": True, "temperature": 1.0, "top_p": 0.9}),
        ({"top_p": 0.8}, {"do_sample": True, "top_p": 0.8}),
        ({"top_k": 5}, {"do_sample": True, "top_k": 5}),
        (
            {"num_beams": 3, "min_tokens": 2, "repetition_penalty": 1.2, "length_penalty": 0.5},
            {"num_beams": 3, "min_new_tokens": 2, "repetition_penalty": 1.2, "length_penalty": 0.5},
        ),
        ({"n": 1}, {}),  # the same request as no n
        ({"n": 3}, {"num_return_sequences": 3, "do_sample": True}),  # samples, as OpenAI's
        ({"n": 2, "num_beams": 4}, {"num_return_sequences": 2, "num_beams": 4}),  # best beams
        (
            {"n": 2, "temperature": 0, "num_beams": 2},
            {"num_return_sequences": 2, "num_beams": 2, "do_sample": False},
        ),
        (
            {"n": 2, "temperature": 0.5},
            {"num_return_sequences": 2, "temperature": 0.5, "do_sample": True},
        ),
        ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 3}),
    ],
)
def test_generation_settings_map_to_params(
    settings: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert parse_chat_request(one(**settings)).params.generate_kwargs() == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"max_completion_tokens": 10_000}, "max_completion_tokens: Input should be less than"),
        ({"max_tokens": "20"}, "max_tokens must be a number"),
        ({"max_tokens": True}, "max_tokens must be a number"),
        ({"max_tokens": 2.5}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens .* disagree"),
        ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
        ({"temperature": 9}, "temperature: Input should be less than or equal to 5"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"temperature": 0, "top_p": 0}, "top_p: Input should be greater than 0"),
        ({"min_tokens": 9, "max_tokens": 3}, r"min_tokens \(9\) must not exceed max_tokens \(3\)"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": 17}, "n: Input should be less than or equal to 16"),
        ({"n": "2"}, "n must be a number"),
        ({"n": 2.5}, "n: Input should be a valid integer"),
        ({"n": 3, "num_beams": 2}, r"n \(3\) must not exceed num_beams \(2\)"),
        ({"n": 2, "temperature": 0}, r"n \(2\) needs sampling \(a temperature above 0\)"),
        ({"n": 2, "temperature": 0, "num_beams": 1}, r"n \(2\) needs sampling"),
        ({"no_repeat_ngram_size": 11}, "no_repeat_ngram_size: Input should be less than or"),
    ],
)
def test_bad_generation_settings_name_the_openai_field(
    settings: dict[str, Any], message: str
) -> None:
    refused(one(**settings), f"^{message}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stream": "yes"}, "stream must be true or false"),
        ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when"),
        ({"stream": True, "stream_options": []}, "stream_options must be an object, got"),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage must be true or false",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported"),
        ({"tool_choice": "auto"}, "tool_choice is not supported"),
        ({"functions": [{"name": "f"}]}, "functions is not supported"),
        ({"function_call": "auto"}, "function_call is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format 'json_object' is not"),
        ({"response_format": "json"}, "response_format a string is not supported"),
        ({"logprobs": True}, "logprobs is not supported"),
        ({"top_logprobs": 3}, "top_logprobs is not supported"),
        ({"stop": ["\n"]}, "stop is not supported"),
        ({"stop": "."}, "stop is not supported"),
        ({"frequency_penalty": 0.5}, "frequency_penalty is not supported"),
        ({"presence_penalty": -1}, "presence_penalty is not supported"),
        ({"presence_penalty": "0"}, "presence_penalty must be a number"),
        ({"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
        ({"modalities": ["text", "audio"]}, "modalities .* is not supported"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio output is not supported"),
    ],
)
def test_unsupported_settings_are_refused_by_name(settings: dict[str, Any], message: str) -> None:
    refused(one(**settings), f"^{message}")


# --- malformed bodies and messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "request body is not valid JSON"),
        (b"\xff\xfe", "request body is not valid JSON"),
        ([1, 2], "request body must be a JSON object .* got an array"),
        ({"messages": [user(image_part())]}, "request body has no 'model' key"),
        ({"model": 3, "messages": [user(image_part())]}, "model must be a non-empty string"),
        ({"model": " ", "messages": [user(image_part())]}, "model must be .* an empty string"),
        ({"model": "m"}, "request body has no 'messages' key"),
        (body(), "messages must be a non-empty array .* got an empty array"),
        ({"model": "m", "messages": {"role": "user"}}, "messages must be a non-empty array"),
        (body("hi"), r"messages\[0\] must be an object with 'role' and 'content', got a string"),
        (body({"content": "hi"}), r"messages\[0\] has no 'role'"),
        (body({"role": "bot", "content": "x"}), r"messages\[0\]\.role must be one of .* 'bot'"),
        (
            body(user(image_part()), {"role": "tool", "content": "x"}),
            r"messages\[1\]\.role must be one of .* \(tool calls are not supported\)",
        ),
        (body({"role": "user"}), r"messages\[0\] has no 'content'"),
        (
            body({"role": "user", "content": None}),
            r"messages\[0\]\.content must be a string or an array of content parts, got null",
        ),
    ],
)
def test_malformed_body_or_message(raw: object, message: str) -> None:
    refused(raw, f"^{message}")


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("hello", r"messages\[0\]\.content\[1\] must be a content part object"),
        ({"text": "hi"}, r"messages\[0\]\.content\[1\] has no 'type'; supported part types"),
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            r"messages\[0\]\.content\[1\]\.type 'input_audio' is not supported; "
            "supported part types: text, image_url",
        ),
        ({"type": "file", "file": {}}, r"messages\[0\]\.content\[1\]\.type 'file' is not"),
        ({"type": "text", "text": 5}, r"messages\[0\]\.content\[1\]\.text must be a string"),
        (
            {"type": "image_url", "image_url": 5},
            r"messages\[0\]\.content\[1\]\.image_url must be an object like",
        ),
        (
            {"type": "image_url", "image_url": {"detail": "low"}},
            r"messages\[0\]\.content\[1\]\.image_url\.url must be a string, got null",
        ),
        (
            image_part(detail="ultra"),
            r"messages\[0\]\.content\[1\]\.image_url\.detail must be one of auto, low, high",
        ),
        (
            image_part("file:///etc/passwd"),
            r"messages\[0\]\.content\[1\]\.image_url\.url must be an http\(s\) URL or a data URL "
            ".* got scheme 'file'",
        ),
        (
            image_part("iVBORw0KGgo="),
            r"messages\[0\]\.content\[1\]\.image_url\.url must be .* got no scheme",
        ),
        (image_part("  "), r"messages\[0\]\.content\[1\]\.image_url\.url .* got an empty string"),
    ],
)
def test_bad_content_part_is_named(part: object, message: str) -> None:
    # The bad part is the second one of the first message; the image comes first.
    refused(body({"role": "user", "content": [text_part("q"), part, image_part()]}), f"^{message}")


def test_bad_part_in_later_message_is_named() -> None:
    raw = body(
        user(image_part(), text_part("q")),
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": [text_part("x"), text_part("y"), {"type": "video"}]},
    )
    refused(raw, r"^messages\[2\]\.content\[2\]\.type 'video' is not supported")


def test_no_image() -> None:
    refused(
        body({"role": "user", "content": "what is it?"}),
        "^this model needs an image: add an image_url part",
    )


def test_several_images() -> None:
    refused(
        body(user(image_part(), image_part(URL))),
        r"^several images are not supported; send one image per request "
        r"\(found messages\[0\]\.content\[0\], messages\[0\]\.content\[1\]\)",
    )
    refused(
        body(user(image_part()), {"role": "assistant", "content": "a"}, user(image_part(URL))),
        "^several images are not supported",
    )


@pytest.mark.parametrize("role", ["assistant", "system", "developer"])
def test_images_only_in_user_messages(role: str) -> None:
    refused(
        body({"role": role, "content": [image_part()]}, user(text_part("q"))),
        rf"^messages\[0\]\.content\[0\]: images are only supported in user messages, not '{role}'",
    )


def test_last_message_must_be_from_the_user() -> None:
    refused(
        body(user(image_part()), {"role": "assistant", "content": "a cat"}),
        r"^the last message must be from the user \(messages\[1\]\.role is 'assistant'\)",
    )
    refused(
        body(user(image_part()), {"role": "system", "content": "x"}),
        r"^the last message must be from the user \(messages\[1\]\.role is 'system'\)",
    )


def test_conversation_may_not_start_with_the_assistant() -> None:
    refused(
        body({"role": "assistant", "content": "hello!"}, user(image_part())),
        r"^messages\[0\]: an assistant message must follow a user message",
    )


def test_assistant_turn_must_have_text() -> None:
    refused(
        body(user(image_part()), {"role": "assistant", "content": " "}, user(text_part("q"))),
        r"^messages\[1\]\.content: an assistant message must have text",
    )


def test_text_length_limits() -> None:
    long = "x" * 30
    with pytest.raises(InvalidRequest, match=r"^messages\[0\]\.content has 30 characters"):
        parse_chat_request(body(user(image_part(), text_part(long))), max_text_chars=20)
    many = body(
        user(image_part(), text_part("a" * 8)),
        {"role": "assistant", "content": "b" * 8},
        user(text_part("c" * 8)),
    )
    with pytest.raises(InvalidRequest, match=r"^messages: the conversation has 24 characters"):
        parse_chat_request(many, max_text_chars=20)
    # system text does not count
    ok = body({"role": "system", "content": long}, user(image_part(), text_part("q")))
    assert parse_chat_request(ok, max_text_chars=20).question == "q"


# --- responses -------------------------------------------------------------------------------


def test_chat_response_shape() -> None:
    out = chat_response(
        model="blip",
        choices=[Choice("a cat", 3, "stop")],
        prompt_tokens=40,
        request_id="abc123",
        created=1_700_000_000,
    )
    assert out == {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "blip",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a cat"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43},
    }
    json.dumps(out)


def test_n_answers_are_choices_in_order_with_usage_for_all() -> None:
    several = Prediction("a cat", tokens=3, texts=("a cat", "a small cat"), texts_tokens=(3, 5))
    choices = choices_of(several, max_new_tokens=5)
    assert choices == [Choice("a cat", 3, "stop"), Choice("a small cat", 5, "length")]
    out = chat_response(model="m", choices=choices, prompt_tokens=7, request_id="r")
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [
        (0, "a cat", "stop"),
        (1, "a small cat", "length"),
    ]
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}
    assert choices_of(Prediction("one", tokens=2), max_new_tokens=5) == [Choice("one", 2, "stop")]


def test_created_defaults_to_now() -> None:
    out = chat_response(
        model="m", choices=[Choice("", 0, "length")], prompt_tokens=0, request_id="r"
    )
    assert isinstance(out["created"], int)
    assert out["created"] > 1_700_000_000
    assert re.fullmatch(r"chatcmpl-r", out["id"])


def test_models_response_shape() -> None:
    assert models_response("Salesforce/blip-image-captioning-base", created=5) == {
        "object": "list",
        "data": [
            {
                "id": "Salesforce/blip-image-captioning-base",
                "object": "model",
                "created": 5,
                "owned_by": "blipserve",
            }
        ],
    }
    assert isinstance(models_response("m")["data"][0]["created"], int)


def test_stream_and_include_usage() -> None:
    assert not parse_chat_request(one()).stream
    plain = parse_chat_request(one(stream=True))
    assert (plain.stream, plain.include_usage) == (True, False)
    counted = parse_chat_request(one(stream=True, stream_options={"include_usage": True}))
    assert (counted.stream, counted.include_usage) == (True, True)
    unset = parse_chat_request(one(stream=False, stream_options=None))
    assert (unset.stream, unset.include_usage) == (False, False)


def test_stream_chunks_in_openai_shape() -> None:
    writer = ChunkWriter("r1", "blip2", include_usage=True, created=5)
    role = json.loads(writer.role(1)[len(b"data: ") :])
    assert role == {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "blip2",
        "choices": [
            {
                "index": 1,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    event = writer.usage([Choice("a", 2, "stop"), Choice("b c", 3, "length")], prompt_tokens=4)
    assert event.endswith(b"\n\n")
    last = json.loads(event[len(b"data: ") :])
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    finish = json.loads(writer.finish(0, "stop")[len(b"data: ") :])
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "stop"
    without = ChunkWriter("r1", "blip2", include_usage=False)
    assert "usage" not in json.loads(without.content(0, "hi")[len(b"data: ") :])
    assert json.loads(error_event("gone", 504)[len(b"data: ") :]) == {
        "error": {"message": "gone", "type": "server_error", "code": 504}
    }
    assert DONE == b"data: [DONE]\n\n"
