"""WebDataset shards: tar files of samples, in img2dataset's layout, read and written.

A sample is the members of a shard that share a key (the name up to the first '.' of its
last part): ``000123.jpg`` with, optionally, ``000123.txt`` and ``000123.json``.  Reading
streams each shard once, one sample in memory at a time.  Writing copies a shard sample by
sample, adding ``KEY.NAME.txt`` and a ``NAME`` field in ``KEY.json`` (NAME: the caption's
name, ``caption`` by default), into a file that appears under its final name only when
it is whole (a temporary file renamed locally, one put in an object store).

Python's ``tarfile`` does the reading and writing, over fsspec's files: the ``webdataset``
library opens URLs through its own handlers (shell pipes to cloud tools for object
stores) rather than with the job's filesystem and credentials, and a writer that adds two
members to each sample is a few lines here.  Shard patterns are expanded with
``braceexpand``, as webdataset itself does.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from blipserve.batch.rows import RowResult
from blipserve.batch.storage import Location
from blipserve.errors import InvalidInput, quote

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = frozenset({".tar"})
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def is_pattern(text: str) -> bool:
    """Whether ``text`` is a brace pattern of shards (``shards/{00000..00127}.tar``)."""
    return bool(_BRACES.search(text))


def expand(pattern: str) -> list[str]:
    """The shard names a brace pattern stands for, in order."""
    from braceexpand import braceexpand

    try:
        names = list(braceexpand(pattern))
    except Exception as exc:  # braceexpand raises its own errors for bad ranges
        raise InvalidInput(f"bad shard pattern {quote(pattern)}: {exc}") from None
    bad = [n for n in names if not n.lower().endswith(".tar")]
    if bad:
        raise InvalidInput(f"shard pattern {quote(pattern)} names {quote(bad[0])}: not a .tar")
    return names


@dataclass
class Sample:
    """One sample of a shard: its members in shard order (name -> bytes)."""

    key: str
    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)

    def get(self, suffix: str) -> bytes | None:
        for info, data in self.members:
            if _split(info.name)[1].lower() == suffix:
                return data
        return None

    def image(self) -> bytes | None:
        for suffix in IMAGE_SUFFIXES:
            data = self.get(suffix)
            if data is not None:
                return data
        return None


def samples(shard: Location) -> Iterator[Sample]:
    """The shard's samples, streamed (one in memory at a time)."""
    current: Sample | None = None
    try:
        with shard.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _ = _split(info.name)
                f = tar.extractfile(info)
                data = f.read() if f else b""
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                current.members.append((info, data))
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidInput(f"shard '{shard}' is not a readable tar file: {exc}") from None
    if current is not None:
        yield current


def sample_text(sample: Sample, text_from: str | None) -> tuple[str | None, str | None]:
    """(text, error): the row's text from ``KEY.txt`` (``txt``) or a field of ``KEY.json``
    (``json:FIELD``), or none."""
    if not text_from:
        return None, None
    if text_from == "txt":
        data = sample.get("txt")
        return (data.decode("utf-8", "replace").strip() or None if data else None), None
    field_name = text_from.split(":", 1)[1]
    data = sample.get("json")
    if data is None:
        return None, None
    try:
        meta = json.loads(data)
    except ValueError as exc:
        return None, f"{sample.key}.json is not valid JSON: {exc}"
    value = meta.get(field_name) if isinstance(meta, dict) else None
    return (str(value).strip() or None if value is not None else None), None


def check_text_from(text_from: str | None) -> None:
    if text_from and text_from != "txt" and not re.fullmatch(r"json:.+", text_from):
        raise InvalidInput(f"--text-from wants txt or json:FIELD, got {quote(text_from)}")


def write_shard(
    source: Location, dest: Location, captions: Mapping[str, str | None], name: str
) -> int:
    """Copy ``source`` to ``dest`` adding each sample's caption; returns samples written.

    ``captions``: key -> caption (None: the row failed or was filtered out; the sample is
    copied as it was).  ``dest`` appears only when it is whole.
    """
    count = 0
    with (
        dest.writer() as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for sample in samples(source):
            caption = captions.get(sample.key)
            members = list(sample.members)
            if caption is not None:
                members = _with_caption(sample, caption, name)
            for info, data in members:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


class ShardOutput:
    """Writes each output shard (``folder/NAME``, shard for shard) as soon as every row of
    its input shard is recorded, and tells which are written already (a resumed job does
    not read those again).  Only the captions of shards not yet written are held."""

    def __init__(self, folder: Location, input_of: Callable[[str], Location], key: str) -> None:
        self.folder = folder
        self.input_of = input_of
        self.key = key
        self.written = 0
        self._captions: defaultdict[str, dict[str, str | None]] = defaultdict(dict)
        self._expected: defaultdict[str, int] = defaultdict(int)
        self._recorded: defaultdict[str, int] = defaultdict(int)
        self._read: list[str] = []  # shards read to the end, not yet written
        self._current: str | None = None

    def is_written(self, name: str) -> bool:
        return self.folder.child(name).exists()

    def preload(self, results: Iterable[RowResult]) -> None:
        """Captions of rows recorded by an earlier run, for shards still to write."""
        written: dict[str, bool] = {}
        for result in results:
            source = result.source
            if not source:
                continue
            if source not in written:
                written[source] = self.is_written(source)
            if not written[source]:
                self._captions[source][result.id] = result.caption()

    def expect(self, source: str, recorded: bool) -> None:
        """A row of ``source`` was read (``recorded``: by an earlier run)."""
        if source != self._current:
            self.end_of_input()
            self._current = source
        self._expected[source] += 1
        self._recorded[source] += recorded

    def end_of_input(self) -> None:
        if self._current is not None:
            self._read.append(self._current)
            self._current = None

    def record(self, results: Iterable[RowResult]) -> None:
        """Rows finished (their captions held until their shard is written)."""
        for result in results:
            source = result.source
            if source is not None and source in self._expected:
                self._captions[source][result.id] = result.caption()
                self._recorded[source] += 1

    def flush(self) -> None:
        """Write every shard that is read to the end and wholly recorded."""
        for name in list(self._read):
            if self._recorded[name] >= self._expected[name]:
                count = write_shard(
                    self.input_of(name), self.folder.child(name), self._captions[name], self.key
                )
                log.info("wrote %s (%d samples)", self.folder.child(name), count)
                self.written += 1
                self._read.remove(name)
                for state in (self._captions, self._expected, self._recorded):
                    state.pop(name, None)


def _with_caption(sample: Sample, caption: str, name: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    out: list[tuple[tarfile.TarInfo, bytes]] = []
    template = sample.members[0][0]
    has_json = False
    for info, data in sample.members:
        if _split(info.name)[1].lower() == "json":
            has_json = True
            data = _json_with(data, name, caption)
        elif _split(info.name)[1].lower() == f"{name}.txt":
            continue  # replaced below (a rerun with --overwrite)
        out.append((_copy(info), data))
    stem = template.name[: len(template.name) - len(_split(template.name)[1]) - 1]
    out.append((_member(template, f"{stem}.{name}.txt"), caption.encode() + b"\n"))
    if not has_json:
        out.append((_member(template, f"{stem}.json"), _json_with(b"{}", name, caption)))
    return out


def _json_with(data: bytes, name: str, caption: str) -> bytes:
    try:
        meta: Any = json.loads(data)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        meta = {"original": data.decode("utf-8", "replace")} if data.strip() else {}
    meta[name] = caption
    return json.dumps(meta, ensure_ascii=False).encode()


def _member(template: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = template.mtime, 0o644
    return info


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    copy = tarfile.TarInfo(info.name)
    copy.mtime, copy.mode, copy.uname, copy.gname = info.mtime, info.mode, info.uname, info.gname
    return copy


def _split(member: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): webdataset's key rule."""
    head, _, last = member.rpartition("/")
    stem, dot, suffix = last.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, suffix if dot else ""


__all__ = [
    "SHARD_EXTENSIONS",
    "Sample",
    "ShardOutput",
    "check_text_from",
    "expand",
    "is_pattern",
    "sample_text",
    "samples",
    "write_shard",
]
