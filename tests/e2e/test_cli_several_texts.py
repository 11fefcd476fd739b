"""``--num-return-sequences`` and ``--no-repeat-ngram-size`` as a user types them: a real
``blipserve`` subprocess on the tiny captioner, for ``caption`` and ``batch``."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import make_image, run_cli


def test_help_shows_the_options() -> None:
    for command in ("caption", "batch"):
        seen = " ".join(run_cli(command, "--help").stdout.split())
        assert "--num-return-sequences NUM_RETURN_SEQUENCES" in seen
        assert "--no-repeat-ngram-size NO_REPEAT_NGRAM_SIZE" in seen
    assert "--sidecar-captions {best,all}" in " ".join(run_cli("batch", "--help").stdout.split())


def test_caption_prints_every_text_best_first(
    tiny_model_dir: dict[str, Path], tmp_path: Path
) -> None:
    image = tmp_path / "x.png"
    make_image(2).save(image)
    model = ["--model", str(tiny_model_dir["blip-caption"]), "--max-new-tokens", "4"]
    beams = [*model, "--num-beams", "3"]
    out = run_cli("caption", str(image), *beams, "--num-return-sequences", "3", "--json")
    assert out.returncode == 0, out.stderr
    [answer] = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(set(answer["texts"])) == 3
    assert answer["texts"][0] == answer["text"]

    plain = run_cli("caption", str(image), *beams, "--num-return-sequences", "3")
    assert plain.stdout.splitlines() == answer["texts"]  # one a line
    single = run_cli("caption", str(image), *beams, "--no-repeat-ngram-size", "2")
    assert single.returncode == 0, single.stderr
    assert len(single.stdout.splitlines()) == 1


def test_bad_values_name_the_option(tiny_model_dir: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    make_image(2).save(image)
    model = ["--model", str(tiny_model_dir["blip-caption"])]
    out = run_cli("caption", str(image), *model, "--num-return-sequences", "17")
    assert out.returncode == 2
    assert "generation options.num_return_sequences: Input should be less than or equal to 16" in (
        out.stderr
    )
    out = run_cli("caption", str(image), *model, "--num-return-sequences", "3", "--num-beams", "2")
    assert out.returncode == 2
    assert "num_return_sequences (3) must not exceed num_beams (2)" in out.stderr
    out = run_cli("caption", str(image), *model, "--num-return-sequences", "2")  # greedy model
    assert out.returncode == 2
    assert "num_return_sequences (2) needs beam search" in out.stderr


def image_folder(tmp_path: Path, count: int) -> Path:
    """A folder of ``count`` PNG images, as a batch job's input."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        make_image(i).save(folder / f"p{i}.png")
    return folder


def test_batch_texts_column_and_all_captions_in_sidecars(
    tiny_model_dir: dict[str, Path], tmp_path: Path
) -> None:
    folder = image_folder(tmp_path, 2)
    out = run_cli(
        "batch",
        str(folder),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--sidecar",
        ".txt",
        "--sidecar-captions",
        "all",
        "--model",
        str(tiny_model_dir["blip-caption"]),
        "--max-new-tokens",
        "4",
        "--num-beams",
        "2",
        "--num-return-sequences",
        "2",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["texts"]) == 2
        assert (folder / row["id"]).with_suffix(".txt").read_text().splitlines() == row["texts"]


def test_batch_refuses_texts_the_model_cannot_give_before_it_starts(
    tiny_model_dir: dict[str, Path], tmp_path: Path
) -> None:
    folder = image_folder(tmp_path, 3)
    output = tmp_path / "out.jsonl"
    model = ["--model", str(tiny_model_dir["blip-caption"])]
    out = run_cli("batch", str(folder), "-o", str(output), *model, "--num-return-sequences", "2")
    assert out.returncode == 2
    # One message for the job (the model decodes greedily by default), not one per row.
    assert out.stderr.count("num_return_sequences (2) needs beam search") == 1, out.stderr
    assert not output.exists()
    assert not list(tmp_path.glob("*out.jsonl*"))  # no journal either: nothing to resume
