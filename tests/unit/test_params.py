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
