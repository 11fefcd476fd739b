"""Grouping rows into batches, with no model involved."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blipserve.engine.offline_plan import plan_batches


def test_groups_by_key_in_first_seen_order_and_caps_size() -> None:
    assert plan_batches(["a", "b", "a", "a", "b"], 2) == [[0, 2], [3], [1, 4]]


def test_empty() -> None:
    assert plan_batches([], 4) == []


def test_rejects_zero_batch_size() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(["a"], 0)


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5))
def test_every_position_once_each_batch_homogeneous(keys: list[int], size: int) -> None:
    batches = plan_batches(keys, size)
    flat = sorted(p for b in batches for p in b)
    assert flat == list(range(len(keys)))
    for batch in batches:
        assert 1 <= len(batch) <= size
        assert len({keys[p] for p in batch}) == 1
        assert batch == sorted(batch)
