"""The one configuration of a fine-tuning run (no argparse here: the CLI derives flags).

Fields carry help text as metadata, in the shape :func:`blipserve.cli.add_config_arguments`
reads, so a ``finetune`` command can expose every field without repeating it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from blipserve.config import Device

INIT_BLIP = "config:blip"
INIT_BLIP2 = "config:blip2"
SYNTHETIC = "synthetic"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train, on what, for how long, and where to write it."""

    data: str = _opt(
        SYNTHETIC,
        "Training data: a folder with an imagefolder metadata.jsonl (file_name, text, "
        "optional prompt), a CSV file with the same columns, or 'synthetic' for an endless "
        "stream of fresh training scenes.",
    )
    eval_data: str = _opt(
        SYNTHETIC,
        "Evaluation data: a folder or CSV as for --data, 'synthetic' for held-out scenes, "
        "or '' for no evaluation.",
    )
    output_dir: str = _opt(
        "finetune-output", "Folder for the final model (save_pretrained layout)."
    )
    checkpoint_dir: str = _opt(
        "", "Folder for resumable checkpoints (default: OUTPUT_DIR/checkpoints)."
    )
    init: str = _opt(
        INIT_BLIP,
        "Where the model starts: a save_pretrained folder (or hub id), or 'config:blip' / "
        "'config:blip2' for a new small model and grammar tokenizer built from the "
        "shape fields below.",
    )
    max_steps: int = _opt(0, "Optimizer steps to run; 0 derives them from --epochs.")
    epochs: float = _opt(1.0, "Passes over a finite data set (ignored when --max-steps > 0).")
    batch_size: int = _opt(32, "Examples per optimizer step.")
    lr: float = _opt(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to biases and norms).")
    warmup_steps: int = _opt(100, "Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = _opt(0.02, "Learning rate at the end, as a fraction of --lr.")
    grad_clip: float = _opt(1.0, "Clip the gradient norm to this; 0 disables.")
    eval_every: int = _opt(500, "Evaluate every this many steps (and at the end); 0: at the end.")
    eval_examples: int = _opt(200, "Examples (synthetic: scenes) per periodic evaluation.")
    save_every: int = _opt(500, "Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = _opt(2, "Most recent checkpoints kept on disk.")
    resume: bool = _opt(True, "Continue from the newest checkpoint in the checkpoint folder.")
    seed: int = _opt(0, "Seed for initialisation, shuffling and dropout.")
    device: Device = _opt("auto", "Where to train: auto (cuda when available), cpu or cuda.")  # noqa: RUF009
    num_threads: int = _opt(0, "CPU threads for torch; 0 keeps torch's default.")
    freeze_language_model: bool = _opt(
        False, "BLIP-2: train only the vision side (Q-Former, projection, ViT), not the LM."
    )
    freeze_vision: bool = _opt(False, "Do not train the image encoder (ViT).")
    vision_init: str = _opt(
        "",
        "New model: copy the image encoder (ViT) from this BLIP or BLIP-2 folder, e.g. a "
        "trained 'demo' (same image size, patch size, width and layers), as BLIP-2 starts "
        "from a pretrained image encoder.",
    )
    qformer_init: str = _opt(
        "",
        "New BLIP-2 model: initialise the Q-Former's layers from this BLIP captioning "
        "folder's text decoder, e.g. a trained 'demo' (same width; its first QFORMER_LAYERS "
        "layers), as BLIP-2 initialises its Q-Former from BERT: the cross-attention then "
        "starts out knowing how to read the image encoder it was trained with.",
    )
    caption_fraction: float = _opt(
        0.4,
        "Synthetic data for BLIP-2: share of captions; the rest are questions (unused with "
        "--questions-per-image).",
    )
    questions_per_image: int = _opt(
        0,
        "Synthetic data for BLIP-2: each scene gives its caption and this many of its "
        "questions (distinct kinds) as consecutive examples, and a batch passes each image "
        "through the vision encoder and Q-Former once for all its rows (--batch-size still "
        "counts rows). 0: one example per scene, a caption or a question.",
    )
    question_weights: str = _opt(
        "",
        "Synthetic data for BLIP-2: relative weights of question kinds, e.g. 'exists=3' "
        "(kinds not named weigh 1; kinds: color, shape, size, count, count_shape, exists, "
        "position).",
    )
    prompt_forms: bool = _opt(
        False,
        "Synthetic data for BLIP-2: ask each question in a random prompt form ('Question: q "
        "Answer:', 'q Answer: ' or the bare question; case and trailing spaces varied), and "
        "half the captions as an open question ('what is in the picture?' and paraphrases).",
    )
    max_new_tokens: int = _opt(32, "Generation length limit during evaluation.")
    progress: bool = _opt(True, "Show a progress bar (loss, samples/s).")
    # Shape of a model built from a config (init 'config:...'); ignored for folders.
    image_size: int = _opt(64, "New model: image side in pixels.")
    patch_size: int = _opt(8, "New model: ViT patch side in pixels.")
    hidden_size: int = _opt(192, "New model: width of every transformer.")
    num_heads: int = _opt(4, "New model: attention heads per layer.")
    vision_layers: int = _opt(4, "New model: ViT layers.")
    text_layers: int = _opt(4, "New model: text decoder (BLIP) / OPT (BLIP-2) layers.")
    qformer_layers: int = _opt(2, "New BLIP-2 model: Q-Former layers.")
    num_query_tokens: int = _opt(16, "New BLIP-2 model: Q-Former query tokens.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "hidden_size", "num_heads", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ValueError("max_steps must be >= 0 and epochs > 0")
        if self.data == SYNTHETIC and self.max_steps == 0:
            raise ValueError("synthetic data is endless: set max_steps")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in [0, 1], got {self.caption_fraction}")
        if self.questions_per_image < 0:
            raise ValueError(f"questions_per_image must be >= 0, got {self.questions_per_image}")
        self.kind_weights()  # raises on a malformed --question-weights
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    def kind_weights(self) -> dict[str, float]:
        """``question_weights`` parsed: kind -> weight (only the kinds it names)."""
        from blipserve.finetune.scenes import QUESTION_KINDS

        weights: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.question_weights.split(","))):
            kind, sep, value = part.partition("=")
            kind = kind.strip()
            try:
                weight = float(value) if sep else -1.0
            except ValueError:
                weight = -1.0
            if kind not in QUESTION_KINDS or weight < 0:
                raise ValueError(
                    f"question_weights: expected KIND=WEIGHT (weight >= 0) with KIND one of "
                    f"{', '.join(QUESTION_KINDS)}; got {part!r}"
                )
            weights[kind] = weight
        return weights

    @property
    def checkpoints(self) -> Path:
        return (
            Path(self.checkpoint_dir)
            if self.checkpoint_dir
            else Path(self.output_dir) / "checkpoints"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FamilyName = Literal["blip", "blip2"]
