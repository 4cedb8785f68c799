"""Files other machines must see: reports, parked batches, small state.

They live under ``Settings.shared_root``: a folder (the default, ``<home>``), or an object-store
URL (``s3://bucket/prefix``) reached with pyarrow's file systems and the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, and ``AWS_ENDPOINT_URL``
for an S3 API other than AWS's), the same settings deltalake reads for the lake.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root.removeprefix("file://")).joinpath(*parts))


def _filesystem(uri: str) -> tuple[Any, str]:
    from core.lake import arrow_filesystem

    return arrow_filesystem(uri)  # the lake's: the same AWS environment reaches both


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` at ``uri`` whole: a local file is written under a temporary name and
    renamed; an object-store put is atomic by itself. Returns ``uri``."""
    if not is_remote(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return uri
    filesystem, key = _filesystem(uri)
    with filesystem.open_output_stream(key) as out:
        out.write(data)
    return uri


def read_bytes(uri: str) -> bytes | None:
    """The bytes at ``uri``, or None when there is nothing there."""
    if not is_remote(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            return None
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as handle:
        return handle.read()


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def upload_tree(local: Path, uri: str) -> str:
    """Copy a local folder's files under ``uri`` (a local destination is copied too)."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes(join(uri, *path.relative_to(local).parts), path.read_bytes())
    return uri


def link(uri: str) -> str:
    """A link a person can follow or copy: file:// for a local path, the URL otherwise."""
    return uri if is_remote(uri) else Path(uri).resolve().as_uri()


class Staging:
    """A local file to write with a library that only writes local paths (Evidently's HTML,
    Great Expectations' Data Docs), then keep at ``uri``: written in place when ``uri`` is local,
    else in a temporary folder and copied up on ``keep()``."""

    def __init__(self, uri: str):
        self.uri = uri
        if is_remote(uri):
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="flywheel-")
            self.path = Path(self._tmp.name) / uri.rstrip("/").rsplit("/", 1)[-1]
        else:
            self._tmp = None
            self.path = Path(uri)
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def keep(self) -> str:
        if self._tmp is not None:
            if self.path.is_dir():
                upload_tree(self.path, self.uri)
            else:
                write_bytes(self.uri, self.path.read_bytes())
            self._tmp.cleanup()
        return self.uri
