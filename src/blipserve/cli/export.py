"""``blipserve export``: a model packaged for another serving stack.  ``export mlflow``
writes an MLflow pyfunc model folder (:mod:`blipserve.mlflow`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from blipserve.config import PARTS
from blipserve.errors import InvalidInput

EXPORT_EPILOG = """\
examples:
  blipserve export mlflow blip-demo                          # the built-in demo model
  blipserve export mlflow --model Salesforce/blip-image-captioning-base --dtype float32 blip-base
  mlflow models serve -m blip-demo --env-manager local -p 5000
  curl -s localhost:5000/invocations -H 'Content-Type: application/json' \\
       -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]},
            "params": {"num_beams": 3}}'

The model's files are copied into the folder (a Hugging Face id must be in the local
cache: hf download ID). The options below, and BLIPSERVE_* variables, are saved as the
model's model_config; MLFLOW_PYFUNC_INFERENCE_CONFIG='{"dtype": "float32"}' overrides
them where it is served. blipserve is not on PyPI: where the model is served with an
environment of its own (MLflow's virtualenv/conda managers, Azure ML), give --requirement
(a wheel's URL or path, 'blipserve @ git+https://...') or --bundle-code. Needs the
mlflow extra (pip install 'blipserve[mlflow]').
"""


def add_export_command(sub: Any) -> None:
    """``export`` and its targets on the command's subparsers (``sub``), with the flags
    of the settings the exported model is loaded and run with (the model's parts)."""
    from blipserve.cli.parser import MODEL_PARTS, TITLES, add_config_arguments

    help_text = "Package a model for another serving stack (MLflow)."
    export = sub.add_parser("export", help=help_text, description=help_text)
    targets = export.add_subparsers(dest="target", required=True, metavar="TARGET")
    help_text = (
        "Save the model as an MLflow pyfunc model (mlflow models serve, Azure ML no-code "
        "deployment, mlflow.pyfunc.load_model)."
    )
    p = targets.add_parser(
        "mlflow",
        help=help_text,
        description=help_text,
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", metavar="OUTPUT_DIR", help="the MLflow model's folder (new)")
    group = p.add_argument_group("mlflow")
    group.add_argument(
        "--requirement",
        metavar="SPEC",
        help="pip requirement that installs blipserve where the model is served (default: "
        "blipserve==<this version>), e.g. a wheel: 'blipserve @ https://.../blipserve-0.1.0-"
        "py3-none-any.whl'",
    )
    group.add_argument(
        "--bundle-code",
        action="store_true",
        help="copy blipserve's code into the model and require its dependencies from PyPI "
        "instead of blipserve itself",
    )
    group.add_argument(
        "--extra-requirement",
        action="append",
        default=[],
        metavar="SPEC",
        help="another pip requirement of the model's environment (repeatable)",
    )
    for part in MODEL_PARTS:
        add_config_arguments(p, PARTS[part], TITLES[part], prefix=f"{part}.")


def run_export(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from blipserve.cli.parser import settings_from_args
    from blipserve.mlflow import save_model

    hf_logging.disable_progress_bar()
    settings = settings_from_args(args)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InvalidInput(f"{args.output} exists and is not an empty folder")
    try:
        save_model(
            output,
            settings=settings,
            requirement=args.requirement,
            bundle_code=args.bundle_code,
            extra_pip_requirements=args.extra_requirement,
        )
    except ImportError as exc:  # (the extra is not installed: the message says what to do)
        print(f"blipserve export: error: {exc}", file=sys.stderr)
        return 1
    print(f"blipserve export: MLflow model saved to {args.output}", file=sys.stderr)
    return 0
