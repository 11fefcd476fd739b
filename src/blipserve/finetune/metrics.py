"""Exact match and corpus BLEU-4 (Papineni et al., 2002) over whitespace tokens."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def normalize(text: str) -> str:
    """Lowercase with single spaces: how predictions and references are compared."""
    return " ".join(text.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize`."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU with one reference per prediction, in [0, 1] (no smoothing).

    Clipped n-gram precisions for n = 1..max_n are summed over the corpus, combined by a
    geometric mean and scaled by the brevity penalty.  Zero when some order has no match.
    """
    _check(predictions, references)
    matches = [0] * max_n
    totals = [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references, strict=True):
        p, r = normalize(pred).split(), normalize(ref).split()
        pred_len += len(p)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            p_grams, r_grams = _ngrams(p, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in p_grams.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if pred_len == 0 or min(totals) == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
