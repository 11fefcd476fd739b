"""What a demo model is (:class:`Recipe`: its training stages and usage) and its model
card: how it was trained, on what machine, and its held-out accuracy."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blipserve.finetune.config import INIT_BLIP2, FinetuneConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
HELDOUT_SCENES = 500
COMMAND = "scripts/train_demo_models.sh"


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    model_class: str
    # Training stages in order, each (output_dir, checkpoint_dir) -> config; a later stage
    # starts from the folder the previous one wrote (its ``init`` is set to it).
    stages: tuple[Callable[[Path, Path], FinetuneConfig], ...]
    usage: str


def hardware() -> str:
    threads = os.cpu_count() or 0
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {threads} CPU cores visible, torch {_torch_version()} (CPU)"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _step_examples(cfg: FinetuneConfig) -> str:
    if not cfg.questions_per_image:
        return f"{cfg.batch_size} freshly generated scenes"
    scenes_n = cfg.batch_size // (1 + cfg.questions_per_image)
    return f"{cfg.batch_size} rows from {scenes_n} freshly generated scenes"


def _stage_line(cfg: FinetuneConfig, steps: str, blip2: bool) -> str:
    return (
        f"{steps} AdamW steps of {_step_examples(cfg)} (scene stream "
        f"`TRAIN_SEED + {cfg.seed}`), peak learning rate {cfg.lr:g} with {cfg.warmup_steps} "
        "warm-up steps and cosine decay"
        + (
            (
                f"; each scene's caption and {cfg.questions_per_image} of its questions "
                "(different kinds; loss on the answer only), its image passed once through "
                f"the ViT and Q-Former for all {1 + cfg.questions_per_image} rows, and the "
                "rows packed into one language-model sequence (each row sees the image "
                "tokens and itself)"
                if cfg.questions_per_image
                else f"; {cfg.caption_fraction:.0%} captions, the rest questions with the "
                "loss on the answer only"
            )
            + (
                f" (question kinds weighted {cfg.question_weights}, others 1)"
                if cfg.question_weights
                else ""
            )
            + (
                "; each question in a random prompt form (`Question: q Answer:`, "
                "`q Answer: ` or the bare question, in random case with zero to two "
                "trailing spaces), and half the captions asked for by an open question "
                '("what is in the picture?" and paraphrases, in such a form)'
                if cfg.prompt_forms
                else ""
            )
            if blip2
            else "; language-modelling loss on the caption"
        )
        + (
            "; the image encoder (ViT) was copied from the trained `demo` model and kept "
            "frozen, as BLIP-2 keeps its pretrained image encoder frozen"
            if cfg.vision_init
            else "; the image encoder kept frozen"
            if cfg.freeze_vision
            else ""
        )
        + (
            "; the Q-Former's layers were initialised from the `demo` model's text decoder "
            "layers (as BLIP-2 initialises its Q-Former from BERT)"
            if cfg.qformer_init
            else ""
        )
    )


def model_card(recipe: Recipe, configs: list[FinetuneConfig], result: dict[str, object]) -> str:
    heldout = result["heldout"]
    assert isinstance(heldout, dict)
    cfg = configs[0]  # the stage that built the model: its shape
    blip2 = cfg.init == INIT_BLIP2
    size = sum(f.stat().st_size for f in (MODELS_DIR / recipe.name).glob("*.safetensors"))
    if len(configs) == 1:
        training = f"- Training: {_stage_line(cfg, str(result['steps']), blip2)}."
    else:
        training = f"- Training, {result['steps']} steps in {len(configs)} stages:" + "".join(
            f"\n  {i}. {_stage_line(c, str(c.max_steps), blip2)}"
            + ("" if i == 1 else ", starting from the previous stage's model")
            + "."
            for i, c in enumerate(configs, start=1)
        )
    lines = [
        f"# blipserve `{recipe.name}`: {recipe.title}",
        "",
        "**This model only knows synthetic scenes**: one to three circles, squares and "
        "triangles (red, green, blue, yellow, purple; small or large) on a plain grey "
        "background, 64x64 pixels (see `blipserve/finetune/scenes.py`).  It was trained from "
        "scratch on those scenes alone; on photographs or any other image its output is "
        "meaningless.  It exists so that blipserve runs, and can be tested, offline.",
        "",
        f"- Architecture: `{recipe.model_class}` "
        f"({int(str(result['parameters'])) / 1e6:.2f}M parameters, "
        f"{size / 1e6:.1f} MB of float32 safetensors), width {cfg.hidden_size}, "
        f"{cfg.vision_layers} ViT layers on {cfg.patch_size} px patches, "
        f"{cfg.text_layers} text layers"
        + (
            f", {cfg.qformer_layers} Q-Former layers, {cfg.num_query_tokens} query tokens"
            if blip2
            else ""
        )
        + "; a word-level WordPiece tokenizer over the scene grammar.",
        training,
        f"- Made by: `{COMMAND}` (trains both demo models; this one is "
        f"`python -m blipserve.demo.train_models {recipe.name}`), under `nice -n 19`.",
        f"- Training time: {float(str(result['train_seconds'])) / 60:.1f} minutes of "
        f"optimizer steps (summed over stages and resumed runs; "
        f"{float(str(result['wall_seconds'])) / 60:.1f} minutes wall clock for the last "
        f"run, with evaluation) on {hardware()}, "
        f"{cfg.num_threads} torch thread{'s' if cfg.num_threads != 1 else ''}.",
        "",
        f"## Held-out accuracy ({HELDOUT_SCENES} fresh scenes, seed `HELDOUT_SEED`)",
        "",
        "Greedy decoding through `AutoProcessor` + `generate`, exact match after lowercasing "
        "and collapsing spaces, and corpus BLEU-4:",
        "",
        "| what | examples | exact match | BLEU-4 |",
        "|---|---|---|---|",
    ]
    rows = [("captions", "caption"), ("answers", "answer")] if "caption_n" in heldout else []
    if rows:
        for label, key in rows:
            # (BLEU-4 means nothing for one- and two-word answers)
            bleu = f"{heldout[f'{key}_bleu4']:.3f}" if key == "caption" else "n/a"
            lines.append(
                f"| {label} | {int(heldout[f'{key}_n'])} | {heldout[f'{key}_exact']:.1%} | {bleu} |"
            )
    else:
        lines.append(
            f"| captions | {int(heldout['n'])} | {heldout['exact']:.1%} | {heldout['bleu4']:.3f} |"
        )
    by_kind = {
        k.split("/", 1)[1]: v
        for k, v in heldout.items()
        if k.startswith("answer_exact/") and not k.startswith("answer_exact/form:")
    }
    if by_kind:
        lines += [
            "",
            "Answers by kind of question: "
            + ", ".join(f"{kind} {value:.1%}" for kind, value in by_kind.items())
            + ".",
        ]
    lines += _form_table(heldout)
    lines += [
        "",
        "Measured with `blipserve.finetune.evaluate.evaluate_folder(folder, scenes_n=500)`.",
        "",
        "## Use",
        "",
        recipe.usage,
        "",
    ]
    return "\n".join(lines)


_FORM_ROWS = (
    ("form:question", "`Question: q Answer:`", "Question: what color is the circle? Answer:"),
    ("form:answer", "`q Answer: `", "What color is the circle? Answer: "),
    ("form:bare", "the bare question `q`", "what color is the circle?"),
)


def _form_table(heldout: dict[str, float]) -> list[str]:
    """Answers by prompt form, as :func:`evaluate.score_forms` measures them."""
    if "answer_exact/form:bare" not in heldout:
        return []
    lines = [
        "",
        "The same questions in each prompt form clients send (each prompt in a seeded "
        "random case, with zero to two trailing spaces), and one open question per scene "
        '("what is in the picture?" and paraphrases, in a random form), whose answer is '
        "the caption:",
        "",
        "| prompt form | e.g. | examples | exact match |",
        "|---|---|---|---|",
    ]
    for key, label, example in _FORM_ROWS:
        lines.append(
            f"| {label} | `{example}` | {int(heldout[f'answer_n/{key}'])} "
            f"| {heldout[f'answer_exact/{key}']:.1%} |"
        )
    lines.append(
        f"| open question, answered with the caption | `What is in the picture? Answer: ` "
        f"| {int(heldout['open_n'])} | {heldout['open_exact']:.1%} |"
    )
    return lines
