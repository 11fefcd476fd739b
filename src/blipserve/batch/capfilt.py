"""CapFilt (``--filter-model``): each generated caption, and each row's own text, scored
by an image-text matching model and kept when it reaches ``--min-match``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from blipserve.batch.rows import RowResult
from blipserve.engine import Engine, PreparedRow
from blipserve.errors import RowError
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction


def capfilt(
    filter_engine: Engine,
    results: Sequence[RowResult],
    prepared: Sequence[PreparedRow | RowError],
    min_match: float,
) -> list[RowResult]:
    """``results`` with their matching scores: (image, caption) and (image, original text)
    scored by ``filter_engine``, each kept when it reaches ``min_match``.

    With several captions a row (``--num-return-sequences K``, sampled: the K-sample
    recipe), each is scored: ``text`` becomes the best-matching one (``score``, ``keep``
    its), ``texts`` those reaching ``min_match``, best first, and ``text_scores`` theirs.
    """
    pairs: list[PreparedRow | RowError] = []
    targets: list[tuple[_Match, bool, str]] = []  # (its row's scores, a caption?, the text)
    matches: dict[int, _Match] = {}  # a result's index -> its scores
    for n, (result, prep) in enumerate(zip(results, prepared, strict=True)):
        if result.error or not isinstance(prep, PreparedRow):
            continue
        match = matches[n] = _Match()
        captions = [(True, text) for text in result.texts or (result.text,)]
        for is_caption, text in [*captions, (False, prep.item.text)]:
            if not text:
                continue
            item = ModelInput(image=prep.item.image, text=text, params=GenerationParams())
            try:  # (a caption too long for the matching model fails its match, not all)
                pairs.append(filter_engine.admit(prep.row, item))
            except RowError as exc:
                pairs.append(exc)
            targets.append((match, is_caption, text))
        if prep.item.text:
            match.text_in = prep.item.text
    outcomes = filter_engine.run_prepared(pairs)
    for (match, is_caption, text), outcome in zip(targets, outcomes, strict=True):
        if not isinstance(outcome, Prediction) or outcome.score is None:
            why = outcome.reason if isinstance(outcome, RowError) else outcome
            match.error = f"matching failed: {getattr(why, 'message', why)}"
        elif is_caption:
            match.captions.append((outcome.score, text))
        else:
            match.text_in_score = outcome.score
            match.text_in_keep = outcome.score >= min_match
    return [
        matches[n].applied(result, min_match) if n in matches else result
        for n, result in enumerate(results)
    ]


@dataclass
class _Match:
    """One row's matching scores, as they come."""

    text_in: str | None = None
    text_in_score: float | None = None
    text_in_keep: bool | None = None
    error: str = ""  # (a score that could not be had)
    captions: list[tuple[float, str]] = field(default_factory=list)  # (score, caption)

    def applied(self, result: RowResult, min_match: float) -> RowResult:
        """``result`` with these scores: its best caption first, the others kept or not."""
        result = dataclasses.replace(
            result,
            error=self.error or result.error,
            text_in=self.text_in,
            text_in_score=self.text_in_score,
            text_in_keep=self.text_in_keep,
        )
        ranked = sorted(self.captions, key=lambda pair: -pair[0])
        if result.error or not ranked:
            return result
        best_score, best = ranked[0]
        kept = [(score, text) for score, text in ranked if score >= min_match]
        several = result.texts is not None
        return dataclasses.replace(
            result,
            text=best,
            score=best_score,
            keep=best_score >= min_match,
            texts=tuple(text for _, text in kept) if several else None,
            text_scores=tuple(score for score, _ in kept) if several else None,
        )


__all__ = ["capfilt"]
