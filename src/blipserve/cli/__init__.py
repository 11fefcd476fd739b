"""The ``blipserve`` command: each subcommand run on the engine, the server, a batch job or
fine-tuning, with the settings :mod:`blipserve.cli.parser` builds from its arguments."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from blipserve.cli.parser import build_parser, params_from_args, settings_from_args
from blipserve.config import Settings, from_env, values_of
from blipserve.contracts.catalog import ScoringRequest, encode_response, parse_request
from blipserve.errors import BlipserveError, InvalidInput
from blipserve.types import Prediction, RowInput

if TYPE_CHECKING:
    from blipserve.batch.runner import BatchOptions, Summary


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
        if args.command == "export":
            from blipserve.cli.export import run_export

            return run_export(args)
        return run(args, sys.stdout)
    except BlipserveError as exc:
        print(f"blipserve: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


def run(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here so that `blipserve --help` answers without loading torch.
    from transformers.utils import logging as hf_logging

    from blipserve.engine import Engine, prompt_of

    hf_logging.disable_progress_bar()
    if not args.verbose:
        hf_logging.set_verbosity_error()
    params = params_from_args(args)
    if args.command == "score":
        text = sys.stdin.read() if args.request == "-" else _read(args.request)
        parsed = parse_request(text)
        # Options given on the command line override the request's own params.
        request = ScoringRequest(parsed.rows, parsed.params.merged(params))
    with Engine.from_settings(settings_from_args(args)) as engine:
        if args.command == "score":
            print(json.dumps(encode_response(engine.score(request))), file=out)
            return 0
        if args.command == "caption":
            prompt, images = prompt_of(engine.adapter, args.prompt), args.images
        elif args.command == "ask":  # in the family's question template, as chats are
            prompt, images = prompt_of(engine.adapter, args.question, "question"), [args.image]
        else:
            prompt, images = prompt_of(engine.adapter, args.text), [args.image]
        rows = [RowInput(i, image, prompt) for i, image in enumerate(images)]
        outcomes = engine.predict(rows, params, allow_paths=True)
    failed = 0
    for row, outcome in zip(rows, outcomes, strict=True):
        assert isinstance(row.image, str)  # the command line's own text
        if isinstance(outcome, Prediction):
            if args.json:
                print(json.dumps({"image": row.image, **outcome.to_json()}), file=out)
                continue
            for text in outcome.texts or (outcome.text,):  # (--num-return-sequences: each)
                print(f"{row.image}\t{text}" if len(rows) > 1 else text, file=out)
        else:
            failed += 1
            reason = getattr(outcome, "reason", outcome.message)
            if args.json:
                print(json.dumps({"image": row.image, "error": reason}), file=out)
            print(f"blipserve: {row.image}: {reason}", file=sys.stderr)
    return 2 if failed else 0


def run_batch(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from blipserve.batch.runner import BatchOptions, TooManyFailures

    hf_logging.disable_progress_bar()
    if not args.verbose:
        hf_logging.set_verbosity_error()
        logging.getLogger("blipserve").setLevel(logging.INFO)
    settings = settings_from_args(args)
    options = BatchOptions(
        input=args.input, params=params_from_args(args), **values_of(settings.batch)
    )
    try:
        summary = _run_batch_job(settings, options)
    except TooManyFailures as exc:
        print(f"blipserve batch: error: {exc.message}", file=sys.stderr)
        return 3
    print(f"blipserve batch: {summary.line()}", file=sys.stderr)
    return 0


def _run_batch_job(settings: Settings, options: BatchOptions) -> Summary:
    from blipserve.batch.runner import BatchJob
    from blipserve.batch.sources import check_input
    from blipserve.engine import Engine

    check_input(options.locate(options.input))  # before the model: loading takes minutes
    if settings.ray.ray:
        from blipserve.batch.ray import run_on_ray

        return run_on_ray(options, settings)
    engine = Engine.from_settings(settings)
    try:
        if not options.filter_model:
            return BatchJob(engine, options).run()
        with Engine.from_settings(settings, model=options.filter_model) as filter_engine:
            return BatchJob(engine, options, filter_engine).run()
    finally:
        engine.close()


def run_finetune(args: argparse.Namespace) -> int:
    from blipserve.finetune.config import FinetuneConfig
    from blipserve.finetune.train import finetune

    if not args.verbose:
        logging.getLogger("blipserve").setLevel(logging.INFO)
    flags = {
        f.name: getattr(args, f"finetune.{f.name}") for f in dataclasses.fields(FinetuneConfig)
    }
    config = from_env(FinetuneConfig, None, **flags)
    folder = finetune(config)
    print(f"blipserve finetune: model saved to {folder}", file=sys.stderr)
    return 0


def run_server(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = settings_from_args(args)
    if settings.ray.ray:
        from blipserve.ray_serve import serve_on_ray

        return serve_on_ray(settings, port_file=args.port_file)
    from blipserve.server import serve

    return serve(settings, port_file=args.port_file)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read request file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"request file {path!r} is not UTF-8 text") from None
