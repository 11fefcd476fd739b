"""Save or log a blipserve model as an MLflow pyfunc model: the model's files as an
artifact, blipserve's settings as its ``model_config``, a signature with the catalog's
columns and blipserve's generation parameters, and the requirements that install it."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blipserve
from blipserve.config import Settings
from blipserve.contracts.catalog import IMAGE, TEXT
from blipserve.errors import InvalidInput, ModelLoadError
from blipserve.mlflow.tables import settings_to_config
from blipserve.params import GenerationParams

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

#: pip's name for what the extra installs, in every message that asks for it
EXTRA = "pip install 'blipserve[mlflow]'"


def save_model(
    path: str | Path,
    model: str | None = None,
    *,
    settings: Settings | None = None,
    requirement: str | None = None,
    bundle_code: bool = False,
    extra_pip_requirements: Sequence[str] = (),
) -> None:
    """Save ``model`` (a built-in name, a Hugging Face id in the local cache, or a
    ``save_pretrained`` folder) as an MLflow pyfunc model in the new folder ``path``.

    ``settings`` (default: blipserve's defaults) decide how the model is loaded and run
    (``settings.model.dtype``, ``.device``, ``.backend``, ``settings.engine.max_batch_size``,
    image limits, URL fetching); they are saved as the model's ``model_config``, which
    ``mlflow.pyfunc.load_model(..., model_config=...)`` or ``MLFLOW_PYFUNC_INFERENCE_CONFIG``
    can override where it is loaded.  ``requirement`` is the pip requirement that installs
    blipserve where the model is served (default ``blipserve==<this version>``: blipserve is
    not on PyPI, so give a wheel's URL or path, ``blipserve @ git+https://...``, or set
    ``bundle_code``: blipserve's code is then copied into the model and its dependencies
    required instead).

    >>> save_model("blip-demo", "demo")                                 # doctest: +SKIP
    >>> mlflow.pyfunc.load_model("blip-demo").predict(frame)            # doctest: +SKIP
    """
    mlflow = _mlflow()
    with _prepared(model, settings, requirement, bundle_code, extra_pip_requirements) as kw:
        mlflow.pyfunc.save_model(path=str(path), **kw)


def log_model(
    name: str = "model",
    model: str | None = None,
    *,
    settings: Settings | None = None,
    requirement: str | None = None,
    bundle_code: bool = False,
    extra_pip_requirements: Sequence[str] = (),
    registered_model_name: str | None = None,
) -> ModelInfo:
    """:func:`save_model`, logged to the current MLflow tracking server (in the active run,
    or a new one) under ``name``; ``registered_model_name`` also registers it (a new
    version), so that ``mlflow models serve -m models:/NAME/VERSION`` serves it."""
    mlflow = _mlflow()
    with _prepared(model, settings, requirement, bundle_code, extra_pip_requirements) as kw:
        info: ModelInfo = mlflow.pyfunc.log_model(
            name=name, registered_model_name=registered_model_name, **kw
        )
    return info


def _mlflow() -> Any:
    try:
        import mlflow.pyfunc
    except ImportError as exc:
        raise ImportError(f"exporting to MLflow needs the mlflow extra: {EXTRA}") from exc
    return mlflow


@contextmanager
def _prepared(
    model: str | None,
    settings: Settings | None,
    requirement: str | None,
    bundle_code: bool,
    extra: Sequence[str],
) -> Iterator[dict[str, Any]]:
    """The keyword arguments of ``mlflow.pyfunc.save_model`` / ``log_model``, valid while
    the context lasts (the staged files and the bundled code's copy are removed after)."""
    from blipserve.mlflow.pyfunc import MODEL_ARTIFACT

    if bundle_code and requirement is not None:
        raise InvalidInput(
            "a requirement that installs blipserve and bundling its code exclude each other: "
            "give one (--requirement or --bundle-code)"
        )
    settings = settings or Settings()
    if model is not None:
        settings = dataclasses.replace(
            settings, model=dataclasses.replace(settings.model, model=model)
        )
    name = settings.model.model
    folder = model_folder(name, settings.model.revision)
    architecture, text_role, text_required = _architecture(name, folder)
    with tempfile.TemporaryDirectory(prefix="blipserve-mlflow-") as tmp, warnings.catch_warnings():
        # No input example, on purpose: log_model would load the model to try it (minutes
        # and gigabytes for BLIP-2); the signature says what the model takes.
        warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
        kwargs: dict[str, Any] = {
            # MLflow's models from code: this file, run where the model is loaded, makes it
            "python_model": str(Path(__file__).with_name("model_code.py")),
            "artifacts": {MODEL_ARTIFACT: str(_without_links(folder, name, Path(tmp)))},
            "model_config": settings_to_config(settings, name),
            "signature": signature(text_role, text_required),
            "metadata": {
                "blipserve_version": blipserve.__version__,
                "source": name,
                "architecture": architecture,
            },
        }
        if bundle_code:
            kwargs["code_paths"] = [str(_copy_code(Path(tmp)))]
            kwargs["pip_requirements"] = [*dependencies(), *extra]
        else:
            kwargs["pip_requirements"] = [
                requirement or f"blipserve=={blipserve.__version__}",
                "pandas",
                *extra,
            ]
        yield kwargs


def _without_links(folder: Path, name: str, tmp: Path) -> Path:
    """``folder``, or where it has symbolic links (a Hugging Face cache's snapshot: each
    file links to a blob), a copy of it in ``tmp`` with the files themselves, which MLflow
    takes as an artifact (it refuses links that lead out of the folder).  Files are hard
    links to the originals where the file system allows, so only MLflow's copy costs."""
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    if not any(p.is_symlink() for p in files):
        return folder
    staged = tmp / "model" / name.rstrip("/").rsplit("/", 1)[-1]
    for path in files:
        target = staged / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:  # (another file system, or links not allowed)
            shutil.copy2(path, target)
    return staged


def model_folder(model: str, revision: str | None = None) -> Path:
    """The folder of ``model``'s files: a built-in model's in the package, a local folder
    itself, a Hugging Face id's snapshot in the local cache (never downloaded here)."""
    from blipserve.models import resolve_source

    source = resolve_source(model)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ModelLoadError(
            f"model {model!r} is not in the local Hugging Face cache ({exc}); download it "
            f"first (hf download {model}) or pass a folder written by save_pretrained"
        ) from None


def _architecture(name: str, folder: Path) -> tuple[str, str, bool]:
    """The folder's architecture and what its rows' text is, read from config.json (the
    model is not loaded); a model blipserve cannot serve is refused here."""
    from blipserve.models import ADAPTERS

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        where = folder / "config.json"
        raise ModelLoadError(f"model {name!r}: cannot read {where}: {exc}") from None
    for arch in config.get("architectures") or []:
        if arch in ADAPTERS:
            adapter = ADAPTERS[arch]
            return arch, adapter.text_role, adapter.text_required
    raise ModelLoadError(
        f"model {name!r} has architecture {config.get('architectures')}, which blipserve "
        f"does not serve; supported: {', '.join(sorted(ADAPTERS))}"
    )


def signature(text_role: str, text_required: bool) -> ModelSignature:
    """Inputs ``image`` (string: base64 or an http(s) URL; bytes from Python) and ``text``
    (required where the model needs it: questions, texts to match); outputs ``text``,
    ``score`` for matching, ``texts`` when a row asks for several; and blipserve's
    generation parameters, each defaulting to None (the model's generation config)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("string", IMAGE), ColSpec("string", TEXT, required=text_required)])
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", TEXT)]
    if text_role == "match":
        outputs.append(ColSpec("double", "score"))
    outputs.append(ColSpec(Array("string"), "texts", required=False))
    params = ParamSchema(
        [ParamSpec(name, kind, None) for name, kind in generation_param_types().items()]
    )
    return ModelSignature(inputs=inputs, outputs=Schema(outputs), params=params)


def generation_param_types() -> dict[str, str]:
    """Each generation parameter's MLflow type: ``long``, ``double`` or ``boolean``."""
    kinds = {int: "long", float: "double", bool: "boolean"}
    out = {}
    for name, info in GenerationParams.model_fields.items():
        kind = next(k for k in (bool, int, float) if info.annotation == (k | None))
        out[name] = kinds[kind]
    return out


def dependencies() -> list[str]:
    """What installs blipserve's code when it is bundled: its own requirements (from the
    installed package's metadata, without its extras') and pandas (MLflow's DataFrames)."""
    required = importlib.metadata.requires("blipserve") or []
    return [r for r in required if "extra ==" not in r] + ["pandas"]


def _copy_code(tmp: Path) -> Path:
    """blipserve's package, without caches or the demo models' weights (the model's own
    files are an artifact), ready for MLflow's ``code_paths``."""
    package = Path(blipserve.__file__).resolve().parent

    def skipped(folder: str, names: list[str]) -> set[str]:
        out = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".so"))}
        return out | ({"models"} if Path(folder) == package / "demo" else set())

    dest = tmp / "blipserve"
    shutil.copytree(package, dest, ignore=skipped)
    return dest
