"""Generation parameters: validation, merging and what reaches generate()."""

from __future__ import annotations

import pytest

from blipserve.errors import InvalidRequest
from blipserve.params import GenerationParams


def test_only_set_values_are_passed() -> None:
    assert GenerationParams.parse(None).generate_kwargs() == {}
    params = GenerationParams.parse({"num_beams": 3, "do_sample": False, "top_k": None})
    assert params.generate_kwargs() == {"num_beams": 3, "do_sample": False}


def test_hashable_and_equal_by_value() -> None:
    a = GenerationParams.parse({"max_new_tokens": 5})
    b = GenerationParams.parse({"max_new_tokens": 5})
    assert a == b
    assert hash(a) == hash(b)
    assert a != GenerationParams.parse({"max_new_tokens": 6})


def test_merged_overrides_and_revalidates() -> None:
    base = GenerationParams.parse({"max_new_tokens": 5, "num_beams": 2})
    merged = base.merged(GenerationParams.parse({"max_new_tokens": 9}))
    assert merged.generate_kwargs() == {"max_new_tokens": 9, "num_beams": 2}
    with pytest.raises(InvalidRequest, match="min_new_tokens"):
        GenerationParams.parse({"max_new_tokens": 3}).merged(
            GenerationParams.parse({"min_new_tokens": 4})
        )


def test_float_fields_accept_ints() -> None:
    assert GenerationParams.parse({"temperature": 1}).temperature == 1.0


def test_where_prefix_in_messages() -> None:
    with pytest.raises(InvalidRequest, match=r"^generation options\.top_k"):
        GenerationParams.parse({"top_k": -1}, where="generation options")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"no_repeat_ngram_size": -1}, r"^params\.no_repeat_ngram_size: .*greater than or equal"),
        (
            {"no_repeat_ngram_size": 11},
            r"^params\.no_repeat_ngram_size: .*less than or equal to 10",
        ),
        ({"no_repeat_ngram_size": 2.5}, r"^params\.no_repeat_ngram_size: .*valid integer"),
        ({"num_return_sequences": 0}, r"^params\.num_return_sequences: .*greater than or equal"),
        (
            {"num_return_sequences": 17},
            r"^params\.num_return_sequences: .*less than or equal to 16",
        ),
        ({"num_return_sequences": True}, r"^params\.num_return_sequences must be a number"),
        (
            {"num_return_sequences": 4, "num_beams": 3},
            r"^params: num_return_sequences \(4\) must not exceed num_beams \(3\)",
        ),
        (
            {"num_return_sequences": 2, "num_beams": 1, "do_sample": False},
            r"^params: num_return_sequences \(2\) needs beam search .* or sampling",
        ),
        ({"min_new_tokens": 4, "max_new_tokens": 3}, r"^params: min_new_tokens \(4\) must not"),
    ],
)
def test_bounds_and_combinations_name_the_parameter(raw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        GenerationParams.parse(raw)


def test_several_texts_from_beams_or_samples_pass() -> None:
    for raw in (
        {"num_return_sequences": 3, "num_beams": 3},
        {"num_return_sequences": 3, "num_beams": 5, "do_sample": True},
        {"num_return_sequences": 16, "do_sample": True},
        {"num_return_sequences": 16, "num_beams": 1, "do_sample": True},
        {"num_return_sequences": 4},  # the model's defaults decide (the adapter checks)
        {"num_return_sequences": 1, "num_beams": 1, "do_sample": False},
        {"no_repeat_ngram_size": 0},
    ):
        assert GenerationParams.parse(raw).generate_kwargs() == raw
