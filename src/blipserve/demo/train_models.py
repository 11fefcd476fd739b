"""Reproduce the built-in demo models: train, measure on held-out scenes, write model cards.

``python -m blipserve.demo.train_models [demo] [demo-vqa]`` (what
``scripts/train_demo_models.sh`` runs) trains each named model from scratch on fresh
synthetic scenes, saves it to ``src/blipserve/demo/models/<name>/``, scores the saved
folder on 500 held-out scenes through the standard ``AutoProcessor`` + ``generate`` path,
and writes its ``README.md``.  Checkpoints go to ``$BLIPSERVE_DEMO_WORK`` (default
``/tmp/blipserve-demo-train``), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blipserve.finetune.config import INIT_BLIP, INIT_BLIP2, FinetuneConfig

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


def _threads() -> int:
    # Two (all of a small machine) by default; 1 to train both models side by side.
    return int(os.environ.get("BLIPSERVE_DEMO_THREADS", "2"))


def _steps(default: int) -> int:
    # A shorter run (e.g. a quick smoke test of the whole pipeline); the cards record it.
    return int(os.environ.get("BLIPSERVE_DEMO_MAX_STEPS", str(default)))


def _common(out: Path, ckpt: Path) -> FinetuneConfig:
    """What both demo models share: fresh synthetic scenes, AdamW 1e-3, their shape."""
    return FinetuneConfig(
        data="synthetic",
        eval_data="synthetic",
        output_dir=str(out),
        checkpoint_dir=str(ckpt),
        batch_size=64,
        lr=1e-3,
        warmup_steps=200,
        eval_examples=200,
        save_every=250,
        num_threads=_threads(),
        hidden_size=160,
        vision_layers=4,
        text_layers=4,
        seed=0,
        max_steps=1,  # each recipe sets its own
    )


def _demo(out: Path, ckpt: Path) -> FinetuneConfig:
    return dataclasses.replace(
        _common(out, ckpt), init=INIT_BLIP, max_steps=_steps(4000), eval_every=1000
    )


def _demo_vqa(out: Path, ckpt: Path) -> FinetuneConfig:
    return dataclasses.replace(
        _common(out, ckpt),
        init=INIT_BLIP2,
        max_steps=_steps(2000),
        eval_every=250,
        warmup_steps=100,
        # As BLIP-2 starts from a frozen pretrained image encoder, this one starts from the
        # trained `demo` model's ViT and keeps it frozen: only the Q-Former, projection and
        # language model learn, which is both faster per step and far quicker to converge.
        vision_init=str(MODELS_DIR / "demo"),
        freeze_vision=True,
        # ... and, as BLIP-2 starts its Q-Former from BERT, this one starts from `demo`'s
        # text decoder, whose cross-attention already reads that ViT: in a side-by-side
        # sweep (scripts/device_check.sh train) exact captions after 1000 steps went from
        # 27% (random 2-layer Q-Former) to 52%.
        qformer_init=str(MODELS_DIR / "demo"),
        qformer_layers=4,
        num_query_tokens=16,
        # Each scene gives its caption and three questions, all answered from one pass of
        # the image through the ViT and Q-Former: 64 scenes (256 rows) a step.  Against
        # one example per scene, in the same wall time (7.4 min of steps continuing the
        # earlier model): held-out answers 86.2% vs 82.0%, "exists" 69% vs 52%.  Packed
        # into one language-model sequence per scene (collate), a step takes 0.64 s instead
        # of 0.89, so 2000 steps fit where 1350 did: answers 85.0% -> 93.1% (500 scenes).
        questions_per_image=3,
        batch_size=256,
    )


_CAPTION_USAGE = """\
```python
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration

processor = AutoProcessor.from_pretrained(folder)
model = BlipForConditionalGeneration.from_pretrained(folder)
inputs = processor(images=Image.open("scene.png").convert("RGB"), return_tensors="pt")
print(processor.decode(model.generate(**inputs)[0], skip_special_tokens=True))
# a small red circle left of a large blue square
```"""

_VQA_USAGE = """\
```python
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

processor = AutoProcessor.from_pretrained(folder)
model = Blip2ForConditionalGeneration.from_pretrained(folder)
image = Image.open("scene.png").convert("RGB")
prompt = "Question: what color is the circle? Answer:"
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]  # drop the echoed prompt
print(processor.decode(out, skip_special_tokens=True))  # red
# No text (processor(images=image)) gives a caption.
```"""

RECIPES: dict[str, Recipe] = {
    "demo": Recipe(
        "demo",
        "BLIP captioning",
        "BlipForConditionalGeneration",
        (_demo,),
        _CAPTION_USAGE,
    ),
    "demo-vqa": Recipe(
        "demo-vqa",
        "BLIP-2 (small OPT language model): captions and `Question: ... Answer:` prompts",
        "Blip2ForConditionalGeneration",
        (_demo_vqa,),
        _VQA_USAGE,
    ),
}


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


def train(name: str, work: Path) -> dict[str, object]:
    """Train model ``name`` into ``MODELS_DIR / name`` and write its model card."""
    from blipserve.finetune import finetune
    from blipserve.finetune.evaluate import evaluate_folder
    from blipserve.finetune.train import SUMMARY_FILE

    recipe = RECIPES[name]
    out = MODELS_DIR / name
    start = time.perf_counter()
    configs: list[FinetuneConfig] = []
    train_seconds, steps = 0.0, 0
    for i, stage in enumerate(recipe.stages, start=1):
        last = i == len(recipe.stages)
        # Stage 1 keeps the single-stage folder names, so old checkpoints still resume.
        ckpt = work / name if i == 1 else work / f"{name}-stage{i}"
        cfg = stage(out if last else work / f"{name}-stage{i}-model", ckpt)
        if i > 1:
            cfg = dataclasses.replace(cfg, init=configs[-1].output_dir)
        configs.append(cfg)
        finetune(cfg)
        summary = json.loads((Path(cfg.output_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
        train_seconds += float(summary["train_seconds"])
        steps += int(summary["steps"])
    wall = time.perf_counter() - start
    metrics = evaluate_folder(str(out), scenes_n=HELDOUT_SCENES)
    result: dict[str, object] = {
        "name": name,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1),
        "steps": steps,
        "parameters": summary["parameters"],
        "heldout": {k: round(v, 4) for k, v in metrics.items()},
    }
    (out / "README.md").write_text(model_card(recipe, configs, result), encoding="utf-8")
    logging.getLogger(__name__).info("%s: %s", name, json.dumps(result))
    return result


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


def main(argv: Sequence[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown demo model(s) {unknown}; choose from {list(RECIPES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(os.environ.get("BLIPSERVE_DEMO_WORK", "/tmp/blipserve-demo-train"))
    for name in names:
        train(name, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
