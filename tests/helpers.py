"""Small helpers shared by tests: images made in the test, as PNG and base64."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from testkit.photos import photos as photos  # (the tests import it from here)


def make_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A reproducible RGB image with some structure (random blocks)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1), dtype=np.uint8))
    return Image.fromarray(pixels[: size[1], : size[0]])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(seed: int = 0, *, lines: bool = False) -> str:
    data = png_bytes(make_image(seed))
    return (base64.encodebytes(data) if lines else base64.b64encode(data)).decode()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def client_base64(data: bytes) -> str:
    """Base64 as the catalog's clients write it: ``base64.encodebytes``, line breaks and all."""
    return base64.encodebytes(data).decode()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def img2dataset_shards(folder: Path, per_shard: int = 3) -> dict[str, dict[str, Any]]:
    """Shards as img2dataset writes them: KEY.jpg, KEY.txt (alt text), KEY.json (url,
    caption, key, size) for each sample; a sample without an image in the last shard."""
    folder.mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, Any]] = {}
    imgs = list(photos().items())
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                n = shard * per_shard + i
                name, img = imgs[n % len(imgs)]
                key = f"{shard:05d}{i:04d}"
                meta = {
                    "url": f"https://example.com/{name}.jpg",
                    "caption": f"alt {name}",
                    "key": key,
                }
                add(tar, f"{key}.jpg", jpeg_bytes(img))
                add(tar, f"{key}.txt", f"a photo of {name}".encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
                samples[key] = {"image": jpeg_bytes(img), "name": name, "shard": f"{shard:05d}.tar"}
            if shard == 1:
                add(tar, "000019999.json", b'{"caption": "no image here"}')
                samples["000019999"] = {"image": None, "shard": "00001.tar"}
    return samples


def members(shard: bytes) -> dict[str, bytes]:
    """A tar shard's files: name -> bytes."""
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        return {m.name: f.read() for m in tar if m.isfile() and (f := tar.extractfile(m))}


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Put ``files`` (relative name -> bytes) under the folder ``root``; returns it."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def batch_command(model: Path, images: str | Path, out: str | Path, *flags: str) -> list[str]:
    """``blipserve batch IMAGES -o OUT --model MODEL`` as a subprocess argv: short captions
    (4 tokens), no progress bar, plus ``flags``."""
    return [
        *(sys.executable, "-m", "blipserve.cli", "batch", str(images), "-o", str(out)),
        *("--model", str(model), "--max-new-tokens", "4", "--no-progress", *flags),
    ]


def score_body(
    rows: list[list[Any]], columns: list[str] | None = None, **params: Any
) -> dict[str, Any]:
    """A catalog ``/score`` body: ``rows`` under ``columns`` (default: image), ``params``."""
    body: dict[str, Any] = {
        "input_data": {
            "columns": columns or ["image"],
            "index": list(range(len(rows))),
            "data": rows,
        }
    }
    if params:
        body["params"] = params
    return body


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``blipserve ARGS`` as a user runs it: a real subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "blipserve.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=120,
    )
