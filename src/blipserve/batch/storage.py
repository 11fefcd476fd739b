"""Where a batch job's files live: a local folder or an object store, through fsspec.

A :class:`Location` is one file or folder: ``/data/photos``, ``az://container/photos``
(adlfs), ``s3://bucket/photos`` (s3fs), ``gs://bucket/photos`` (gcsfs).  Every part of a
job (inputs, image files, outputs, sidecars, the journal) goes through it, so the same job
runs on any of them.  Credentials come the ways those libraries read them (environment
variables, connection strings, anonymous access) plus ``--storage-option key=value``; they
are never part of a location's text, a job's signature or a message.

Object stores have no rename and no append, but putting one object is atomic: a reader
sees the whole new object or none of it.  Local writes get the same guarantee from a
temporary file, ``fsync`` and a rename.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from blipserve.errors import BlipserveError, InvalidInput, quote

#: protocol -> (the extra that installs it, the package fsspec needs)
EXTRAS = {
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(BlipserveError):
    """A store could not be reached or refused an operation (not one bad row: the job stops,
    keeping what is done, and a rerun resumes)."""

    status = 502


class OutputError(StorageError):
    """The output location cannot be written (permissions, full disk, a different job)."""

    status = 500


def is_store_url(text: str) -> bool:
    """Whether ``text`` names an object in a store blipserve reads (``s3://``, ``az://``...)."""
    match = _SCHEME.match(text)
    return match is not None and match.group(1).lower() in (*EXTRAS, "file")


@dataclass(frozen=True)
class Location:
    """A file or folder on a filesystem; ``str()`` is its URL (a local absolute path)."""

    fs: Any  # an fsspec AbstractFileSystem
    path: str  # the filesystem's own path: "/abs/dir" locally, "bucket/key" in a store
    protocol: str  # "file" for local paths

    @property
    def local(self) -> bool:
        return self.protocol == "file"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> Location:
        return self._at(posixpath.dirname(self.path.rstrip("/")))

    def child(self, relative: str) -> Location:
        return self._at(posixpath.normpath(posixpath.join(self.path, relative)))

    def with_name(self, name: str) -> Location:
        return self.parent.child(name)

    def with_suffix(self, suffix: str) -> Location:
        return self._at(posixpath.splitext(self.path)[0] + suffix)

    def relative_to(self, root: Location) -> str | None:
        """This location's path under ``root`` ("a/b.jpg"), or None when it is not under it."""
        base = root.path.rstrip("/") + "/"
        if self.protocol != root.protocol or not self.path.startswith(base):
            return None
        return self.path[len(base) :]

    def at(self, path: str) -> Location:
        """Another path on the same filesystem (a full path, as fsspec names it)."""
        return Location(self.fs, path, self.protocol)

    def _at(self, path: str) -> Location:
        return self.at(path)

    def __str__(self) -> str:
        return self.path if self.local else f"{self.protocol}://{self.path}"

    # -- reading ----------------------------------------------------------------------------

    def is_dir(self) -> bool:
        return bool(self._call("look at", self.fs.isdir, self.path))

    def is_file(self) -> bool:
        return bool(self._call("look at", self.fs.isfile, self.path))

    def exists(self) -> bool:
        return bool(self._call("look at", self.fs.exists, self.path))

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The file's bytes; at most ``limit + 1`` are read (so a caller can tell "too big")."""
        end = None if limit is None else limit + 1
        return bytes(self._call("read", self.fs.cat_file, self.path, start=0, end=end))

    def open(self, mode: str = "rb") -> IO[Any]:
        return self._call("open", self.fs.open, self.path, mode)  # type: ignore[no-any-return]

    def listing(self) -> list[dict[str, Any]]:
        """This folder's entries (fsspec's ``ls`` with details), sorted by name; always
        asked of the store (another process may have written since the last listing)."""
        self.fs.invalidate_cache(self.path)
        entries = self._call("list", self.fs.ls, self.path, detail=True)
        return sorted(entries, key=lambda e: str(e["name"]))

    def entry(self, info: Mapping[str, Any]) -> Location:
        """The location of an entry of :meth:`listing`."""
        name = str(info["name"])
        if not self.local:
            name = self.fs._strip_protocol(name)
        return self._at(name.rstrip("/"))

    # -- writing ----------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically (a kill never leaves half of it)."""
        if not self.local and len(data) <= 1 << 20:
            self._call("write", self.fs.pipe_file, self.path, data, error=OutputError)
            return
        with self.writer() as f:  # (large bodies go to a store from a file, in blocks)
            f.write(data)

    @contextlib.contextmanager
    def writer(self) -> Iterator[IO[bytes]]:
        """A binary file that replaces this one atomically when the block ends without error.

        Locally a temporary sibling, fsync-ed and renamed; for a store a local temporary
        file, uploaded as one object (atomic) at the end.
        """
        if self.local:
            self.parent.mkdirs()
            # (a name of its own: two writers of one file never share a temporary one)
            tmp = self.with_name(f".{self.name}.{uuid.uuid4().hex[:12]}.tmp").path
        else:
            handle, tmp = tempfile.mkstemp(prefix="blipserve-", suffix=".part")
            os.close(handle)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if self.local:
                os.replace(tmp, self.path)
            else:
                self._call("write", self.fs.put_file, tmp, self.path, error=OutputError)
        except OSError as exc:
            raise OutputError(f"cannot write {self}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def mkdirs(self) -> None:
        """Create this folder (locally; object stores have no folders to make)."""
        if self.local:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create folder {self}: {exc.strerror or exc}") from None

    def remove(self, *, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("remove", self.fs.rm, self.path, recursive=recursive)

    def _call(
        self, what: str, fn: Any, *args: Any, error: type[StorageError] = StorageError, **kw: Any
    ) -> Any:
        """``fn(*args)``; a missing file stays FileNotFoundError, every other failure of the
        store becomes ``error`` naming the location (never its credentials)."""
        try:
            return fn(*args, **kw)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise  # about this one object
        except BlipserveError:
            raise
        except Exception as exc:  # each store's client has its own exception types
            if self.local and isinstance(exc, OSError):
                raise  # a local disk's errors are about one file too
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            reason = text.strip().splitlines()[0]  # Azure's errors append the whole response
            raise error(
                f"cannot {what} {self}: {type(exc).__name__}: {quote(reason, 200)}"
            ) from None


def locate(url: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> Location:
    """The :class:`Location` of a local path or a store URL.

    ``options`` (``--storage-option``) go to object stores' filesystems, never to the local
    one.  A missing library is an error with its install hint.
    """
    import fsspec.core

    text = os.fspath(url)
    match = _SCHEME.match(text)
    protocol = match.group(1).lower() if match else "file"
    if protocol == "file":
        if text.startswith("file://"):
            text = text[len("file://") :]
        path = os.path.realpath(os.path.expanduser(text))
        return Location(fsspec.filesystem("file"), path, "file")
    if protocol not in EXTRAS:
        known = ", ".join(f"{p}://" for p in EXTRAS)
        raise InvalidInput(f"unsupported storage {protocol}:// in {quote(text)}; use {known}")
    extra, package = EXTRAS[protocol]
    try:
        fs, path = fsspec.core.url_to_fs(text, **dict(options or {}))
    except ImportError:
        raise InvalidInput(
            f"{protocol}:// needs {package}: pip install 'blipserve[{extra}]'"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"cannot open {protocol}:// storage: {quote(str(exc), 200)}") from None
    return Location(fs, str(path).rstrip("/"), protocol)


__all__ = [
    "EXTRAS",
    "Location",
    "OutputError",
    "StorageError",
    "is_store_url",
    "locate",
]
