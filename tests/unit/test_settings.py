"""One composite configuration: each field's flag, variable and default declared once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from blipserve.batch.options import BatchOptions
from blipserve.cli.parser import COMMAND_PARTS, MODEL_PARTS, build_parser, settings_from_args
from blipserve.config import (
    PARTS,
    BatchConfig,
    FailureLimit,
    ModelConfig,
    ServerConfig,
    Settings,
)
from blipserve.config.fields import env_name, flag_name, takes_flag
from blipserve.errors import InvalidInput


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(list(argv)))


def test_each_variable_and_flag_names_one_field() -> None:
    envs: dict[str, str] = {}
    flags: dict[str, str] = {}
    for part, kind in PARTS.items():
        for f in dataclasses.fields(kind):
            where = f"{part}.{f.name}"
            key = env_name(f)
            if key is not None:
                assert key not in envs, f"{key}: {envs.get(key)} and {where}"
                envs[key] = where
            assert flag_name(f) not in flags, f"{flag_name(f)}: {flags.get(flag_name(f))}, {where}"
            flags[flag_name(f)] = where
    assert envs["BLIPSERVE_CHUNK_ROWS"] == "batch.chunk_rows"
    assert envs["BLIPSERVE_CONCURRENCY"] == "ray.concurrency"
    assert "BLIPSERVE_OUTPUT" not in envs  # a job's own output is never taken from the env


@pytest.mark.parametrize("command", ["caption", "serve", "batch"])
def test_help_marks_exactly_the_options_with_a_variable(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for part in COMMAND_PARTS.get(command, MODEL_PARTS):
        for f in dataclasses.fields(PARTS[part]):
            key = env_name(f)
            if not takes_flag(f, command):  # another command's option, in a shared part
                assert f"{flag_name(f)} " not in text
                continue
            assert flag_name(f) in text
            if key is not None:
                assert f"[env: {key}]" in text
            else:
                assert f"BLIPSERVE_{f.name.upper()}" not in text


def test_environment_is_read_when_settings_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPSERVE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("BLIPSERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("BLIPSERVE_WARMUP", "off")
    settings = Settings.build()
    assert settings.engine.max_batch_size == 3
    assert settings.server.api_keys == ("k1", "k2")
    assert settings.server.warmup is False
    monkeypatch.setenv("BLIPSERVE_MAX_BATCH_SIZE", "5")
    assert Settings.build().engine.max_batch_size == 5


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPSERVE_CHUNK_ROWS", "7")
    monkeypatch.setenv("BLIPSERVE_MAX_FAILURES", "2%")
    settings = parse("batch", "photos/", "--chunk-rows", "4", "-o", "out.jsonl")
    assert settings.batch.chunk_rows == 4
    assert settings.batch.max_failures == FailureLimit(percent=2.0)
    assert settings.batch.output == "out.jsonl"


def test_batch_and_ray_flags_come_from_their_fields() -> None:
    settings = parse(
        "batch",
        "shards/",
        "--storage-option",
        "anon=true",
        "--storage-option",
        "endpoint_url=http://127.0.0.1:9000",
        "--max-failures",
        "10",
        "--no-progress",
        "--format",
        "catalog",
        "--ray",
        "--concurrency",
        "2",
        "--num-gpus",
        "0.5",
        "--model",
        "demo-vqa",
    )
    assert settings.batch.storage_options == {
        "anon": True,
        "endpoint_url": "http://127.0.0.1:9000",
    }
    assert settings.batch.max_failures == FailureLimit(count=10)
    assert settings.batch.progress is False
    assert settings.batch.format == "catalog"
    assert (settings.ray.ray, settings.ray.concurrency, settings.ray.num_gpus) == (True, 2, 0.5)
    assert settings.model.model == "demo-vqa"


def test_metavars_read_as_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["batch", "--help"])
    text = capsys.readouterr().out
    assert "--model MODEL " in text
    assert "--max-failures N|N%" in text
    assert "--dtype {auto,float32,bfloat16,float16,int8}" in text
    assert "." not in text.split("--model ")[1].split()[0]


def test_a_job_takes_the_batch_defaults_declared_once(tmp_path: Path) -> None:
    options = BatchOptions(input=tmp_path)
    defaults = BatchConfig()
    for f in dataclasses.fields(BatchConfig):
        assert getattr(options, f.name) == getattr(defaults, f.name), f.name
    assert parse("batch", str(tmp_path)).batch == defaults


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BLIPSERVE_MAX_BATCH_SIZE": "many"}, "BLIPSERVE_MAX_BATCH_SIZE: expected an integer"),
        ({"BLIPSERVE_DTYPE": "int4"}, "BLIPSERVE_DTYPE: expected one of auto, float32"),
        ({"BLIPSERVE_WARMUP": "maybe"}, "BLIPSERVE_WARMUP: expected true or false"),
        ({"BLIPSERVE_MAX_FAILURES": "lots"}, "BLIPSERVE_MAX_FAILURES: --max-failures wants"),
        ({"BLIPSERVE_CHUNK_ROWS": "0"}, "chunk_rows and read_workers must be at least 1"),
        ({"BLIPSERVE_CONCURRENCY": "0"}, "concurrency must be at least 1"),
    ],
)
def test_a_bad_variable_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Settings.build(env)


def test_a_bad_flag_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["batch", "x/", "--chunk-rows", "lots"])
    assert exited.value.code == 2
    assert "argument --chunk-rows: expected an integer, got 'lots'" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="--storage-option wants KEY=VALUE"):
        parse("batch", "x/", "--storage-option", "anon")


def test_a_command_ignores_variables_of_parts_it_does_not_use() -> None:
    # Kubernetes sets BLIPSERVE_PORT=tcp://... for a Service named blipserve
    env = {"BLIPSERVE_PORT": "tcp://10.0.0.7:8000", "BLIPSERVE_MODEL": "demo-vqa"}
    settings = Settings.build(env, parts=MODEL_PARTS)
    assert settings.model.model == "demo-vqa"
    assert settings.server == ServerConfig()
    with pytest.raises(InvalidInput, match="BLIPSERVE_PORT"):
        Settings.build(env)


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.build(
        {}, server={"api_keys": ("s3cret",)}, batch={"storage_options": {"account_key": "k3y"}}
    )
    assert "s3cret" not in repr(settings)
    assert "k3y" not in repr(settings)
    assert settings.model == ModelConfig()
