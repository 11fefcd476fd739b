"""The URIs a batch endpoint's clients send, as the stores blipserve reads.

- ``https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH`` (and ``.dfs.``): Azure Blob
  through adlfs, with the server's credentials, so only for the account they are for; an
  emulator's path-style URL (``http://127.0.0.1:10000/ACCOUNT/CONTAINER/PATH``) where the
  server's connection string names that endpoint.
- ``azureml://datastores/NAME/paths/PATH`` (also with the workspace's
  ``subscriptions/.../workspaces/W/`` in front): ``--datastore NAME=URL``.
- blipserve's own: ``az://``, ``abfs://``, ``s3://``, ``gs://`` and local paths.

Then the operator's rule: a job reads and writes only under ``--jobs-allow-root``; any
other URI is a 403 naming it.  A URI never carries credentials: signed URLs (a SAS token
in the query) and user names are refused, so no job record, log or answer holds one.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from blipserve.batch.storage import Location, is_store_url, locate
from blipserve.errors import Forbidden, InvalidInput, quote

_AZURE_HOST = re.compile(r"^([a-z0-9]{3,24})\.(blob|dfs)\.core\.windows\.net$")
_AZUREML = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resourcegroups/[^/]+/workspaces/[^/]+/)?"
    r"datastores/([^/]+)/paths/(.*)$",
    re.IGNORECASE,
)
# protocols that name one kind of store (adlfs takes az:// and abfs:// alike)
_FAMILY = {"abfs": "az", "abfss": "az", "s3a": "s3", "gcs": "gs"}


@dataclass(frozen=True)
class AllowedRoots:
    """The folders (local paths, store URLs) jobs may use; a batch job's
    :class:`~blipserve.batch.options.PathGuard` (picklable: it travels to Ray actors)."""

    roots: tuple[str, ...]
    denied: tuple[str, ...] = ()  # (under an allowed root, but no job's: the job table)

    def allowed(self, url: str | Location) -> bool:
        """Whether ``url`` is one of the roots or under one (local paths with their links
        resolved: a link out of a root is out of it), and under no denied folder."""
        key = _key(str(url))
        return any(_under(key, root) for root in self.roots) and not any(
            _under(key, folder) for folder in self.denied
        )


@dataclass(frozen=True)
class UriResolver:
    """Turns a client's URI into a :class:`Location` the job may use, or refuses it."""

    datastores: Mapping[str, str]
    roots: Sequence[str]
    storage_options: Mapping[str, Any]
    private: Sequence[str] = ()  # folders under a root that no job may use
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def url(self, uri: str, where: str) -> str:
        """The blipserve URL (``az://c/p``, a local path) a client's ``uri`` means."""
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if parts.query or parts.fragment or parts.username or parts.password:
            raise InvalidInput(
                f"{where}: a URI with a query string or a user name is not taken (a SAS "
                "token, a password): the server reads storage with its own credentials; "
                f"send {quote(_bare(uri), 120)}"
            )
        if scheme in ("http", "https"):
            url = self._blob_url(parts.scheme, parts.netloc, unquote(parts.path), where)
        elif scheme == "azureml":
            url = self._datastore_url(uri, where)
        elif scheme in ("", "file") or is_store_url(uri):
            url = uri
        else:
            raise InvalidInput(
                f"{where}: unsupported URI scheme {quote(scheme + '://', 20)}; use https:// "
                "(Azure Blob), azureml://datastores/..., az://, abfs://, s3://, gs:// or a path"
            )
        path = url.split("://", 1)[-1]
        if ".." in path.split("/"):
            raise InvalidInput(f"{where}: a URI may not hold '..' segments")
        _check_pattern(path, where)
        return url

    def locate(self, uri: str, where: str) -> Location:
        """Where ``uri`` points, once allowed: 403 (:class:`Forbidden`) outside every root."""
        url = self.url(uri, where)
        if not self.allowed(url):
            raise Forbidden(
                f"{where}: {quote(_shown(url), 200)} is outside the folders this server lets "
                "jobs use (--jobs-allow-root)"
            )
        return locate(url, self.storage_options)

    @property
    def guard(self) -> AllowedRoots:
        return AllowedRoots(tuple(self.roots), tuple(self.private))

    def allowed(self, url: str | Location) -> bool:
        return self.guard.allowed(url)

    # -- the catalog's forms ------------------------------------------------------------------

    def _blob_url(self, scheme: str, host: str, path: str, where: str) -> str:
        segments = [s for s in path.split("/") if s]
        account, protocol = self._account_of(scheme, host, segments)
        if account is None:
            raise InvalidInput(
                f"{where}: {quote(f'{scheme}://{host}', 80)} is not an Azure Storage URL "
                "(https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH); give a store URL"
            )
        if not segments:
            raise InvalidInput(f"{where}: the URL names no container")
        mine = self._configured_account()
        if mine is None or mine.lower() != account.lower():
            reads = f"it reads {quote(mine, 30)}" if mine else "it names no account"
            raise Forbidden(
                f"{where}: this server has no credentials for storage account "
                f"{quote(account, 30)} ({reads})"
            )
        return f"{protocol}://{'/'.join(segments)}"

    def _account_of(self, scheme: str, host: str, segments: list[str]) -> tuple[str | None, str]:
        """The account and protocol of a blob URL; path-style (an emulator's endpoint from
        the connection string) takes the account off ``segments``."""
        match = _AZURE_HOST.match(host.lower())
        if match:
            return match.group(1), "abfs" if match.group(2) == "dfs" else "az"
        endpoint = self._connection_fields().get("blobendpoint", "").rstrip("/")
        if endpoint and segments:
            here = f"{scheme}://{host}/{segments[0]}".lower()
            if endpoint.lower() == here:
                account = segments.pop(0)
                return account, "az"
        return None, "az"

    def _configured_account(self) -> str | None:
        named = self.storage_options.get("account_name") or self.env.get(
            "AZURE_STORAGE_ACCOUNT_NAME"
        )
        return str(named) if named else self._connection_fields().get("accountname")

    def _connection_fields(self) -> dict[str, str]:
        text = str(
            self.storage_options.get("connection_string")
            or self.env.get("AZURE_STORAGE_CONNECTION_STRING")
            or ""
        )
        fields = (part.partition("=") for part in text.split(";") if "=" in part)
        return {key.strip().lower(): value.strip() for key, _, value in fields}

    def _datastore_url(self, uri: str, where: str) -> str:
        match = _AZUREML.match(uri)
        if match is None:
            raise InvalidInput(
                f"{where}: an azureml:// URI here is azureml://datastores/NAME/paths/PATH "
                "(a data asset, azureml:NAME:VERSION, is the workspace's: give its path)"
            )
        name, path = match.group(1), match.group(2)
        if name not in self.datastores:
            known = ", ".join(sorted(self.datastores)) or "none (--datastore NAME=URL)"
            raise InvalidInput(
                f"{where}: unknown datastore {quote(name, 60)}; this server knows {known}"
            )
        target = self.url(self.datastores[name], f"--datastore {name}")  # (its https form too)
        return posixpath.join(target, path) if path else target


def _under(key: tuple[str, str], root: str) -> bool:
    family, top = _key(root)
    path = key[1]
    return family == key[0] and (path == top or path.startswith(top.rstrip("/") + "/"))


def _key(url: str) -> tuple[str, str]:
    """(store, path) of a URL or a local path, to compare with a root's.  A store's path
    with '.' or '..' segments matches nothing (stores do not resolve them: the text is
    the key)."""
    if "://" in url and not url.lower().startswith("file://"):
        scheme, rest = url.split("://", 1)
        family = _FAMILY.get(scheme.lower(), scheme.lower())
        segments = rest.strip("/").split("/")
        if any(s in (".", "..") for s in segments):
            return "refused", ""
        return family, "/" + "/".join(s for s in segments if s)
    path = url[len("file://") :] if url.lower().startswith("file://") else url
    return "file", os.path.realpath(os.path.expanduser(path))


MAX_PATTERN_FILES = 100_000


def _check_pattern(path: str, where: str) -> None:
    """A brace pattern (WebDataset shards) is checked as what it expands to: at most
    MAX_PATTERN_FILES paths, none with a '.' or '..' segment (none leads out of a root)."""
    if "{" not in path and "}" not in path:
        return
    from braceexpand import braceexpand

    try:
        for count, each in enumerate(braceexpand(path), 1):
            if count > MAX_PATTERN_FILES:
                raise InvalidInput(
                    f"{where}: the pattern names more than {MAX_PATTERN_FILES} files"
                )
            if any(segment in (".", "..") for segment in each.split("/")):
                raise InvalidInput(f"{where}: a pattern may not lead to '.' or '..' segments")
    except ValueError:  # (braceexpand's UnbalancedBracesError)
        raise InvalidInput(f"{where}: unbalanced braces in the pattern") from None


def _shown(url: str) -> str:
    family, path = _key(url)
    return path if family == "file" else f"{url.split('://', 1)[0]}://{path.lstrip('/')}"


def _bare(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


__all__ = ["AllowedRoots", "UriResolver"]
