"""`blipserve batch` when its output cannot be written: a full disk, a path under a file.

A full disk is simulated with ``RLIMIT_FSIZE`` in the child process: writes past the limit
fail with EFBIG ("File too large"), as they would with ENOSPC on a full disk (CPython
ignores SIGXFSZ, so the write fails instead of killing the process). Whatever fails, the
job must stop with a clear message and exit 1, leave no half-written output and no stray
temporary file, and a rerun with room must finish with every input exactly once.
(SIGKILL at random points is tests/e2e/test_batch_kill.py.)
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import batch_command, make_image

IMAGES = 24


def batch_cmd(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return batch_command(model, images, out, "--chunk-rows", "4", *extra)


def file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run(
    cmd: list[str], limit: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=file_size_limit(limit) if limit is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference_dir(images: Path) -> Path:
    return images.with_name(images.name + "-reference")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def job(
    tiny_model_dir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, list[str]]:
    """(model, images folder, the reference output's lines, sorted)."""
    images = tmp_path_factory.mktemp("images")
    for i in range(IMAGES):
        make_image(i, (32 + i % 5, 30)).save(images / f"{i:03d}.png")
    model = tiny_model_dir["blip-caption"]
    reference = reference_dir(images) / "out.jsonl"
    reference.parent.mkdir()
    done = run(batch_cmd(model, images, reference))
    assert done.returncode == 0, done.stderr
    return model, images, sorted(reference.read_text().splitlines())


def test_disk_full_while_journaling(job: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    model, images, expected = job
    out = tmp_path / "out.jsonl"
    journal = tmp_path / ".out.jsonl.journal.jsonl"
    # Room for the journal's header and a few rows, not for the whole job.
    full = run(batch_cmd(model, images, out), limit=1500)
    assert full.returncode == 1, full.stderr
    assert f"blipserve: error: cannot write {journal}: File too large" in full.stderr
    assert "Traceback" not in full.stderr
    assert not out.exists()  # no output from a job that did not finish
    assert leftovers(tmp_path) == []
    assert 0 < journal.stat().st_size <= 1500

    resumed = run(batch_cmd(model, images, out))
    assert resumed.returncode == 0, resumed.stderr
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)) == IMAGES
    assert sorted(lines) == expected


def test_disk_full_while_writing_the_output_keeps_the_old_one(
    job: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    model, images, expected = job
    out = tmp_path / "out.jsonl"
    for name in ("out.jsonl", ".out.jsonl.journal.jsonl"):  # the finished reference job
        shutil.copy(reference_dir(images) / name, tmp_path / name)
    before = out.read_bytes()
    assert len(before) > 1000
    # Rerun: every row is in the journal already; only the output is written again.
    full = run(batch_cmd(model, images, out), limit=1000)
    assert full.returncode == 1, full.stderr
    assert f"blipserve: error: cannot write {out}: File too large" in full.stderr
    assert out.read_bytes() == before  # the old output, whole
    assert leftovers(tmp_path) == []
    assert sorted(out.read_text().splitlines()) == expected


def test_output_under_a_file_is_a_clear_error(
    job: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    # chmod does not stop root; a path *under a regular file* fails for everyone (ENOTDIR).
    model, images, _ = job
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    failed = run(batch_cmd(model, images, blocker / "out.jsonl"))
    assert failed.returncode == 1, failed.stderr
    journal = blocker / ".out.jsonl.journal.jsonl"
    assert f"blipserve: error: cannot write {journal}: {blocker} is not a folder" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert blocker.read_text() == "not a folder"
