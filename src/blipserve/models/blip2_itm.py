"""BLIP-2's image-text matching (``Blip2ForImageTextRetrieval``, e.g. blip2-itm-vit-g).

The Q-Former reads the row's text (BERT tokens) with its learned queries attending to
the image; its ITM head says whether the text describes the image.  Served as BLIP's ITM
model is (:class:`~blipserve.models.blip.BlipMatchAdapter`): ``/score``'s ``score`` is
the match probability, ``blipserve match`` and CapFilt's ``--filter-model`` use it.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import torch
from torch import nn
from transformers import Blip2ForImageTextRetrieval

from blipserve.errors import InvalidInput
from blipserve.models import optimize
from blipserve.models.base import HFAdapter
from blipserve.models.int8_linear import quantize_linears
from blipserve.models.matching import one_score_per_row
from blipserve.models.optimize import Speedup
from blipserve.models.precision import Precision, amx_bf16
from blipserve.models.registry import register
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction


@register("Blip2ForImageTextRetrieval")
class Blip2MatchAdapter(HFAdapter):
    """Probability that a row's text describes its image (the ITM head)."""

    model_class = Blip2ForImageTextRetrieval
    kind = "blip2-itm"
    text_role = "match"
    text_required = True
    # The vision encoder is BLIP-2's ViT-g, as in Blip2Adapter: the same int8 recipe and
    # the same reason to keep torch's int8 encoder under --backend auto.
    vision_int8 = "int8-dynamic"
    openvino_when_auto = False

    @classmethod
    def speedups(
        cls, precision: Precision, device: torch.device, attention: str = "auto"
    ) -> list[Speedup]:
        """HFAdapter's, except that in int8 only the vision encoder's and the Q-Former's
        Linear layers go int8: the model casts the Q-Former's output to its ITM head's
        weight dtype, which an int8 layer reports as int8 (the head has 2 outputs; the
        projections serve only the contrastive scores, not used here)."""
        steps = [optimize.KEEP_FREED_MEMORY] if device.type == "cpu" else []
        if precision.int8:
            vision = optimize.int8_vision(precision, amx_bf16(device))  # (no int8 linears)
            own = precision.int8_kernel == "blipserve"
            int8 = functools.partial(_int8_qformer, kernel=own)
            qformer = Speedup("int8 Q-Former linears", int8, optimize.int8_runs_on(precision))
            steps += [*vision, qformer]
        return steps

    def check_row(self, item: ModelInput) -> None:
        # Generation settings do not apply; the text must still fit its positions.
        self.token_length(item.text)
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        return ()  # the Q-Former masks the text's padding

    def position_limit(self) -> int | None:
        return int(self.model.config.qformer_config.max_position_embeddings)

    def token_length(self, text: str | None) -> int:
        """Tokens of ``text``; past the Q-Former's positions its embeddings would fail the
        whole batch, so such a row is refused on its own."""
        n = len(self.tokenizer(text or "")["input_ids"])
        limit = self.position_limit()
        if limit is not None and n > limit:
            raise InvalidInput(f"'text' is {n} tokens long; this model accepts at most {limit}")
        return n

    def check_params(self, params: GenerationParams) -> None:
        one_score_per_row(params)

    def encode_text(self, items: Sequence[ModelInput]) -> dict[str, torch.Tensor]:
        """The Q-Former's text inputs, as ``Blip2ForImageTextRetrieval`` takes them.

        A config with an ``image_token_index`` makes the model drop the first
        ``num_query_tokens`` ids (the image tokens Blip2Processor puts before the text)
        and keep the whole mask, whose first columns then stand for the queries; without
        one the model adds the queries' mask itself.
        """
        enc = self.tokenizer([item.text or "" for item in items], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        config = self.model.config
        if config.image_token_index is not None:
            queries = (ids.shape[0], config.num_query_tokens)
            ids = torch.cat([torch.full(queries, config.image_token_index), ids], dim=1)
            mask = torch.cat([torch.ones(queries, dtype=mask.dtype), mask], dim=1)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        out = self.model(
            pixel_values=pixel_values,
            **self.encode_text(items),
            use_image_text_matching_head=True,
        )
        probs = out.logits_per_image.float().softmax(dim=-1)[:, 1]  # (B,) P(match)
        return [Prediction(f"{p:.4f}", score=round(float(p), 6)) for p in probs.tolist()]


def _int8_qformer(model: nn.Module, kernel: bool) -> None:
    qformer = model.get_submodule("qformer")
    quantize_linears(qformer, kernel=kernel)
