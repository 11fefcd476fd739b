"""Property-based fuzzing: whatever arrives, parsers and the decoder raise only typed errors."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blipserve.config import ImageLimits
from blipserve.contracts.catalog import parse_request
from blipserve.contracts.openai import parse_chat_request
from blipserve.errors import ImageError, InvalidInput
from blipserve.images import decode_base64, decode_image
from helpers import make_image

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# bodies shaped like the contract, with random parts
bodies = st.fixed_dictionaries(
    {
        "input_data": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "columns": json_values | st.just(["image", "text"]),
                    "data": json_values | st.lists(st.lists(json_values, max_size=3), max_size=3),
                },
                optional={"index": json_values},
            ),
            st.lists(
                st.dictionaries(st.sampled_from(["image", "text", "x"]), json_values, max_size=3),
                max_size=3,
            ),
        )
    },
    optional={
        "params": json_values
        | st.dictionaries(
            st.sampled_from(["max_new_tokens", "num_beams", "top_p", "do_sample", "bogus"]),
            json_values,
            max_size=3,
        )
    },
)


@FAST
@given(st.one_of(json_values, bodies, st.binary(max_size=64)))
def test_scoring_parser_only_raises_invalid_input(body: Any) -> None:
    try:
        request = parse_request(body)
    except InvalidInput:
        return
    assert request.rows
    for row in request.rows:
        assert isinstance(row.image, str)
        assert row.image


@FAST
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "model": st.text(max_size=5),
                "messages": st.lists(
                    st.fixed_dictionaries(
                        {
                            "role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                            "content": json_values
                            | st.lists(
                                st.fixed_dictionaries(
                                    {
                                        "type": st.sampled_from(["text", "image_url", "audio"]),
                                        "text": json_values,
                                        "image_url": json_values,
                                    }
                                ),
                                max_size=3,
                            ),
                        }
                    ),
                    max_size=3,
                ),
            },
            optional={"max_tokens": json_values, "n": json_values, "temperature": json_values},
        ),
    )
)
def test_chat_parser_only_raises_invalid_input(body: Any) -> None:
    try:
        request = parse_chat_request(body)
    except InvalidInput:
        return
    assert isinstance(request.image, str)
    assert request.image


def _png() -> bytes:
    buffer = io.BytesIO()
    make_image(1, (24, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    make_image(2, (24, 20)).save(buffer, format="JPEG")
    return buffer.getvalue()


SEEDS = [_png(), _jpeg()]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@FAST
@given(st.one_of(mutated_images(), st.binary(max_size=256)))
def test_decoder_returns_rgb_or_raises_image_error(data: bytes) -> None:
    try:
        image = decode_image(data, ImageLimits(max_image_pixels=1_000_000), target_size=16)
    except ImageError:
        return
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.width * image.height <= 1_000_000


@FAST
@given(st.text(max_size=200))
def test_base64_decoder_only_raises_image_error(text: str) -> None:
    try:
        data = decode_base64(text)
    except ImageError:
        return
    assert isinstance(data, bytes)
    assert data
