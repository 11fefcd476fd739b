"""Where a caption's time goes inside blipserve's engine: a stage breakdown of one engine
pass, for every benchmark results file (issue 34: "so the next gap is visible").

:class:`StageClock` times, while it is open, the parts of an adapter's ``predict`` by
wrapping them (the adapter's and its model's methods, forward hooks on its modules; all
taken off again on exit):

* ``pixels``: the image processor's resize and normalisation (``adapter.pixel_values``);
* ``vision``: the vision encoder (``vision_model``, on torch or OpenVINO);
* ``qformer``: BLIP-2's and InstructBLIP's Q-Former;
* ``first_step``: the text decoder's first call of each ``generate`` (the prompt, and BLIP's
  image keys and values);
* ``steps``: its later calls, one a token (``steps_count`` says how many);
* ``generate_overhead``: ``generate``'s own time around those calls (logits processing,
  stopping criteria, cache bookkeeping, Python);
* ``predict_other``: the rest of ``predict`` (tokenizing prompts, decoding texts);
* ``engine``: the pass's wall time outside ``predict`` (queueing, the decode workers' JPEG
  decoding not hidden behind the model, results); ``None`` where several model workers
  ran ``predict`` at once (``model_threads``): the stages are then thread time, and add up
  to more than the wall time.

Each figure is milliseconds per image of the pass (sums over calls, divided by its images).
For generating families on a CPU: on a GPU the hooks do not synchronise, so a stage's
kernels may be counted in the next one; an encoder-decoder language model's encoder (T5)
and BLIP VQA's question encoder run inside ``generate`` outside any hook, so they count as
``generate``'s own; matching heads never call ``generate``.
JPEG decoding runs on the engine's decode workers beside the model; its cost alone is timed
apart (:func:`decode_ms`).  The clock's own cost: two ``perf_counter`` calls per module call.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

_DECODERS = ("text_decoder", "language_model")  # BLIP's; BLIP-2's and InstructBLIP's


class StageClock:
    """Times the stages of ``adapter.predict`` while open (see the module docstring)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.overlap: dict[str, int] = defaultdict(int)  # most calls of a stage at once
        self._running: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._local = threading.local()  # per model thread: the decoder's calls this generate
        self._stack = ExitStack()

    def __enter__(self) -> StageClock:
        try:
            self._install()
        except BaseException:
            self._stack.close()  # (what was installed already comes off again)
            raise
        return self

    def _install(self) -> None:
        model = self.adapter.model
        self._wrap(self.adapter, "predict", "predict")
        self._wrap(self.adapter, "pixel_values", "pixels")
        self._wrap(model, "generate", "generate", on_start=self._new_generate)
        for attribute, stage in (("vision_model", "vision"), ("qformer", "qformer")):
            module = getattr(model, attribute, None)
            if module is not None:
                self._hook(module, lambda _stage=stage: _stage)  # type: ignore[misc]
        decoder = next((getattr(model, n) for n in _DECODERS if hasattr(model, n)), None)
        if decoder is not None:
            self._hook(decoder, self._decoder_stage)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _new_generate(self) -> None:
        self._local.calls = 0

    def _decoder_stage(self) -> str:
        calls = getattr(self._local, "calls", 0)
        self._local.calls = calls + 1
        return "first_step" if calls == 0 else "steps"

    def _wrap(
        self, owner: Any, name: str, stage: str, on_start: Callable[[], None] | None = None
    ) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if on_start is not None:
                on_start()
            with self._lock:
                self._running[stage] += 1
                self.overlap[stage] = max(self.overlap[stage], self._running[stage])
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self._running[stage] -= 1
                    self.seconds[stage] += time.perf_counter() - start
                    self.counts[stage] += 1

        owned = name in vars(owner)
        setattr(owner, name, timed)  # (an instance attribute, over the class's method)
        self._stack.callback(
            (lambda: setattr(owner, name, original)) if owned else (lambda: delattr(owner, name))
        )

    def _hook(self, module: Any, stage_of: Callable[[], str]) -> None:
        starts = threading.local()

        def before(_module: Any, _args: Any) -> None:
            starts.stage, starts.t = stage_of(), time.perf_counter()

        def after(_module: Any, _args: Any, _out: Any) -> None:
            with self._lock:
                self.seconds[starts.stage] += time.perf_counter() - starts.t
                self.counts[starts.stage] += 1

        for handle in (
            module.register_forward_pre_hook(before),
            module.register_forward_hook(after),
        ):
            self._stack.callback(handle.remove)

    def report(self, images: int, wall_s: float) -> dict[str, float | None]:
        """Milliseconds per image of each stage, for a pass of ``images`` in ``wall_s``."""
        s = self.seconds
        inner = s["vision"] + s["qformer"] + s["first_step"] + s["steps"]
        parts = {
            "pixels": s["pixels"],
            "vision": s["vision"],
            "qformer": s["qformer"],
            "first_step": s["first_step"],
            "steps": s["steps"],
            "generate_overhead": s["generate"] - inner,
            "predict_other": s["predict"] - s["generate"] - s["pixels"],
        }
        out: dict[str, float | None] = {
            f"{k}_ms": 1000 * v / images for k, v in parts.items() if k != "qformer" or v
        }
        # With several model workers their calls overlap: the stages are then thread time
        # (they add up to more than the wall time) and the engine's share is not defined.
        threads = self.overlap["predict"]
        out["engine_ms"] = 1000 * (wall_s - s["predict"]) / images if threads <= 1 else None
        out["wall_ms"] = 1000 * wall_s / images
        out["model_threads"] = threads
        out["steps_count"] = self.counts["steps"]
        out["generate_calls"] = self.counts["generate"]
        return out


def decode_ms(b64_rows: list[str], side: int) -> float:
    """Milliseconds per image to decode ``b64_rows`` (base64 JPEGs) as the engine's decode
    workers do (:func:`blipserve.images.load_image`: base64, JPEG, shrunk towards
    ``side``), alone on one thread."""
    from blipserve.config import ImageLimits
    from blipserve.images import load_image

    limits = ImageLimits()
    start = time.perf_counter()
    for row in b64_rows:
        load_image(row, limits=limits, fetcher=None, target_size=side)
    return 1000 * (time.perf_counter() - start) / len(b64_rows)
