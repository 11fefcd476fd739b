"""The benchmark's baseline: what the Azure ML catalog's scoring wrapper does for BLIP.

Per request, one at a time (a lock around the whole request, one uvicorn worker): decode
the base64 images with PIL, ``processor(images=..., return_tensors="pt")``,
``model.generate(**inputs, **params)``, ``processor.batch_decode(...,
skip_special_tokens=True)``; float32, no batching across requests.  Same JSON contract as
blipserve for what the benchmark sends: ``POST /score`` with
``{"input_data": {"columns": ["image"], "data": [["<base64>"]]}, "params": {...}}``
answers ``[{"text": "..."}]``; ``GET /ready`` answers 200 (the model is loaded and warmed
up before the server starts listening).  Only the uvicorn runner is blipserve's
(:class:`~blipserve.server.run.PortFileServer`: the port file, exit 0 on SIGTERM), so the
benchmark starts and stops both servers alike; no blipserve code handles a request.

    .venv/bin/python bench/baseline_server.py --model FOLDER --port 0 --port-file PATH
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from typing import Any

import torch
import transformers
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from transformers import AutoConfig, AutoProcessor

from blipserve.server.run import PortFileServer

# The generation parameters the catalog passes through to ``generate``.
GENERATE_PARAMS = {"max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature"}


class Model:
    def __init__(self, folder: str) -> None:
        architecture = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
        model_cls: Any = getattr(transformers, architecture)
        self.processor: Any = AutoProcessor.from_pretrained(folder)
        self.model: Any = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def caption(self, images_b64: list[str], params: dict[str, Any]) -> list[str]:
        with self.lock:
            images = [
                Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB") for b64 in images_b64
            ]
            inputs = self.processor(images=images, return_tensors="pt")
            out = self.model.generate(**inputs, **params)
            texts: list[str] = self.processor.batch_decode(out, skip_special_tokens=True)
            return texts


def create_app(model: Model) -> FastAPI:
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            table = body["input_data"]
            column = table["columns"].index("image")
            images = [row[column] for row in table["data"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise HTTPException(400, f"bad input_data: {exc!r}") from None
        params = {k: v for k, v in (body.get("params") or {}).items() if k in GENERATE_PARAMS}
        # A sync call in a worker thread, as a sync scoring function runs; the lock makes
        # requests run one at a time.
        texts = await run_in_threadpool(model.caption, images, params)
        return JSONResponse([{"text": t} for t in texts])

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="save_pretrained folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    started = time.perf_counter()
    model = Model(args.model)
    loaded = time.perf_counter()
    # Warm up (the first generate is slower: lazy initialisation, allocator).
    warm = Image.new("RGB", (64, 48), (128, 128, 128))
    buf = io.BytesIO()
    warm.save(buf, format="JPEG")
    model.caption([base64.b64encode(buf.getvalue()).decode()], {"max_new_tokens": 5})
    print(
        f"baseline: loaded {args.model} in {loaded - started:.1f} s, warm-up "
        f"{time.perf_counter() - loaded:.1f} s, torch threads {torch.get_num_threads()}, "
        f"dtype {next(model.model.parameters()).dtype}",
        flush=True,
    )
    config = uvicorn.Config(
        create_app(model),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        workers=1,
    )
    PortFileServer(config, args.port_file).run()


if __name__ == "__main__":
    main()
