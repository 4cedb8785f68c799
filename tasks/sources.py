"""Where batches come from: files, SQL and HTTP JSON APIs, behind one small interface.

Each source returns one pandas DataFrame per read: a batch for the validation gate. Errors are
raised as ``SourceError`` with a message that names the table and the place it was read from
(with any password masked), never only a traceback from inside a library.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pandas as pd

from core.contract import ContractError, FileSource, HttpSource, SqlSource, TableSpec, expand

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A source could not be read."""


class TransientSourceError(SourceError):
    """A source failed in a way a later retry may fix (connection, timeout, 5xx)."""


class BatchSource(Protocol):
    """Anything that can read one batch of a table."""

    table: str

    def describe(self) -> str:
        """Where the batch comes from, safe to log (no secrets)."""
        ...

    def read(self) -> pd.DataFrame: ...


def resolve_path(path: str) -> str:
    """Expand ``${VARS}`` and ``package://pkg/file`` into a readable local path or URL."""
    path = expand(path)
    if path.startswith("package://"):
        package, _, inner = path.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"package {package!r} for {path!r} is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    return path


@dataclass
class FileBatchSource:
    """CSV (optionally zipped or gzipped) or Parquet, from a local path or any fsspec URL."""

    table: str
    spec: FileSource

    def describe(self) -> str:
        return f"file {self.spec.path}"

    def _format(self, path: str) -> str:
        if self.spec.format != "auto":
            return self.spec.format
        name = urlsplit(path).path.lower()
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"

    def read(self) -> pd.DataFrame:
        path = resolve_path(self.spec.path)
        fmt = self._format(path)
        options = dict(self.spec.read_options)
        storage = self.spec.storage_options or None
        where = f"table {self.table!r} from {self.spec.path}"
        try:
            if fmt == "parquet":
                return pd.read_parquet(path, storage_options=storage, **options)
            return pd.read_csv(path, storage_options=storage, low_memory=False, **options)
        except FileNotFoundError:
            raise SourceError(f"cannot read {where}: no such file ({path})") from None
        except pd.errors.EmptyDataError:
            raise SourceError(f"cannot read {where}: the file is empty (no header, no rows)") from None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
            kind = type(exc).__name__
            raise SourceError(
                f"cannot read {where}: the file is truncated or not valid {fmt} ({kind}: {exc})"
            ) from exc
        except pd.errors.ParserError as exc:
            raise SourceError(f"cannot read {where}: malformed {fmt}: {exc}") from exc


@dataclass
class SqlBatchSource:
    """A query against any SQLAlchemy URL (SQLite, PostgreSQL, ...), read in chunks."""

    table: str
    spec: SqlSource

    def _url(self):  # noqa: ANN202 - sqlalchemy URL
        from sqlalchemy.engine import make_url

        try:
            return make_url(expand(self.spec.url))
        except ContractError:
            raise
        except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
            raise SourceError(f"table {self.table!r}: invalid SQL URL: {exc}") from None

    def describe(self) -> str:
        return f"sql {self._url().render_as_string(hide_password=True)}"

    def read(self) -> pd.DataFrame:
        import sqlalchemy as sa

        url = self._url()
        safe = url.render_as_string(hide_password=True)
        try:
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                chunks = list(
                    pd.read_sql_query(sa.text(self.spec.query), conn, chunksize=self.spec.chunk_rows)
                )
        except sa.exc.SQLAlchemyError as exc:
            # str(exc) of a DBAPI error can include the statement but never the password.
            detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            kind = TransientSourceError if isinstance(exc, sa.exc.OperationalError) else SourceError
            raise kind(f"cannot read table {self.table!r} from {safe}: {detail}") from None
        finally:
            if "engine" in locals():
                engine.dispose()
        if not chunks:
            return pd.DataFrame()
        return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


@dataclass
class HttpBatchSource:
    """A paged JSON API: follows a next-page URL (or a page-number parameter) until done.

    Connection errors, timeouts and 5xx answers are retried with exponential backoff;
    4xx answers fail at once since a retry cannot fix them.
    """

    table: str
    spec: HttpSource
    session: Any = field(default=None, repr=False)

    def describe(self) -> str:
        return f"http {self.spec.url}"

    def _headers(self) -> dict[str, str]:
        headers = {}
        for name, var in self.spec.headers_from_env.items():
            if var not in os.environ:
                raise SourceError(f"table {self.table!r}: header {name} needs ${var}, which is unset")
            headers[name] = os.environ[var]
        return headers

    def _get(self, session: Any, url: str, params: dict[str, Any]) -> Any:
        import requests

        attempts = self.spec.retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                response = session.get(url, params=params, timeout=self.spec.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise SourceError(
                            f"table {self.table!r}: {url} answered non-JSON content"
                        ) from None
                if response.status_code < 500 and response.status_code != 429:
                    raise SourceError(
                        f"table {self.table!r}: {url} answered HTTP {response.status_code}"
                    )
                last = f"HTTP {response.status_code}"
            if attempt < attempts:
                delay = self.spec.backoff_s * 2 ** (attempt - 1)
                log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", url, last, attempt, attempts, delay)
                time.sleep(delay)
        raise TransientSourceError(
            f"table {self.table!r}: {url} failed after {attempts} attempts ({last})")

    def read(self) -> pd.DataFrame:
        import requests

        session = self.session or requests.Session()
        session.headers.update(self._headers())
        records: list[dict[str, Any]] = []
        url: str | None = self.spec.url
        params = dict(self.spec.params)
        page = 1
        for _ in range(self.spec.max_pages):
            if self.spec.page_param:
                params[self.spec.page_param] = page
            body = self._get(session, url, params)
            rows = body.get(self.spec.records_path) if isinstance(body, dict) else None
            if not isinstance(rows, list):
                raise SourceError(
                    f"table {self.table!r}: page of {url} has no list at {self.spec.records_path!r}"
                )
            records.extend(rows)
            if self.spec.page_param:
                if not rows:
                    break
                page += 1
                continue
            url = body.get(self.spec.next_path) if self.spec.next_path else None
            params = {}  # the next URL carries its own query
            if not url:
                break
        else:
            raise SourceError(f"table {self.table!r}: more than {self.spec.max_pages} pages")
        return pd.DataFrame.from_records(records)


def make_source(table: str, spec: TableSpec) -> BatchSource:
    """The source a table's contract asks for."""
    source = spec.source
    if isinstance(source, FileSource):
        return FileBatchSource(table, source)
    if isinstance(source, SqlSource):
        return SqlBatchSource(table, source)
    return HttpBatchSource(table, source)
