"""The ``blipserve`` command line: its parser, every flag derived from a configuration
field (:mod:`blipserve.config`) or a generation parameter, and the settings built from
parsed arguments.  argv is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

from blipserve.config import PARTS, Settings
from blipserve.config.fields import (
    choices,
    convert,
    env_name,
    fields_with_types,
    flag_name,
    is_flag,
    is_repeated,
    takes_flag,
)
from blipserve.errors import InvalidInput
from blipserve.params import GenerationParams

#: the settings parts each command takes flags for, and their titles in --help
TITLES = {
    "model": "model",
    "engine": "batching",
    "images": "images",
    "fetch": "image URLs",
    "server": "server",
    "batch": "batch job",
    "ray": "ray (pip install 'blipserve[ray]'; the server: 'blipserve[serve]')",
    "replicas": "ray serve replicas (with --ray)",
    "jobs": "batch endpoint (POST /jobs: batch jobs the server hosts)",
}
MODEL_PARTS = ("model", "engine", "images", "fetch")
COMMAND_PARTS = {
    "serve": (*MODEL_PARTS, "server", "ray", "replicas", "jobs", "batch"),
    "batch": (*MODEL_PARTS, "batch", "ray"),
}

EPILOG = """\
examples:
  blipserve caption examples/*.png                      # the built-in demo model, offline
  blipserve caption photo.jpg --prompt "a picture of"   # conditional caption
  blipserve ask --model demo-vqa scene.png "what color is the circle?"
  blipserve caption --model Salesforce/blip-image-captioning-base photo.jpg
  blipserve score request.json      # a catalog-format request body -> its response JSON

Options marked [env: NAME] can also be set as that environment variable (lists
comma-separated, switches true/false); a flag given on the command line wins.
"""


SERVE_EPILOG = """\
examples:
  blipserve serve                                   # demo model on http://127.0.0.1:8000
  blipserve serve --model demo-vqa --host 0.0.0.0 --api-key "$KEY"
  curl -s localhost:8000/score -H 'Content-Type: application/json' \\
       -d '{"input_data": {"columns": ["image"], "data": [["<base64>"]]}}'

Routes: POST /score, POST /v1/chat/completions, GET /v1/models, GET / (liveness),
GET /ready, GET /metrics, GET /swagger.json, GET /docs. Options marked [env: NAME] can
also be set as that environment variable (e.g. BLIPSERVE_API_KEYS=k1,k2).
"""


BATCH_EPILOG = """\
examples:
  blipserve batch photos/ -o captions.jsonl            # resumable: rerun to continue
  blipserve batch photos/ --sidecar .txt               # photo.jpg -> photo.txt
  blipserve batch photos/ -o photos/metadata.jsonl     # datasets.load_dataset("imagefolder")
  blipserve batch catalog_inputs/ -o out/predictions.csv   # the catalog's batch layout
  blipserve batch web.csv -o clean.parquet --filter-model Salesforce/blip-itm-base-coco
  blipserve batch az://data/inputs/ -o az://data/out/predictions.csv   # Azure Blob (adlfs)
  blipserve batch s3://bucket/photos/ --sidecar .txt --storage-option anon=true
  blipserve batch 'shards/{00000..00127}.tar' -o captioned/     # WebDataset, shard for shard

Object stores: az:// and abfs:// (pip install 'blipserve[azure]'), s3:// ('blipserve[s3]'),
gs:// ('blipserve[gcs]'). Credentials are read as those libraries read them (e.g.
AZURE_STORAGE_CONNECTION_STRING, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS) or
given with --storage-option; they are never printed.

Exit status: 0 when the job finished (rows that failed are recorded in the output with
their error, and counted on the last line), 3 when more rows failed than
--max-failures allows (the job stops; finished rows are kept and a rerun resumes), 2 for
invalid input or options, 1 for other errors (a store that cannot be reached, ...).
"""


FINETUNE_EPILOG = """\
examples:
  blipserve finetune --init Salesforce/blip-image-captioning-base --data my_images/ \\
      --output-dir my-blip --epochs 3 --lr 1e-5          # my_images/metadata.jsonl: file_name, text
  blipserve finetune --init config:blip2 --data synthetic --max-steps 3000 --output-dir demo-vqa
  blipserve caption --model my-blip photo.jpg            # use the result

A killed run continues from its newest checkpoint when rerun with the same command.
"""


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    title: str,
    *,
    prefix: str = "",
    command: str | None = None,
) -> None:
    """One flag per field of a config dataclass, typed and documented from the field.

    Values are stored under ``prefix + field name`` and converted by the field's own
    :func:`~blipserve.config.fields.convert`, so a flag and its environment variable take
    the same text.  With ``command``, only the fields that command takes.
    """
    group = parser.add_argument_group(title)
    for f, hint in fields_with_types(cls):
        if command is not None and not takes_flag(f, command):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = str(f.metadata.get("help", ""))
        if default not in (None, (), {}):
            help_text += f" (default: {default!r})"
        key = env_name(f)
        if key is not None:
            help_text += f" [env: {key}]"
        kwargs: dict[str, Any] = {
            "dest": prefix + f.name,
            "default": None,
            "help": help_text.replace("%", "%%"),  # argparse formats help with %
        }
        if not is_flag(hint) and not choices(hint):  # (argparse's would be "PART.NAME")
            kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
        if is_flag(hint):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_repeated(f, hint):
            kwargs["action"] = "append"  # converted as a whole list, after parsing
        else:
            kwargs["type"] = functools.partial(_flag_value, f, hint)
            kwargs["choices"] = choices(hint)
        names = [flag_name(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        group.add_argument(*names, **kwargs)


def _flag_value(f: dataclasses.Field[Any], hint: Any, raw: str) -> Any:
    try:
        return convert(f, hint, raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The command's settings: its parts from the environment, then its flags."""
    parts = COMMAND_PARTS.get(args.command, MODEL_PARTS)
    overrides: dict[str, dict[str, Any]] = {}
    for part in parts:
        values = overrides[part] = {}
        for f, hint in fields_with_types(PARTS[part]):
            value = getattr(args, f"{part}.{f.name}", None)
            if isinstance(value, list):  # a repeated flag's values
                try:
                    value = convert(f, hint, value)
                except ValueError as exc:
                    raise InvalidInput(exc.args[0]) from None
            values[f.name] = value
    return Settings.build(None, parts=parts, **overrides)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "generation", "Override the model's generation config (unset: the model's default)."
    )
    for name, info in GenerationParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if info.annotation == (bool | None):
            group.add_argument(flag, dest=f"gen_{name}", action=argparse.BooleanOptionalAction)
        else:
            kind = int if "int" in str(info.annotation) else float
            group.add_argument(flag, dest=f"gen_{name}", type=kind, metavar=name.upper())


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    raw = {
        name: getattr(args, f"gen_{name}")
        for name in GenerationParams.model_fields
        if getattr(args, f"gen_{name}", None) is not None
    }
    return GenerationParams.parse(raw, where="generation options")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipserve",
        description="Caption images, answer questions about them and score image-text pairs "
        "with BLIP and BLIP-2 models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, epilog: str = EPILOG) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for part in COMMAND_PARTS.get(name, MODEL_PARTS):
            add_config_arguments(p, PARTS[part], TITLES[part], prefix=f"{part}.", command=name)
        if name != "serve":
            add_generation_arguments(p)
        if name not in ("serve", "batch"):
            p.add_argument("--json", action="store_true", help="print one JSON object a line")
        return p

    p = command("caption", "Caption image files or URLs.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("--prompt", help="text the caption starts with (BLIP) or prompt (BLIP-2)")
    p = command("ask", "Answer a question about an image (BLIP VQA, BLIP-2).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    p = command("match", "Probability that a text describes an image (BLIP, BLIP-2 ITM).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("text", metavar="TEXT")
    p = command("score", "Answer a catalog-format request body (JSON file, or - for stdin).")
    p.add_argument("request", metavar="REQUEST.json")

    p = command(
        "batch", "Caption (or ask about, or score) a whole collection of images.", BATCH_EPILOG
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help="folder of images (recursive), of tables or of WebDataset shards; a "
        "CSV/JSONL/Parquet file with an 'image' column (path, URL or base64) and optional "
        "'text'; a .txt list of images, one a line; a .tar shard or a pattern of them "
        "('shards/{00000..00127}.tar'). A local path or an object-store URL (az://, "
        "abfs://, s3://, gs://)",
    )

    help_text = (
        "Fine-tune a BLIP or BLIP-2 model (or train one from a config) on image-caption or "
        "question-answer data."
    )
    p = sub.add_parser(
        "finetune",
        help=help_text,
        description=help_text,
        epilog=FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from blipserve.finetune.config import FinetuneConfig

    add_config_arguments(p, FinetuneConfig, "fine-tuning", prefix="finetune.")

    p = command(
        "serve", "Serve the model over HTTP (catalog /score, OpenAI /v1, /metrics).", SERVE_EPILOG
    )
    p.add_argument("--port-file", help="write the bound port here once listening (--port 0)")

    from blipserve.cli.export import add_export_command

    add_export_command(sub)
    return parser
