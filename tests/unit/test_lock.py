"""constraints.txt, the lock scripts/setup.sh installs: it pins everything blipserve[dev]
needs, and this environment has exactly those versions (so what the tests ran is what a
fresh clone installs)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin, _, marker = line.partition(";")
            assert Marker(marker).evaluate(), f"constraints.txt: {line!r} is for another Python"
            name, _, version = pin.strip().partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            out[canonicalize_name(name)] = Version(version)
    return out


def needed(extras: set[str]) -> set[str]:
    """The distributions blipserve with ``extras`` needs here, transitively (markers as
    this interpreter and platform evaluate them)."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [("blipserve", extras)]
    while todo:
        name, wanted = todo.pop()
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker and not any(
                req.marker.evaluate({"extra": extra}) for extra in wanted | {""}
            ):
                continue
            dep = canonicalize_name(req.name)
            key = f"{dep}[{','.join(sorted(req.extras))}]"
            if key not in seen:
                seen.add(key)
                todo.append((dep, set(req.extras)))
    return {key.partition("[")[0] for key in seen} - {"blipserve"}


def test_the_lock_pins_everything_the_dev_install_needs() -> None:
    assert {"torch", "transformers", "ray", "pytest"} <= needed({"dev"})  # (read at all)
    missing = sorted(needed({"dev"}) - set(pins()))
    assert not missing, f"not in constraints.txt (run scripts/lock.sh): {missing}"


def test_this_environment_has_the_locked_versions() -> None:
    dev = needed({"dev"})
    wrong = {
        name: (str(version), metadata.version(name))
        for name, version in pins().items()
        if name in dev and Version(metadata.version(name)).public != version.public
    }
    assert not wrong, f"(locked, installed) differ; run scripts/setup.sh: {wrong}"
