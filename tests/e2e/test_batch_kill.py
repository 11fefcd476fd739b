"""SIGKILL a running `blipserve batch` at random points, rerun: every input exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import batch_command, make_image

KILLS = int(os.environ.get("BLIPSERVE_TEST_KILLS", "3"))
# The long run (-m slow, scripts/hardening.sh): at least 20 kills.
SLOW_KILLS = max(20, int(os.environ.get("BLIPSERVE_SLOW_KILLS", "20")))


def batch_cmd(model: Path, images: Path, out: Path) -> list[str]:
    return batch_command(model, images, out, "--max-batch-size", "2", "--chunk-rows", "2")


def journal_rows(out: Path) -> int:
    journal = out.with_name(f".{out.name}.journal.jsonl")
    return journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0


@pytest.mark.parametrize(
    "kills", [KILLS, pytest.param(SLOW_KILLS, marks=pytest.mark.slow, id=f"slow-{SLOW_KILLS}")]
)
def test_kill_and_resume_exactly_once(
    tiny_model_dir: dict[str, Path], tmp_path: Path, kills: int
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        make_image(i, (32 + i % 7, 30)).save(images / f"{i:03d}.png")
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    model = tiny_model_dir["blip-caption"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = tmp_path / "reference.jsonl"
    subprocess.run(
        batch_cmd(model, images, reference), env=env, check=True, timeout=300, capture_output=True
    )
    expected = sorted(reference.read_text().splitlines())

    out = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    for _ in range(kills):
        before = journal_rows(out)
        proc = subprocess.Popen(
            batch_cmd(model, images, out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # kill once it has made some progress (or at a random moment while loading)
        target = before + rng.randint(0, 8)
        deadline = time.monotonic() + 120
        while journal_rows(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    final = subprocess.run(
        batch_cmd(model, images, out), env=env, timeout=300, capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)) == 61
    assert sorted(lines) == expected
