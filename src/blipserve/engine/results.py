"""The last stage of the request path: outcomes back to what the caller asked for.

Every entry point that answers a request as a whole (the catalog's ``/score``, the OpenAI
route, ``blipserve score``, the warm-up) wants all rows or the first error, and asks these
helpers; batch jobs keep each row's outcome instead (a bad row is recorded, not raised).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blipserve.engine.prepare import PreparedRow
from blipserve.errors import BlipserveError, InvalidInput, RowError
from blipserve.types import Prediction


def good_rows_or_raise(prepared: Sequence[PreparedRow | RowError]) -> list[PreparedRow]:
    """The rows, all good; else raise the one bad row's error, or one listing several."""
    errors = [p for p in prepared if isinstance(p, RowError)]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        shown = "; ".join(e.message for e in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise InvalidInput(f"{len(errors)} rows are invalid: {shown}{more}")
    return [p for p in prepared if isinstance(p, PreparedRow)]


def predictions_or_raise(outcomes: Iterable[Prediction | BlipserveError]) -> list[Prediction]:
    """Every row's prediction, in order; else raise the first row's error."""
    predictions = []
    for outcome in outcomes:
        if not isinstance(outcome, Prediction):
            raise outcome
        predictions.append(outcome)
    return predictions
