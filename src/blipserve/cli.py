"""The ``blipserve`` command. argv is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from blipserve.batch.sinks import FORMATS
from blipserve.config import (
    EngineConfig,
    FetchConfig,
    ImageLimits,
    ModelConfig,
    ServerConfig,
    from_env,
)
from blipserve.contracts.catalog import ScoringRequest, encode_response, parse_request
from blipserve.errors import BlipserveError, InvalidInput
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput

if TYPE_CHECKING:
    from blipserve.batch.runner import BatchOptions, Summary

CONFIG_GROUPS: tuple[tuple[str, type[Any]], ...] = (
    ("model", ModelConfig),
    ("batching", EngineConfig),
    ("images", ImageLimits),
    ("image URLs", FetchConfig),
)

EPILOG = """\
examples:
  blipserve caption examples/*.png                      # the built-in demo model, offline
  blipserve caption photo.jpg --prompt "a picture of"   # conditional caption
  blipserve ask --model demo-vqa scene.png "what color is the circle?"
  blipserve caption --model Salesforce/blip-image-captioning-base photo.jpg
  blipserve score request.json      # a catalog-format request body -> its response JSON

Every option can also be set as an environment variable: --max-batch-size is
BLIPSERVE_MAX_BATCH_SIZE, --allow-url-host is BLIPSERVE_ALLOW_URL_HOSTS (comma-separated).
"""


SERVE_EPILOG = """\
examples:
  blipserve serve                                   # demo model on http://127.0.0.1:8000
  blipserve serve --model demo-vqa --host 0.0.0.0 --api-key "$KEY"
  curl -s localhost:8000/score -H 'Content-Type: application/json' \\
       -d '{"input_data": {"columns": ["image"], "data": [["<base64>"]]}}'

Routes: POST /score, POST /v1/chat/completions, GET /v1/models, GET / (liveness),
GET /ready, GET /metrics, GET /swagger.json, GET /docs. Every option can also be set as
an environment variable BLIPSERVE_<OPTION> (e.g. BLIPSERVE_API_KEYS=k1,k2).
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


def flag_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Any], title: str) -> None:
    """One flag per field of a config dataclass, typed and documented from the field."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs["action"] = "append"
        else:
            choices = typing.get_args(hints[f.name])
            if choices and all(isinstance(c, str) for c in choices):
                kwargs["choices"] = choices
            elif isinstance(default, (int, float)):
                kwargs["type"] = type(default)
        group.add_argument(flag_name(f), **kwargs)


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


def config_from_args(cls: type[Any], args: argparse.Namespace) -> Any:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    for name, value in overrides.items():
        if isinstance(value, list):
            overrides[name] = tuple(value)
    try:
        return from_env(cls, **overrides)
    except ValueError as exc:  # a config's own checks (e.g. a negative batch size)
        raise InvalidInput(f"invalid option: {exc}") from None


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

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for title, cls in CONFIG_GROUPS:
            add_config_arguments(p, cls, title)
        add_generation_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON object a line")
        return p

    p = command("caption", "Caption image files or URLs.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("--prompt", help="text the caption starts with (BLIP) or prompt (BLIP-2)")
    p = command("ask", "Answer a question about an image (BLIP VQA, BLIP-2).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    p = command("match", "Probability that a text describes an image (BLIP ITM).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("text", metavar="TEXT")
    p = command("score", "Answer a catalog-format request body (JSON file, or - for stdin).")
    p.add_argument("request", metavar="REQUEST.json")

    p = command("batch", "Caption (or ask about, or score) a whole collection of images.")
    p.epilog = BATCH_EPILOG
    p.add_argument(
        "input",
        metavar="INPUT",
        help="folder of images (recursive), of tables or of WebDataset shards; a "
        "CSV/JSONL/Parquet file with an 'image' column (path, URL or base64) and optional "
        "'text'; a .txt list of images, one a line; a .tar shard or a pattern of them "
        "('shards/{00000..00127}.tar'). A local path or an object-store URL (az://, "
        "abfs://, s3://, gs://)",
    )
    p.add_argument(
        "--output",
        "-o",
        help="results file: .jsonl, .csv, .parquet, predictions.csv (the catalog's "
        "batch output) or metadata.jsonl (Hugging Face imagefolder); for shard input, a "
        "folder to write the captioned shards into (--format webdataset); a local path or "
        "an object-store URL",
    )
    p.add_argument("--format", choices=FORMATS, help="output format when the name doesn't say")
    p.add_argument(
        "--sidecar", metavar="SUFFIX", help="also write each caption next to its image, e.g. .txt"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: ignore earlier results and replace existing sidecars",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="on resume, run again the rows that failed last time",
    )
    p.add_argument("--prompt", help="text for rows without any (e.g. one question for all)")
    p.add_argument(
        "--text-from",
        metavar="txt|json:FIELD",
        help="WebDataset input: each sample's text from KEY.txt, or from FIELD of KEY.json "
        "(default: none, caption from scratch)",
    )
    p.add_argument(
        "--caption-key",
        default="caption",
        metavar="NAME",
        help="WebDataset output: the caption goes to KEY.NAME.txt and the NAME field of "
        "KEY.json (default caption)",
    )
    p.add_argument(
        "--filter-model",
        metavar="MODEL",
        help="CapFilt: an image-text matching model that scores each caption and "
        "original text (e.g. Salesforce/blip-itm-base-coco)",
    )
    p.add_argument(
        "--min-match",
        type=float,
        default=0.5,
        help="CapFilt: keep pairs whose match probability reaches this (default 0.5)",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=32,
        help="rows decoded ahead and journaled together (default 32)",
    )
    p.add_argument(
        "--max-failures",
        metavar="N|N%",
        help="stop with exit status 3 when more than N rows (or N%% of the rows) fail "
        "(the catalog's error_threshold; default: never stop for failed rows)",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option for the object store's filesystem (adlfs, s3fs, gcsfs), e.g. "
        "anon=true, endpoint_url=http://127.0.0.1:9000, account_name=NAME; repeatable; "
        "VALUE is JSON where it parses as JSON",
    )
    p.add_argument(
        "--read-workers",
        type=int,
        default=16,
        help="image files read at once, ahead of the model (default 16)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal; log lines otherwise)",
    )
    ray = p.add_argument_group("ray", "Run on Ray Data (pip install 'blipserve[ray]').")
    ray.add_argument("--ray", action="store_true", help="run the job on Ray Data")
    ray.add_argument("--ray-address", help="cluster to join (default: a local one)")
    ray.add_argument("--concurrency", type=int, default=1, help="model actors (default 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0)")

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

    add_config_arguments(p, FinetuneConfig, "fine-tuning")

    help_text = "Serve the model over HTTP (catalog /score, OpenAI /v1, /metrics)."
    p = sub.add_parser(
        "serve",
        help=help_text,
        description=help_text,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_groups: tuple[tuple[str, type[Any]], ...] = (*CONFIG_GROUPS, ("server", ServerConfig))
    for title, cls in serve_groups:
        add_config_arguments(p, cls, title)
    p.add_argument("--port-file", help="write the bound port here once listening (--port 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return run_server(args)
        if args.command == "batch":
            return run_batch(args)
        if args.command == "finetune":
            return run_finetune(args)
        return run(args, sys.stdout)
    except BlipserveError as exc:
        print(f"blipserve: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


def run(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here so that `blipserve --help` answers without loading torch.
    from transformers.utils import logging as hf_logging

    from blipserve.contracts.openai import ask_prompt
    from blipserve.engine import Engine

    hf_logging.disable_progress_bar()
    if not args.verbose:
        hf_logging.set_verbosity_error()
    params = params_from_args(args)
    if args.command == "score":
        text = sys.stdin.read() if args.request == "-" else _read(args.request)
        parsed = parse_request(text)
        # Options given on the command line override the request's own params.
        request = ScoringRequest(parsed.rows, parsed.params.merged(params))
    with Engine.load(
        config_from_args(ModelConfig, args),
        config=config_from_args(EngineConfig, args),
        limits=config_from_args(ImageLimits, args),
        fetch=config_from_args(FetchConfig, args),
    ) as engine:
        if args.command == "score":
            print(json.dumps(encode_response(engine.score(request))), file=out)
            return 0
        if args.command == "caption":
            rows = [RowInput(i, image, args.prompt) for i, image in enumerate(args.images)]
        elif args.command == "ask":
            # As on the chat route: BLIP-2 gets a bare question as `Question: ... Answer:`.
            question = ask_prompt(args.question, engine.adapter.text_role)
            rows = [RowInput(0, args.image, question)]
        else:
            rows = [RowInput(0, args.image, args.text)]
        outcomes = engine.predict(rows, params, allow_paths=True)
    failed = 0
    for row, outcome in zip(rows, outcomes, strict=True):
        assert isinstance(row.image, str)  # the command line's own text
        if isinstance(outcome, Prediction):
            if args.json:
                print(json.dumps({"image": row.image, **outcome.to_json()}), file=out)
            elif len(rows) > 1:
                print(f"{row.image}\t{outcome.text}", file=out)
            else:
                print(outcome.text, file=out)
        else:
            failed += 1
            reason = getattr(outcome, "reason", outcome.message)
            if args.json:
                print(json.dumps({"image": row.image, "error": reason}), file=out)
            print(f"blipserve: {row.image}: {reason}", file=sys.stderr)
    return 2 if failed else 0


def run_batch(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from blipserve.batch.runner import BatchOptions, FailureLimit, TooManyFailures
    from blipserve.batch.storage import parse_storage_options

    hf_logging.disable_progress_bar()
    if not args.verbose:
        hf_logging.set_verbosity_error()
        logging.getLogger("blipserve").setLevel(logging.INFO)
    options = BatchOptions(
        input=args.input,
        output=args.output,
        format=args.format,
        sidecar=args.sidecar,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        params=params_from_args(args),
        prompt=args.prompt,
        min_match=args.min_match,
        progress=args.progress,
        chunk_rows=args.chunk_rows,
        max_failures=FailureLimit.parse(args.max_failures),
        read_workers=args.read_workers,
        storage_options=parse_storage_options(args.storage_option),
        text_from=args.text_from,
        caption_key=args.caption_key,
    )
    try:
        summary = _run_batch_job(args, options)
    except TooManyFailures as exc:
        print(f"blipserve batch: error: {exc.message}", file=sys.stderr)
        return 3
    print(f"blipserve batch: {summary.line()}", file=sys.stderr)
    return 0


def _run_batch_job(args: argparse.Namespace, options: BatchOptions) -> Summary:
    from blipserve.batch.runner import BatchJob
    from blipserve.batch.sources import check_input
    from blipserve.engine import Engine

    model = config_from_args(ModelConfig, args)
    engine_config = config_from_args(EngineConfig, args)
    limits = config_from_args(ImageLimits, args)
    fetch = config_from_args(FetchConfig, args)
    check_input(options.locate(options.input))  # before the model: loading takes minutes
    if args.ray:
        from blipserve.batch.ray import run_on_ray

        summary = run_on_ray(
            options,
            model=model,
            engine_config=engine_config,
            limits=limits,
            fetch=fetch,
            filter_model=args.filter_model,
            address=args.ray_address,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
        )
    else:
        engines = [Engine.load(model, config=engine_config, limits=limits, fetch=fetch)]
        if args.filter_model:
            engines.append(
                Engine.load(
                    dataclasses.replace(model, model=args.filter_model),
                    config=engine_config,
                    limits=limits,
                    fetch=fetch,
                )
            )
        try:
            summary = BatchJob(engines[0], options, engines[1] if args.filter_model else None).run()
        finally:
            for engine in engines:
                engine.close()
    return summary


def run_finetune(args: argparse.Namespace) -> int:
    from blipserve.finetune.config import FinetuneConfig
    from blipserve.finetune.train import finetune

    if not args.verbose:
        logging.getLogger("blipserve").setLevel(logging.INFO)
    try:
        config = config_from_args(FinetuneConfig, args)
    except ValueError as exc:
        raise InvalidInput(f"finetune: {exc}") from None
    folder = finetune(config)
    print(f"blipserve finetune: model saved to {folder}", file=sys.stderr)
    return 0


def run_server(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from blipserve.server import serve

    hf_logging.disable_progress_bar()
    return serve(
        config_from_args(ModelConfig, args),
        engine_config=config_from_args(EngineConfig, args),
        limits=config_from_args(ImageLimits, args),
        fetch=config_from_args(FetchConfig, args),
        server=config_from_args(ServerConfig, args),
        port_file=args.port_file,
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read request file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"request file {path!r} is not UTF-8 text") from None


if __name__ == "__main__":
    raise SystemExit(main())
