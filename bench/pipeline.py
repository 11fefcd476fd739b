"""``blipserve batch``'s pipeline around a model of fixed cost: how close it keeps a fast
model to busy.

A GPU that captions 1,000 images/s takes 64 ms a 64-row chunk; everything else a batch job
does (reading files, decoding, journaling, writing) must hide behind that.  This runs the
real job (:class:`~blipserve.batch.runner.BatchJob`, a folder of JPEGs of scikit-image
photographs, a CSV output) over a stand-in model that takes ``--model-ms`` a chunk and
reports images/s and the share of the time the model was busy.  Stand-ins:

* ``sleep``: waits without the GIL or a core, as a GPU model whose thread only waits;
* ``gil``: spins in Python, holding the GIL, as eager decoding on a GPU does (Python
  launching kernels).

A/B variants, alternated run by run (``--repeats``), each against the default:

* ``commit-inline``: journal each chunk on the job's thread, as before CommitBehind;
* ``decode-processes``: decode in 2 worker processes (the decoded pixels come back through
  a pipe) instead of on the decode threads.

    .venv/bin/python bench/pipeline.py --size 640x480 --images 1024 --repeats 3
    .venv/bin/python bench/pipeline.py --images 16 --size 64x48 --repeats 1 --model-ms 5 \
        --chunk 4 --models sleep --out /tmp/q.json                  # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import machine_info, sample_images

from blipserve import images
from blipserve.batch import runner
from blipserve.batch.runner import BatchJob, BatchOptions
from blipserve.config import EngineConfig, ImageLimits
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction

VARIANTS = ("default", "commit-inline", "decode-processes")


class StandIn:
    """A model adapter whose every call takes ``seconds`` (``how``: ``sleep`` or ``gil``)
    and answers ``a caption``; ``busy`` adds up the time spent in calls."""

    kind: ClassVar[str] = "stand-in"
    text_role: ClassVar[str] = "prompt"
    text_required: ClassVar[bool] = False
    image_size = 384  # (BLIP-base's: draft decoding as for it)
    device = torch.device("cpu")
    dtype = torch.float32
    source = "stand-in"
    vision_backend = "torch"
    static_cache = False
    build = ()
    default_max_new_tokens = 20

    def __init__(self, seconds: float, how: str) -> None:
        self.seconds, self.how, self.busy = seconds, how, 0.0

    def check_row(self, item: ModelInput) -> None:
        pass

    def batch_key(self, item: ModelInput) -> Hashable:
        return ()

    def check_params(self, params: GenerationParams) -> None:
        pass

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        start = time.perf_counter()
        if self.how == "gil":
            while time.perf_counter() - start < self.seconds:
                pass
        else:
            time.sleep(self.seconds)
        self.busy += time.perf_counter() - start
        return [Prediction("a caption", tokens=2) for _ in items]

    def count_tokens(self, text: str | None) -> int:
        return 0

    def question_prompt(self, question: str) -> str:
        return question

    def chat_prompt(self, question: str | None, history: Any) -> str | None:
        return question


def _decode(data: bytes, limits: ImageLimits, target_size: int | None) -> Any:
    return images.decode_image(data, limits, target_size)  # (in a worker process)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The job as it runs by default, or with one part done the other way."""
    if name == "commit-inline":

        def inline(job: BatchJob) -> Any:
            try:
                chunks = runner.records_of(job.engine, job.todo(), job.options, job.filter_engine)
                with contextlib.closing(chunks):
                    for records in chunks:
                        job.commit(records)
            finally:
                job.close()
            return job.finish()

        saved: Callable[..., Any] = BatchJob.run
        BatchJob.run = inline  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            BatchJob.run = saved  # type: ignore[method-assign]
    elif name == "decode-processes":
        original = images.decode_image
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(2, mp_context=context) as pool:
            list(pool.map(abs, range(4)))  # (the workers started before the clock)

            def via_pool(data: bytes, limits: ImageLimits, target_size: int | None = None) -> Any:
                return pool.submit(_decode, data, limits, target_size).result()

            images.decode_image = via_pool
            try:
                yield
            finally:
                images.decode_image = original
    else:
        yield


def run_job(
    folder: Path, seconds: float, how: str, chunk: int, store: Any = None
) -> tuple[float, float]:
    """One job over ``folder``: (images/s, share of the time the model was busy); its
    output and journal in a temporary folder, or in a fresh container of ``store`` (an
    object-store emulator on loopback: each journal commit is a PUT)."""
    model = StandIn(seconds, how)
    config = EngineConfig(max_batch_size=chunk, model_workers=1)
    with tempfile.TemporaryDirectory() as out, Engine(model, config=config) as engine:  # type: ignore[arg-type]
        where = f"{store.new_bucket()}/out.csv" if store else Path(out) / "out.csv"
        options = BatchOptions(
            input=folder,
            output=where,
            progress=False,
            chunk_rows=chunk,
            storage_options=store.storage_options if store else {},
        )
        start = time.perf_counter()
        summary = BatchJob(engine, options).run()
        wall = time.perf_counter() - start
    return summary.done / wall, model.busy / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", default="640x480", help="JPEG size, WxH")
    parser.add_argument("--model-ms", type=float, default=64.0, help="stand-in's time a chunk")
    parser.add_argument("--chunk", type=int, default=64, help="rows a chunk and a model call")
    parser.add_argument("--models", nargs="+", default=["sleep", "gil"], choices=("sleep", "gil"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--store",
        choices=("azure", "s3"),
        help="output and journal in this object-store emulator (Azurite, moto), on loopback",
    )
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="blipserve-pipeline-"))
    store = None
    if args.store:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import stores  # the tests' emulators (Azurite, moto's S3 server)

        (folder / "store").mkdir()
        store = stores.start_emulator(args.store, folder / "store")
    try:
        import base64

        for i, text in enumerate(sample_images(args.images, (width, height))):
            (folder / f"{i:06d}.jpg").write_bytes(base64.b64decode(text))
        report: dict[str, Any] = {"machine": machine_info(), "args": vars(args) | {"out": None}}
        results = []
        for how in args.models:
            names = ("default", *args.variants)
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for _ in range(args.repeats):  # alternating, run by run
                for name in runs:
                    with variant(name):
                        runs[name].append(
                            run_job(folder, args.model_ms / 1000, how, args.chunk, store)
                        )
            for name, got in runs.items():
                rates = [r for r, _ in got]
                result = {
                    "model": how,
                    "variant": name,
                    "images_per_s": statistics.median(rates),
                    "images_per_s_runs": rates,
                    "busy_runs": [b for _, b in got],
                }
                if name != "default":
                    ratios = [r / d for r, (d, _) in zip(rates, runs["default"], strict=True)]
                    result |= {"ratio": statistics.median(ratios), "ratio_runs": ratios}
                results.append(result)
                print(json.dumps(result), flush=True)
        report["results"] = results
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
