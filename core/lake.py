"""Delta Lake access: every write is an ACID commit with a version and flywheel metadata.

Layout under the lake root: ``raw/<dataset>/<table>``, ``quarantine/<dataset>/<table>``,
``features/<dataset>``. Commit metadata keys start with ``flywheel.``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from core.contract import TableSpec

Zone = Literal["raw", "quarantine", "features"]


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
        return self.table(uri, version).to_pyarrow_table(columns=columns).to_pandas()

    def file_uris(self, uri: str, version: int | None = None) -> list[str]:
        return self.table(uri, version).file_uris()


class LakeError(RuntimeError):
    """A lake table or version is missing or unreadable."""


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


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert a conformed frame to Arrow with exactly ``schema``'s types."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame[schema.names], preserve_index=False)
    return table.cast(schema)
