"""Where batches come from: files, SQL and HTTP JSON APIs, behind one small interface.

Each source returns one pandas DataFrame per read: a batch for the validation gate. Errors are
raised as ``SourceError`` with a message that names the table and the place it was read from,
never only a traceback from inside a library. ``${VARS}`` in locations, options, parameters
and headers are expanded at read time, so secrets live in the environment; every description,
error and log line shows the resolved location with its credentials masked
(``core.secrets``), and errors are raised ``from None`` where the library's exception would
carry the URL into a chained traceback. Only failures a retry can fix are
``TransientSourceError``: a wrong password or an HTTP 401 fails at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import pandas as pd

from core.contract import (
    ContractError,
    FileSource,
    HttpSource,
    SqlSource,
    StreamSource,
    TableSpec,
    expand,
)
from core.errors import FlywheelError
from core.secrets import mask_text, mask_url

log = logging.getLogger(__name__)


class SourceError(FlywheelError):
    """A source could not be read."""


class TransientSourceError(SourceError):
    """A source failed in a way a later retry may fix (connection, timeout, 5xx)."""


# These log every request's full URL, query included, at DEBUG.
URL_LOGGERS = ("urllib3", "fsspec.http")

# SQLSTATE invalid_password and invalid_authorization_specification (PostgreSQL, psycopg).
AUTH_SQLSTATES = frozenset({"28P01", "28000"})
AUTH_MESSAGE = re.compile(
    r"authentication failed|access denied|no password supplied|login failed"
    r"|role \S+ does not exist", re.IGNORECASE)


class BatchSource(Protocol):
    """Anything that can read one batch of a table."""

    table: str

    def describe(self) -> str:
        """Where the batch comes from, safe to log (no secrets)."""
        ...

    def read(self) -> pd.DataFrame: ...


def quiet_url_loggers() -> None:
    """Keep the HTTP libraries' DEBUG request lines (full URLs with their queries) out of the
    logs: a DEBUG run must not print an api_key."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def expand_values(value: Any) -> Any:
    """``value`` with ``${VARS}`` expanded in every string inside it (dicts and lists too)."""
    if isinstance(value, str):
        return expand(value)
    if isinstance(value, dict):
        return {key: expand_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [expand_values(item) for item in value]
    return value


def _expanded(table: str, value: Any) -> Any:
    try:
        return expand_values(value)
    except ContractError as exc:
        raise ContractError(f"table {table!r}: {exc}") from None


def _package_path(path: str) -> str:
    if path.startswith("package://"):
        package, _, inner = path.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"package {package!r} for {path!r} is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    return path


def resolve_path(path: str) -> str:
    """Expand ``${VARS}`` and ``package://pkg/file`` into a readable local path or URL."""
    return _package_path(expand(path))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return mask_text(lines[0] if lines else type(error).__name__)


def _is_network_error(error: BaseException) -> bool:
    """Connection trouble, from the standard library or aiohttp (fsspec's HTTP files)."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return any(c.__name__ in ("ClientConnectionError", "ServerTimeoutError")
               for c in type(error).__mro__)


def undecodable_byte(path: str, encoding: str, storage_options: dict[str, Any] | None = None,
                     compression: str = "infer") -> tuple[int, int, int] | None:
    """(offset, line, byte) of the first byte of the file that does not decode as
    ``encoding``, offset from the start of the (decompressed) file and line counted from 1;
    None if every byte decodes or the file cannot be read again."""
    import codecs

    import fsspec

    options = storage_options or {}
    if urlsplit(path).scheme in ("http", "https"):  # pandas sends these as request headers
        options = {"headers": options}
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
        with fsspec.open(path, "rb", compression=compression, **options) as handle:
            offset = lines = 0
            while block := handle.read(1 << 20):
                pending = decoder.getstate()[0]  # an unfinished character from the last block
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    data = pending + block
                    return (offset - len(pending) + exc.start,
                            lines + data.count(b"\n", 0, exc.start) + 1, data[exc.start])
                offset += len(block)
                lines += block.count(b"\n")
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return None
    return None


@dataclass
class FileBatchSource:
    """CSV (optionally zipped or gzipped) or Parquet, from a local path or any fsspec URL."""

    table: str
    spec: FileSource

    def location(self) -> str:
        """The path with ``${VARS}`` expanded (``package://`` kept), credentials masked."""
        return mask_url(_expanded(self.table, self.spec.path))

    def describe(self) -> str:
        try:
            return f"file {self.location()}"
        except ContractError:
            return f"file {mask_url(self.spec.path)}"

    def _format(self, path: str) -> str:
        if self.spec.format != "auto":
            return self.spec.format
        name = urlsplit(path).path.lower()
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"

    def read(self) -> pd.DataFrame:
        quiet_url_loggers()
        location = _expanded(self.table, self.spec.path)
        path = _package_path(location)
        fmt = self._format(path)
        options = dict(self.spec.read_options)
        storage = _expanded(self.table, self.spec.storage_options) or None
        where = f"table {self.table!r} from {mask_url(location)}"
        if any(char in path for char in "*?["):
            return self._read_matching(path, location, fmt, options, storage, where)
        return self._read_one(path, location, fmt, options, storage, where)

    def _read_matching(self, pattern: str, location: str, fmt: str, options: dict[str, Any],
                       storage: dict[str, Any] | None, where: str) -> pd.DataFrame:
        """Every file the glob matches (e.g. one per day landing in a folder), in name order,
        as one batch; a file being written under a name the glob does not match is not read."""
        import fsspec

        try:
            fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=storage)
        except Exception as exc:  # noqa: BLE001 - reported with the URL masked
            raise SourceError(f"cannot list {where}: {type(exc).__name__}: {_first_line(exc)}") from None
        if not paths:
            raise SourceError(f"cannot read {where}: no file matches {mask_url(pattern)}")
        frames = [self._read_one(fs.unstrip_protocol(p) if "://" in pattern else p, location, fmt, options,
                                 storage, where) for p in sorted(paths)]
        return pd.concat(frames, ignore_index=True)

    def _read_one(self, path: str, location: str, fmt: str, options: dict[str, Any],
                  storage: dict[str, Any] | None, where: str) -> pd.DataFrame:
        # Messages never chain the library's exception: fsspec and aiohttp put the full URL
        # (query and all) in theirs, and Prefect logs the whole chain.
        try:
            if fmt == "parquet":
                return pd.read_parquet(path, storage_options=storage, **options)
            return pd.read_csv(path, storage_options=storage, low_memory=False, **options)
        except FileNotFoundError:
            shown = f"{mask_url(path)}, from {mask_url(location)}" if path != location else mask_url(path)
            raise SourceError(f"cannot read {where}: no such file ({shown})") from None
        except PermissionError:
            raise SourceError(f"cannot read {where}: permission denied") from None
        except IsADirectoryError:
            raise SourceError(f"cannot read {where}: it is a directory, not a file") from None
        except pd.errors.EmptyDataError:
            raise SourceError(f"cannot read {where}: the file is empty (no header, no rows)") from None
        except UnicodeDecodeError as exc:
            raise SourceError(f"cannot read {where}: {self._not_text(exc, path, storage)}") from None
        except pd.errors.ParserError as exc:
            raise SourceError(f"cannot read {where}: malformed {fmt}: {_first_line(exc)}") from None
        except Exception as exc:
            kind = type(exc).__name__
            if _is_network_error(exc):
                raise TransientSourceError(f"cannot read {where}: {kind}: {_first_line(exc)}") from None
            if isinstance(exc, zipfile.BadZipFile | EOFError | OSError | ValueError):
                raise SourceError(f"cannot read {where}: the file is truncated or not valid "
                                  f"{fmt} ({kind}: {_first_line(exc)})") from None
            raise SourceError(f"cannot read {where}: {kind}: {_first_line(exc)}") from None

    def _not_text(self, error: UnicodeDecodeError, path: str, storage: dict[str, Any] | None) -> str:
        """Which byte is not text in the file's encoding, and how to name the right one."""
        encoding = self.spec.read_options.get("encoding") or "utf-8"
        compression = self.spec.read_options.get("compression", "infer")
        found = undecodable_byte(path, encoding, storage,
                                 compression if isinstance(compression, str) else "infer")
        if found:
            offset, line, byte = found
            at = f"byte 0x{byte:02x} at byte offset {offset:,} (line {line:,})"
        else:  # the file cannot be read again; pandas' offset is within its buffer, not the file
            at = f"byte 0x{error.object[error.start]:02x} (offset unknown)"
        return (f"the file is not valid {encoding.upper()} text: {at} does not decode; if the "
                f"file uses another encoding, name it in the contract, e.g. "
                f"read_options: {{encoding: latin-1}} (or cp1252, utf-16)")


@dataclass
class SqlBatchSource:
    """A query against any SQLAlchemy URL (SQLite, PostgreSQL, ...), read in chunks.

    Connection failures are transient (a retry may find the server up); a rejected password
    or role is not, since retrying it only fills the server's log and may lock the account.
    """

    table: str
    spec: SqlSource

    def _url(self):  # noqa: ANN202 - sqlalchemy URL
        from sqlalchemy.engine import make_url

        text = _expanded(self.table, self.spec.url)
        try:
            return make_url(text)
        except Exception as exc:  # sqlalchemy.exc.ArgumentError, a bad port, ...
            raise SourceError(f"table {self.table!r}: invalid SQL URL {mask_url(text)}: "
                              f"{_first_line(exc)}") from None

    @staticmethod
    def _safe(url: Any) -> str:
        # hide_password masks only user:pass@; a ?password= query needs mask_url on top.
        return mask_url(url.render_as_string(hide_password=True))

    def describe(self) -> str:
        try:
            return f"sql {self._safe(self._url())}"
        except (ContractError, SourceError):
            return f"sql {mask_url(self.spec.url)}"

    def read(self) -> pd.DataFrame:
        import sqlalchemy as sa

        url = self._url()
        safe = self._safe(url)
        engine = None
        connected = False
        try:
            engine = sa.create_engine(url)
            with engine.connect() as conn:
                connected = True
                chunks = list(
                    pd.read_sql_query(sa.text(self.spec.query), conn, chunksize=self.spec.chunk_rows)
                )
        except sa.exc.SQLAlchemyError as exc:
            error = getattr(exc, "orig", None) or exc
            detail = _first_line(error)
            if not connected and is_auth_failure(error):
                raise SourceError(f"cannot read table {self.table!r}: authentication failed for "
                                  f"{safe}: {detail}") from None
            kind = TransientSourceError if isinstance(exc, sa.exc.OperationalError) else SourceError
            raise kind(f"cannot read table {self.table!r} from {safe}: {detail}") from None
        finally:
            if engine is not None:
                engine.dispose()
        if not chunks:
            return pd.DataFrame()
        return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def is_auth_failure(error: BaseException) -> bool:
    """Whether a database driver's error says the credentials were rejected: SQLSTATE 28P01 or
    28000 where the driver gives one (psycopg, psycopg2), else the message (MySQL, SQL Server)."""
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return code in AUTH_SQLSTATES or bool(AUTH_MESSAGE.search(str(error)))


def with_query(url: str, params: dict[str, Any]) -> str:
    """``url`` with ``params`` appended to its query, as the first request sends it."""
    if not params:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{urlencode(params, doseq=True)}"


@dataclass
class HttpBatchSource:
    """A paged JSON API: follows a next-page URL (or a page-number parameter) until done.

    Connection errors, timeouts and 5xx answers are retried with exponential backoff;
    4xx answers fail at once since a retry cannot fix them (401 and 403 say authentication
    failed).
    """

    table: str
    spec: HttpSource
    session: Any = field(default=None, repr=False)

    def _first_page(self) -> tuple[str, dict[str, Any]]:
        return _expanded(self.table, self.spec.url), _expanded(self.table, dict(self.spec.params))

    def describe(self) -> str:
        try:
            return f"http {mask_url(with_query(*self._first_page()))}"
        except ContractError:
            return f"http {mask_url(self.spec.url)}"

    def _headers(self) -> dict[str, str]:
        headers = _expanded(self.table, dict(self.spec.headers))
        for name, var in self.spec.headers_from_env.items():
            if var not in os.environ:
                raise SourceError(f"table {self.table!r}: header {name} needs ${var}, which is unset")
            headers[name] = os.environ[var]
        return headers

    def _get(self, session: Any, url: str, params: dict[str, Any], headers: dict[str, str]) -> Any:
        import requests

        shown = mask_url(with_query(url, params))
        transient = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        attempts = self.spec.retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                response = session.get(url, params=params, headers=headers, timeout=self.spec.timeout_s)
            except transient as exc:
                last = f"{type(exc).__name__}"
            except requests.RequestException as exc:  # invalid URL, too many redirects, ...
                raise SourceError(f"table {self.table!r}: cannot request {shown}: "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from None
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise SourceError(
                            f"table {self.table!r}: {shown} answered non-JSON content"
                        ) from None
                if status in (401, 403):
                    raise SourceError(
                        f"table {self.table!r}: authentication failed (HTTP {status}) for {shown}")
                if status < 500 and status != 429:
                    raise SourceError(f"table {self.table!r}: {shown} answered HTTP {status}")
                last = f"HTTP {status}"
            if attempt < attempts:
                delay = self.spec.backoff_s * 2 ** (attempt - 1)
                log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", shown, last, attempt, attempts, delay)
                time.sleep(delay)
        raise TransientSourceError(
            f"table {self.table!r}: {shown} failed after {attempts} attempts ({last})")

    def read(self) -> pd.DataFrame:
        import requests

        quiet_url_loggers()
        url, params = self._first_page()
        headers = self._headers()
        session = self.session or requests.Session()
        try:
            return self._read_pages(session, url, params, headers)
        finally:
            if self.session is None:
                session.close()

    def _read_pages(self, session: Any, url: str, params: dict[str, Any],
                    headers: dict[str, str]) -> pd.DataFrame:
        records: list[dict[str, Any]] = []
        page = 1
        for _ in range(self.spec.max_pages):
            if self.spec.page_param:
                params[self.spec.page_param] = page
            body = self._get(session, url, params, headers)
            rows = body.get(self.spec.records_path) if isinstance(body, dict) else None
            if not isinstance(rows, list):
                raise SourceError(f"table {self.table!r}: page of {mask_url(with_query(url, params))} "
                                  f"has no list at {self.spec.records_path!r}")
            records.extend(rows)
            if self.spec.page_param:
                if not rows:
                    break
                page += 1
                continue
            next_url = body.get(self.spec.next_path) if self.spec.next_path else None
            if not next_url:
                break
            url, params = next_url, {}  # the next URL carries its own query
        else:
            raise SourceError(f"table {self.table!r}: more than {self.spec.max_pages} pages")
        return pd.DataFrame.from_records(records)


def make_source(table: str, spec: TableSpec) -> BatchSource:
    """The source a table's contract asks for."""
    source = spec.source
    if isinstance(source, StreamSource):
        raise SourceError(f"table {table!r} is fed by the stream {source.stream!r}: `python -m flows.stream` "
                          "consumes it; batch ingest does not read it")
    if isinstance(source, FileSource):
        return FileBatchSource(table, source)
    if isinstance(source, SqlSource):
        return SqlBatchSource(table, source)
    return HttpBatchSource(table, source)
