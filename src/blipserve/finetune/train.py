"""The training loop: AdamW with warm-up and cosine decay, periodic evaluation, resumable
checkpoints, and a final folder in ``save_pretrained`` layout.

Checkpoints live in ``<checkpoint_dir>/step-<N>/``: the model and processor saved with
``save_pretrained`` (safetensors) plus ``trainer_state.pt`` (optimizer, scheduler, step,
RNG).  They are written to a temporary folder and renamed, so a run killed at any moment
leaves only whole checkpoints; ``finetune`` with ``resume`` picks up the newest one and
continues with the very examples the interrupted run would have seen next.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from blipserve.finetune.build import Bundle, count_parameters, load_bundle, make_bundle
from blipserve.finetune.collate import collate
from blipserve.finetune.config import FinetuneConfig
from blipserve.finetune.data import Source, make_source
from blipserve.finetune.evaluate import eval_examples, score

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "finetune_summary.json"


def finetune(cfg: FinetuneConfig) -> Path:
    """Train as ``cfg`` says and return the folder holding the final model."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    from blipserve.models.precision import resolve_device

    device = resolve_device(cfg.device)
    checkpoint = latest_checkpoint(cfg.checkpoints) if cfg.resume else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
        bundle = load_bundle(str(checkpoint))
    else:
        bundle = make_bundle(cfg)
    model = bundle.model.to(device)
    trainable = _set_trainable(bundle, cfg)
    source = make_source(
        cfg.data,
        family=bundle.family,
        seed=cfg.seed,
        caption_fraction=cfg.caption_fraction,
        kind_weights=cfg.kind_weights(),
        questions_per_image=cfg.questions_per_image,
        prompt_forms=cfg.prompt_forms,
    )
    total = total_steps(cfg, source)
    optimizer = _optimizer(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    state: dict[str, Any] = {"step": 0, "train_seconds": 0.0, "history": []}
    if checkpoint is not None:
        saved = torch.load(checkpoint / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = {k: saved[k] for k in ("step", "train_seconds", "history")}
        _warn_if_changed(saved.get("recipe"), _recipe(cfg), checkpoint)
    else:
        torch.manual_seed(cfg.seed)
    log.info(
        "%s: %.2fM parameters (%.2fM trained), %d steps of %d on %s",
        bundle.family,
        count_parameters(model) / 1e6,
        sum(p.numel() for p in trainable) / 1e6,
        total,
        cfg.batch_size,
        device,
    )
    evaluation = eval_examples(cfg.eval_data, cfg.eval_examples, bundle.family)
    _loop(bundle, cfg, source, optimizer, scheduler, state, total, evaluation, device)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_pretrained(bundle, out)
    final = state["history"][-1] if state["history"] else {}
    summary = {
        "steps": state["step"],
        "batch_size": cfg.batch_size,
        "train_seconds": round(state["train_seconds"], 1),
        "parameters": count_parameters(model),
        "final_eval": final,
        "config": cfg.to_dict(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("saved %s", out)
    return out


def total_steps(cfg: FinetuneConfig, source: Source) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    if source.size is None:
        raise ValueError("an endless data source needs max_steps")
    return max(1, math.ceil(cfg.epochs * source.size / cfg.batch_size))


def _loop(
    bundle: Bundle,
    cfg: FinetuneConfig,
    source: Source,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    total: int,
    evaluation: list[Any],
    device: torch.device,
) -> None:
    # tqdm comes with huggingface-hub; imported by name so that type-checking does not
    # depend on whether its stubs are installed.
    tqdm: Any = importlib.import_module("tqdm").tqdm

    model = bundle.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=total,
        initial=state["step"],
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=5.0,
        dynamic_ncols=True,
    )
    smooth: float | None = None
    window_start, window_samples = time.perf_counter(), 0
    while state["step"] < total:
        step_start = time.perf_counter()
        first = state["step"] * cfg.batch_size  # stateless: the same examples after a resume
        batch = [source.example(first + j) for j in range(cfg.batch_size)]
        inputs = {k: v.to(device) for k, v in collate(bundle, batch).items()}
        loss = _loss(model, inputs)
        torch.autograd.backward(loss)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["train_seconds"] += time.perf_counter() - step_start
        value = float(loss.detach())
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        window_samples += cfg.batch_size
        elapsed = time.perf_counter() - window_start
        bar.update(1)
        bar.set_postfix(
            loss=f"{smooth:.4f}",
            samples_s=f"{window_samples / max(elapsed, 1e-9):.0f}",
            lr=f"{scheduler.get_last_lr()[0]:.2e}",
            refresh=False,
        )
        if elapsed > 60:  # samples/s over the last minute or so, not since the start
            window_start, window_samples = time.perf_counter(), 0
        step = state["step"]
        done = step == total
        if evaluation and ((cfg.eval_every and step % cfg.eval_every == 0) or done):
            metrics = score(bundle, evaluation, max_new_tokens=cfg.max_new_tokens)
            record = {"step": step, "loss": round(smooth, 5), **_rounded(metrics)}
            state["history"].append(record)
            log.info("eval %s", json.dumps(record))
            model.train()
        if (cfg.save_every and step % cfg.save_every == 0) or done:
            save_checkpoint(bundle, cfg, optimizer, scheduler, state)
    bar.close()


def _loss(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's loss; rows that share an image (``image_index``) share its features.

    BLIP-2's ``forward`` takes precomputed image features (``mm_encoder_outputs``) in place
    of ``pixel_values``: each distinct image goes through the vision encoder and Q-Former
    once, and every row gets its image's query outputs (gradients from all of its rows
    add up in the Q-Former).
    """
    index = inputs.pop("image_index", None)
    if index is None:
        return cast(torch.Tensor, model(**inputs).loss)
    features = model.get_image_features(inputs.pop("pixel_values"), return_dict=True)
    # (images, Q, D) -> (rows, Q, D): what forward scatters into each row's image tokens
    features.pooler_output = features.pooler_output.index_select(0, index)
    out = model(pixel_values=None, mm_encoder_outputs={"image": features}, **inputs)
    return cast(torch.Tensor, out.loss)


# Fields that change what is trained; the rest (threads, eval, paths) may change on resume.
_RECIPE_FIELDS = (
    "data",
    "init",
    "max_steps",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "seed",
    "freeze_language_model",
    "freeze_vision",
    "caption_fraction",
    "question_weights",
    "questions_per_image",
    "prompt_forms",
    "vision_init",
    "qformer_init",
)


def _recipe(cfg: FinetuneConfig) -> dict[str, Any]:
    values = cfg.to_dict()
    return {k: values[k] for k in _RECIPE_FIELDS}


def _warn_if_changed(saved: Any, current: dict[str, Any], checkpoint: Path) -> None:
    if not isinstance(saved, dict):
        return
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        log.warning(
            "resuming %s with a different recipe (%s); delete the checkpoint folder to start over",
            checkpoint,
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
        )


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def _set_trainable(bundle: Bundle, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_language_model:
        if bundle.family != "blip2":
            raise ValueError("freeze_language_model applies to BLIP-2 models only")
        for p in model.language_model.parameters():
            p.requires_grad_(False)
    if cfg.freeze_vision:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.AdamW:
    # No weight decay on biases, norms and other vectors (the usual transformer recipe).
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _schedule(cfg: FinetuneConfig, total: int) -> Any:
    warmup = min(cfg.warmup_steps, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return factor


# --- checkpoints --------------------------------------------------------------------


def _save_pretrained(bundle: Bundle, folder: Path) -> None:
    bundle.model.save_pretrained(folder, safe_serialization=True)
    bundle.processor.save_pretrained(folder)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, if any."""
    if not root.is_dir():
        return None
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(
    bundle: Bundle,
    cfg: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
) -> Path:
    root = cfg.checkpoints
    final = root / f"step-{state['step']}"
    tmp = root / f".step-{state['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_pretrained(bundle, tmp)
    torch.save(
        {
            "step": state["step"],
            "train_seconds": state["train_seconds"],
            "history": state["history"],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "recipe": _recipe(cfg),
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic on one file system: a checkpoint is whole or absent
    for old in sorted(
        (p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )[: -max(cfg.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final
