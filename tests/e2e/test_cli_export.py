"""``blipserve export mlflow`` as a user runs it: what it refuses, in one line, before any
model is loaded or anything written.  (Exports that succeed: tests/integration/test_mlflow.py.)"""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli


def test_help_names_the_target_and_the_models_options() -> None:
    out = run_cli("export", "mlflow", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option in ("OUTPUT_DIR", "--model", "--dtype", "--max-batch-size", "--requirement"):
        assert option in text
    assert "--bundle-code" in text
    assert "mlflow models serve" in text
    assert run_cli("export", "--help").returncode == 0
    assert "TARGET" in run_cli("export").stderr  # (a target is required)


def test_a_folder_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "MLmodel").write_text("not ours")
    out = run_cli("export", "mlflow", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"blipserve: error: {tmp_path / 'out'} exists and is not an empty folder"
    ]
    assert (tmp_path / "out" / "MLmodel").read_text() == "not ours"


def test_a_hub_id_not_in_the_cache_is_one_clear_line(tmp_path: Path) -> None:
    out = run_cli("export", "mlflow", "--model", "Salesforce/blip-not-here", str(tmp_path / "o"))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("blipserve: error: model 'Salesforce/blip-not-here' is not in the")
    assert "hf download Salesforce/blip-not-here" in line
    assert not (tmp_path / "o").exists()


def test_a_bad_option_is_refused_by_the_parser(tmp_path: Path) -> None:
    out = run_cli("export", "mlflow", "--dtype", "float64", str(tmp_path / "o"))
    assert out.returncode == 2
    assert "argument --dtype: expected one of auto, float32" in out.stderr
