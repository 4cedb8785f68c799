"""Delta Lake access: every write is an ACID commit with a version and flywheel metadata.

Layout under the lake root: ``raw/<dataset>/<table>``, ``quarantine/<dataset>/<table>``,
``features/<dataset>``. Commit metadata keys start with ``flywheel.``.

Writers that must not race (two ingests of the same table at once) plan against a snapshot and
commit on top of that same snapshot with a Delta application transaction (``app_id``). Delta's
conflict checker refuses a commit when another commit carrying the same ``app_id`` landed after
the snapshot was read, so the loser re-reads the table and plans again: check and commit act as
one step without any lock, on a local folder and on object storage alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from core.compat.deltalake import lost_race
from core.errors import FlywheelError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from core.contract import TableSpec

Zone = Literal["raw", "quarantine", "features", "serving"]

# The application transaction every ingest writer carries (see the module docstring).
INGEST_APP_ID = "flywheel.ingest"


@dataclass(frozen=True)
class Lake:
    """A lake root (local folder or object-store URL) and the options to reach it."""

    root: str
    storage_options: dict[str, str] | None = None

    def uri(self, zone: Zone, dataset: str, table: str | None = None) -> str:
        parts = [self.root.rstrip("/"), zone, dataset] + ([table] if table else [])
        return "/".join(parts)

    def exists(self, uri: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(uri, storage_options=self.storage_options)

    def table(self, uri: str, version: int | None = None):  # noqa: ANN201 - DeltaTable
        from deltalake import DeltaTable

        if not self.exists(uri):
            raise LakeError(f"no Delta table at {uri}")
        try:
            return DeltaTable(uri, version=version, storage_options=self.storage_options)
        except Exception as exc:  # deltalake raises its own errors for a missing version
            raise LakeError(f"cannot open {uri} at version {version}: {exc}") from None

    def latest_version(self, uri: str) -> int | None:
        return self.table(uri).version() if self.exists(uri) else None

    def identity(self, uri: str, version: int | None = None) -> dict[str, Any]:
        """What identifies the data read: the table's unique id and version."""
        table = self.table(uri, version)
        return {"uri": uri, "table_id": table.metadata().id, "version": table.version()}

    def append(
        self,
        uri: str,
        data: pa.Table | Any,
        metadata: dict[str, Any],
        schema_mode: Literal["merge", "overwrite"] | None = None,
        mode: Literal["append", "overwrite"] = "append",
    ) -> int:
        """Append (or overwrite) ``data`` as one commit; returns the new table version."""
        from deltalake import CommitProperties, write_deltalake

        custom = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        write_deltalake(
            uri,
            data,
            mode=mode,
            schema_mode=schema_mode,
            storage_options=self.storage_options,
            commit_properties=CommitProperties(custom_metadata=custom),
        )
        return self.table(uri).version()

    def open_or_create(self, uri: str, schema: pa.Schema) -> Any:
        """A snapshot of the table at ``uri``, created empty with ``schema`` if it is missing.

        Creating first (an empty version 0) gives every later data write a snapshot to commit
        on top of, so concurrent first writes are checked like any other; of two concurrent
        creators one wins and both go on with the same table.
        """
        from deltalake import CommitProperties, DeltaTable

        if not self.exists(uri):
            try:
                DeltaTable.create(uri, schema, mode="ignore", storage_options=self.storage_options,
                                  commit_properties=CommitProperties(
                                      custom_metadata={"flywheel.operation": "create"}))
            except Exception:  # a concurrent creator won the race for version 0
                if not self.exists(uri):
                    raise
        return DeltaTable(uri, storage_options=self.storage_options)

    def commit(self, snapshot: Any, data: pa.Table | Any, metadata: dict[str, Any],
               app_id: str | None = None, keys: list[str] | None = None) -> int:
        """Write ``data`` as one commit on top of ``snapshot``; returns the new version.

        Without ``keys`` the rows are appended; with ``keys`` they are merged by key (matching
        rows updated, the rest inserted). With ``app_id`` the commit carries that application
        transaction, and if another writer with the same ``app_id`` committed after
        ``snapshot`` was read, nothing is written and ``ConcurrentWriteError`` is raised.
        """
        from deltalake import write_deltalake
        from deltalake.exceptions import CommitFailedError

        properties = _commit_properties(snapshot, metadata, app_id)
        try:
            if keys:
                predicate = " AND ".join(f't."{k}" = s."{k}"' for k in keys)
                (snapshot.merge(data, predicate=predicate, source_alias="s", target_alias="t",
                                merge_schema=True, commit_properties=properties)
                 .when_matched_update_all().when_not_matched_insert_all().execute())
            else:
                write_deltalake(snapshot, data, mode="append", schema_mode="merge",
                                commit_properties=properties)
        except CommitFailedError as exc:
            if lost_race(exc):
                raise ConcurrentWriteError(
                    f"{snapshot.table_uri}: another writer committed first ({exc})") from None
            raise
        return int(snapshot.version())

    def commit_at(self, snapshot: Any, data: pa.Table | Any, metadata: dict[str, Any], app_id: str,
                  position: int) -> int:
        """Append ``data`` (it may have no rows) as one commit on top of ``snapshot`` that also
        records ``position`` as the application transaction ``app_id``: the data and the
        position of the source it came from land together or not at all.

        Delta keeps whatever version a writer records; it is checked here that it grows
        (``StalePositionError`` if the snapshot already holds ``position`` or beyond), and a
        writer with the same ``app_id`` that committed after the snapshot was read makes this
        commit fail with ``ConcurrentWriteError`` before anything is written."""
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        held = snapshot.transaction_version(app_id)
        if held is not None and held >= position:
            raise StalePositionError(f"{snapshot.table_uri}: {app_id} is already at {held} (>= {position})")
        custom = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        properties = CommitProperties(custom_metadata=custom, app_transactions=[Transaction(app_id, position)])
        try:
            write_deltalake(snapshot, data, mode="append", schema_mode="merge", commit_properties=properties)
        except CommitFailedError as exc:
            if lost_race(exc):
                raise ConcurrentWriteError(f"{snapshot.table_uri}: another writer committed first ({exc})") from None
            raise
        return int(snapshot.version())

    def commit_files(self, uri: str, files: list[DataFile], metadata: dict[str, Any],
                     mode: Literal["append", "overwrite"] = "overwrite") -> int:
        """Commit data files already written into the table's folder (``write_data_file``, e.g.
        by several workers at once) as one version, in the order given (readers take the
        files in that order); with ``overwrite`` the table's schema becomes the files'.
        Returns the new version. Files written but never committed are not part of the table
        (``vacuum`` removes them)."""
        from deltalake import CommitProperties, DeltaTable
        from deltalake import Schema as DeltaSchema
        from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

        if not files:
            raise LakeError(f"{uri}: no data files to commit")
        custom = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        properties = CommitProperties(custom_metadata=custom)
        # Modification times one millisecond apart keep the files' order (``data_files``).
        now = int(time.time() * 1000)
        actions: list[AddAction | RemoveAction] = [AddAction(f.path, f.size, {}, now + i, True, f.stats)
                                                   for i, f in enumerate(files)]
        schema = DeltaSchema.from_arrow(files[0].schema)
        if self.exists(uri):
            DeltaTable(uri, storage_options=self.storage_options).create_write_transaction(
                actions, mode=mode, schema=schema, commit_properties=properties)
        else:
            create_table_with_add_actions(uri, schema, [a for a in actions if isinstance(a, AddAction)],
                                          mode="append", storage_options=self.storage_options,
                                          commit_properties=properties)
        return self.table(uri).version()

    def commit_metadata(self, uri: str, version: int | None = None) -> dict[str, str]:
        """The flywheel.* metadata written with a commit (default: the latest)."""
        table = self.table(uri)
        wanted = table.version() if version is None else version
        for entry in table.history():
            if entry.get("version") == wanted:
                return {k: v for k, v in entry.items() if k.startswith("flywheel.")}
        raise LakeError(f"{uri} has no commit {wanted} in its history")

    def history(self, uri: str) -> list[dict[str, Any]]:
        return self.table(uri).history() if self.exists(uri) else []

    def read_pandas(self, uri: str, version: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        return read_arrow(self.table(uri, version), columns).to_pandas()

    def file_uris(self, uri: str, version: int | None = None) -> list[str]:
        return data_files(self.table(uri, version))


def data_files(snapshot: Any) -> list[str]:
    """A snapshot's data files in the order they were added (oldest first), so its rows read in
    the order they landed. ``DeltaTable.file_uris`` lists the newest commit's files first: a
    table of daily appends or stream micro-batches read newest first, and the same rows landed
    once (one file) or over time (many) fed training in different orders. (Compaction writes
    its own order into the files it merges.)"""
    import pyarrow as pa

    files = snapshot.file_uris()
    if len(files) < 2:
        return list(files)
    actions = pa.table(snapshot.get_add_actions(flatten=True)).select(["path", "modification_time"]).to_pydict()
    # The log names files relative to the table, file_uris() absolutely; data file names are
    # unique (a UUID each), so the last path part pairs them.
    added = {path.rsplit("/", 1)[-1]: (int(when.timestamp() * 1e6) if hasattr(when, "timestamp") else int(when))
             for path, when in zip(actions["path"], actions["modification_time"], strict=True)}
    order = {uri: position for position, uri in enumerate(reversed(files))}  # ties: log order, oldest first
    return sorted(files, key=lambda uri: (added.get(uri.rsplit("/", 1)[-1], 0), order[uri]))


def read_arrow(snapshot: Any, columns: list[str] | None = None) -> pa.Table:
    """A Delta snapshot's rows (``columns`` only), read from its data files with pyarrow's own
    file systems.

    ``DeltaTable.to_pyarrow_table`` scans through a Python file-system bridge whose last
    asynchronous callbacks can still run on Arrow's I/O threads while the interpreter exits;
    they need the GIL, the thread is cancelled and the process aborts ("terminate called
    without an active exception", exit 134) after its work is done (seen with deltalake 1.6
    and pyarrow 25). Reading the files directly has no such bridge. A column missing from
    older files (a column added later) reads as nulls.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    schema = pa.schema(snapshot.schema())
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    tables = []
    for uri in data_files(snapshot):
        filesystem, path = fs.FileSystem.from_uri(uri)
        parquet = pq.ParquetFile(path, filesystem=filesystem)
        present = [c for c in schema.names if c in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
        for name in schema.names:
            if name not in present:
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def arrow_filesystem(uri: str, storage_options: dict[str, str] | None = None) -> tuple[Any, str]:
    """pyarrow's file system for ``uri`` and the path in it. An s3:// URI takes the lake's
    storage options where given (deltalake's names, e.g. ``AWS_ENDPOINT_URL``), else the AWS
    environment, as deltalake does."""
    from pyarrow import fs

    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    if uri.startswith(("s3://", "s3a://")) and options:
        endpoint = options.get("aws_endpoint_url") or options.get("endpoint_url") or options.get("aws_endpoint")
        scheme = "http" if endpoint and endpoint.startswith("http://") else "https"
        filesystem = fs.S3FileSystem(
            access_key=options.get("aws_access_key_id"), secret_key=options.get("aws_secret_access_key"),
            session_token=options.get("aws_session_token"), region=options.get("aws_region"),
            endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None, scheme=scheme)
        return filesystem, uri.split("://", 1)[1]
    return fs.FileSystem.from_uri(uri)


@dataclass(frozen=True)
class DataFile:
    """A Parquet data file written into a Delta table's folder, not yet committed."""

    path: str  # relative to the table
    size: int
    stats: str  # Delta's per-file statistics (JSON)
    schema: Any  # pyarrow Schema


def write_data_file(table_uri: str, data: pa.Table, storage_options: dict[str, str] | None = None,
                    prefix: str = "part") -> DataFile:
    """Write ``data`` as one Parquet file (snappy, as deltalake writes them) in the folder of
    the Delta table at ``table_uri``, for ``Lake.commit_files``. Times are stored in
    microseconds, Delta's timestamp precision; the file's statistics give its row count,
    null counts and the range of its numeric columns."""
    import uuid

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fields = [pa.field(f.name, pa.timestamp("us", tz=f.type.tz)) if pa.types.is_timestamp(f.type) else f
              for f in data.schema]
    data = data.cast(pa.schema(fields), safe=False)
    filesystem, root = _table_folder(table_uri, storage_options)
    filesystem.create_dir(root, recursive=True)
    name = f"{prefix}-{uuid.uuid4()}-c000.snappy.parquet"
    path = f"{root.rstrip('/')}/{name}"
    pq.write_table(data, path, filesystem=filesystem, compression="snappy")
    stats: dict[str, Any] = {"numRecords": data.num_rows, "minValues": {}, "maxValues": {},
                             "nullCount": {n: data.column(n).null_count for n in data.column_names}}
    for name_, column in zip(data.column_names, data.columns, strict=True):
        if data.num_rows and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            bounds = pc.min_max(column)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if low is not None and high is not None and all(abs(float(v)) != float("inf") and v == v
                                                            for v in (low, high)):
                stats["minValues"][name_], stats["maxValues"][name_] = low, high
    return DataFile(name, filesystem.get_file_info(path).size, json.dumps(stats), data.schema)


def _table_folder(table_uri: str, storage_options: dict[str, str] | None) -> tuple[Any, str]:
    """The file system and folder of a Delta table (a local path made absolute)."""
    import os

    return arrow_filesystem(table_uri if "://" in table_uri else os.path.abspath(table_uri), storage_options)


def remove_data_files(table_uri: str, files: list[DataFile], storage_options: dict[str, str] | None = None) -> None:
    """Delete data files ``write_data_file`` wrote that will not be committed (a build that
    failed after some of its files were written): the table's folder holds only what its log
    names, as before the build. A file already gone is fine."""
    filesystem, root = _table_folder(table_uri, storage_options)
    for file in files:
        try:
            filesystem.delete_file(f"{root.rstrip('/')}/{file.path}")
        except FileNotFoundError:
            pass


class LakeError(FlywheelError):
    """A lake table or version is missing or unreadable."""


class StalePositionError(LakeError):
    """The table already holds this source position (an earlier run committed it)."""


class ConcurrentWriteError(LakeError):
    """Another writer of the same application committed after our snapshot: plan again."""


def _commit_properties(snapshot: Any, metadata: dict[str, Any], app_id: str | None) -> Any:
    from deltalake import CommitProperties, Transaction

    custom = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    transactions = None
    if app_id:
        # The version only has to grow; Delta does not check that, so it is derived here from
        # the snapshot the writer planned against.
        transactions = [Transaction(app_id, (snapshot.transaction_version(app_id) or 0) + 1)]
    return CommitProperties(custom_metadata=custom, app_transactions=transactions)


def arrow_schema(spec: TableSpec, extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema a table's contract implies (datetimes as UTC microseconds)."""
    import pyarrow as pa

    types = {
        "int": pa.int64(),
        "float": pa.float64(),
        "str": pa.string(),
        "bool": pa.bool_(),
        "datetime": pa.timestamp("us", tz="UTC"),
    }
    fields = [pa.field(name, types[col.type], nullable=True) for name, col in spec.columns.items()]
    fields += [pa.field(name, dtype) for name, dtype in (extra or {}).items()]
    return pa.schema(fields)


def nullable_types(dtype: Any) -> Any:
    """Arrow -> pandas types that do not change with the presence of nulls (int stays int)."""
    # Floats stay float64 and text stays object on both sides already; only ints and bools
    # would turn float/object where one side has nulls and the other has none.
    import pandas as pd
    import pyarrow as pa

    return {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get(dtype)


def canonical(frame: pd.DataFrame, schema: Any) -> pd.DataFrame:
    """A frame as the lake stores it, read back with null-stable dtypes: equal rows compare
    and hash equal whether they come from a batch or from the table."""
    return to_arrow(frame, schema).to_pandas(types_mapper=nullable_types)


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert a conformed frame to Arrow with exactly ``schema``'s types."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame[schema.names], preserve_index=False)
    return table.cast(schema)
