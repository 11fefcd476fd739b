"""Stage 2 offline: rows known at once (a list, a batch job's chunk) grouped into model
batches; pure functions, testable without a model.

(Its online counterpart, merging concurrent requests as they arrive, is
:mod:`blipserve.engine.online_queue`.)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def plan_batches(keys: Sequence[Hashable], max_batch_size: int) -> list[list[int]]:
    """Split positions ``0..len(keys)-1`` into batches of equal key.

    Groups appear in the order their key first appears, positions keep their order inside
    a group, and no batch exceeds ``max_batch_size``.  Results are scattered back by
    position, so the caller's row order is unaffected.

    >>> plan_batches(["a", "b", "a", "a"], max_batch_size=2)
    [[0, 2], [3], [1]]
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return [
        positions[start : start + max_batch_size]
        for positions in groups.values()
        for start in range(0, len(positions), max_batch_size)
    ]
