"""The Dask ETL graph: raw Delta tables -> joined, derived, encoded features -> feature table.

The base table's files are read once as Arrow tables (text dictionary-encoded, as Parquet
stores it), cut into partitions of about ``partition_rows`` rows, joined by key with the
(small, loaded whole) dimension tables and derived; only what the model needs is kept, in the
cluster's memory, as compact Arrow and NumPy columns (``core.transform.Partition``: no pandas
frame between the steps). The feature statistics are aggregated on its training rows, then
every partition is encoded with them and written as a Parquet data file by the worker that
holds it, and the files are committed as one Delta version. Reading and joining twice instead
(once to fit, once to encode) held less in memory but took twice as long.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from core.contract import DatasetContract
from core.features import (
    SPLITS,
    FeatureError,
    FeatureStats,
    code_fingerprint,
    explicit_split,
    prepare_lookups,
    stats_from_partitions,
)
from core.lake import DataFile, Lake, LakeError, remove_data_files, write_data_file
from core.transform import (
    Partition,
    arrow_lookups,
    combine_aggregates,
    encode_partition,
    partition_aggregates,
    prepare_partition,
)

log = logging.getLogger(__name__)

STATS_KEY = "flywheel.feature_stats"


@dataclass
class FeatureBuild:
    feature_uri: str
    feature_version: int
    stats: FeatureStats
    rows_by_split: dict[str, int]
    rows_without_label: int
    raw_tables: dict[str, dict[str, Any]]
    seconds: float


def _read_table(paths: list[str], columns: list[str], storage_options: dict[str, str] | None,
                dictionary: list[str] | None = None) -> pa.Table:
    """The given Parquet data files of a Delta version, only ``columns``, as one Arrow table,
    read with pyarrow's file systems (local, or S3 from the lake's options and the AWS
    environment). ``dictionary`` columns (text) are read as Parquet stores them, dictionary
    encoded: several times faster than building every string, and the join and the encoding
    then look each distinct value up once."""
    import pyarrow.parquet as pq

    from core.lake import arrow_filesystem

    tables = []
    for path in paths:
        filesystem, key = arrow_filesystem(path, storage_options)
        tables.append(pq.read_table(key, filesystem=filesystem, columns=columns, read_dictionary=dictionary))
    return pa.concat_tables(tables, promote_options="default")


def file_groups(lake: Lake, uri: str, version: int, partition_rows: int) -> list[tuple[list[str], int]]:
    """The version's data files, oldest first (rows in the order they landed), grouped into
    runs of at most ``partition_rows`` rows (a larger file is a group alone), with each group's
    row count from the Delta log."""
    from core.lake import data_files

    table = lake.table(uri, version)
    files = data_files(table)
    if not files:
        raise LakeError(f"{uri} version {version} holds no rows (a table's version 0 is its "
                        "empty creation): ingest data first or pick a later version")
    rows = _file_rows(table, files)
    groups: list[tuple[list[str], int]] = [([], 0)]
    for path in files:
        if groups[-1][0] and groups[-1][1] + rows.get(path, 0) > partition_rows:
            groups.append(([], 0))
        paths, filled = groups[-1]
        groups[-1] = ([*paths, path], filled + rows.get(path, 0))
    return groups


def _file_rows(table: Any, files: list[str]) -> dict[str, int]:
    """Rows per data file from the Delta log's statistics (0 where a file has none)."""

    actions = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    # The log names files relative to the table, file_uris() absolutely; Delta's data file
    # names are unique (a UUID each), so the last path part matches them in one pass.
    counts = {p.rsplit("/", 1)[-1]: n for p, n in zip(actions["path"], actions["num_records"], strict=True)}
    return {path: int(counts.get(path.rsplit("/", 1)[-1]) or 0) for path in files}


def model_columns(contract: DatasetContract) -> list[str]:
    """What encoding needs of a derived row: time, label, features."""
    columns = [contract.time_column, contract.target.name, *contract.features.categorical,
               *contract.features.numeric]
    return list(dict.fromkeys(columns))


def check_splits(rows: dict[str, int], train_end: str, validation_end: str, first: Any,
                 last: Any) -> None:
    """Refuse to build a feature table with an empty split, naming it and the boundaries."""
    empty = [name for name, n in rows.items() if n == 0]
    if empty:
        raise FeatureError(
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: "
            f"labelled rows per split {rows} with train before {train_end} and validation "
            f"before {validation_end}, while the time column runs from {first} to {last}; "
            "adjust split.train_end / split.validation_end in the contract")


def partition_plan(groups: list[tuple[list[str], int]], partition_rows: int,
                   ) -> list[tuple[list[str], list[tuple[int, int | None]]]]:
    """Each file group (``file_groups``), read once, and the row ranges (start, length) it is
    cut into: about ``partition_rows`` each, so both threads get work when one file holds
    millions of rows; the last range runs to the end of the read (None)."""
    plan = []
    for paths, rows in groups:
        pieces = max(1, -(-rows // partition_rows))
        step = -(-rows // pieces)
        plan.append((paths, [(i * step, step if i < pieces - 1 else None) for i in range(pieces)]))
    return plan


def _slice_and_prepare(table: pa.Table, start: int, length: int | None, lookups: dict[str, Any],
                       contract: DatasetContract) -> Partition:
    """One partition: rows ``start`` to ``start + length`` (to the end if None) of a read."""
    return prepare_partition(table.slice(start, length), lookups, contract)


def _labelled_nanos(part: Partition) -> Any:
    return part.labelled_nanos


def split_bounds(partitions: list[Any], contract: DatasetContract, client: Any) -> tuple[str, str]:
    """The contract's explicit boundaries, or time quantiles of the labelled rows (linear
    interpolation, as ``core.features.split_boundaries`` takes them)."""
    import numpy as np

    explicit = explicit_split(contract)
    if explicit:
        return explicit
    split = contract.split
    nanos = np.sort(np.concatenate(client.gather(client.map(_labelled_nanos, partitions, pure=False))))
    if not len(nanos):
        raise FeatureError("no labelled rows with a time value to split on")
    q = [split.train_fraction, split.train_fraction + split.validation_fraction]
    first, second = np.quantile(nanos.astype(np.float64), q)
    return (pd.Timestamp(int(round(first)), tz="UTC").isoformat(),
            pd.Timestamp(int(round(second)), tz="UTC").isoformat())


def fit_feature_stats(partitions: list[Any], contract: DatasetContract, train_end: str,
                      validation_end: str, client: Any) -> tuple[FeatureStats, dict[str, int], int]:
    """Aggregate each partition's training rows on the cluster, combine them here, then build
    the stats in ``core``. Returns the stats, labelled rows per split and unlabelled rows."""
    parts = client.gather(client.map(partition_aggregates, partitions, train_end=train_end,
                                     validation_end=validation_end, pure=False))
    total = combine_aggregates(parts)
    rows = dict(zip(SPLITS, (int(n) for n in total["splits"]), strict=True))
    check_splits(rows, train_end, validation_end, total["first"], total["last"])
    stats = stats_from_partitions(contract, total, train_end, validation_end)
    return stats, rows, int(total["unlabeled"])


def _encode_and_write(part: Partition, contract: DatasetContract, stats: FeatureStats, feature_uri: str,
                      storage_options: dict[str, str] | None, index: int) -> DataFile | None:
    """Encode one partition and write it as a data file of the feature table (None: no rows)."""
    encoded = encode_partition(part, contract, stats)
    if not encoded.num_rows:
        return None
    return write_data_file(feature_uri, encoded, storage_options, prefix=f"part-{index:05d}")


def build_feature_table(lake: Lake, contract: DatasetContract, raw_versions: dict[str, int],
                        client: Any, partition_rows: int, flow_run_id: str = "") -> FeatureBuild:
    """Read raw tables at the given versions, build features, write a new feature version.

    Each group of data files is read once as an Arrow table, cut into partitions of about
    ``partition_rows`` rows, and each partition joined, derived and kept in the cluster's
    memory (``core.transform.prepare_partition``). The statistics are aggregated from them,
    then every partition is encoded and written as a Parquet data file where it lies, and the
    files are committed as one Delta version."""

    started = time.perf_counter()
    raw_tables = {}
    for table in contract.feature_tables():
        uri = lake.uri("raw", contract.name, table)
        raw_tables[table] = lake.identity(uri, raw_versions[table])
    groups = file_groups(lake, raw_tables[contract.base_table]["uri"], raw_versions[contract.base_table],
                         partition_rows)
    lookups = arrow_lookups(prepare_lookups(
        {j.table: lake.read_pandas(raw_tables[j.table]["uri"], raw_versions[j.table]) for j in contract.joins},
        contract), contract)
    [shared] = client.scatter([lookups], broadcast=True, hash=False)
    columns = contract.base_columns_needed()
    base_spec = contract.tables[contract.base_table]
    text = [c for c in columns if base_spec.columns[c].type == "str"]
    partitions = []
    for paths, pieces in partition_plan(groups, partition_rows):
        read = client.submit(_read_table, paths, columns, lake.storage_options, text, pure=False)
        partitions += [client.submit(_slice_and_prepare, read, start, length, shared, contract, pure=False)
                       for start, length in pieces]
    del read, shared
    train_end, validation_end = split_bounds(partitions, contract, client)
    stats, counts, unlabeled = fit_feature_stats(partitions, contract, train_end, validation_end, client)
    log.info("fitted feature stats on %s training rows (before %s)", f"{stats.train_rows:,}", train_end)

    # Every partition is encoded and written as a data file where it lies, both cores at
    # once; the files are then committed as one version, in partition order.
    feature_uri = lake.uri("features", contract.name)
    written = [client.submit(_encode_and_write, part, contract, stats, feature_uri, lake.storage_options, i,
                             pure=False) for i, part in enumerate(partitions)]
    del partitions  # each prepared partition is released once its file is written
    try:
        files = [f for f in client.gather(written) if f is not None]
        if not files:
            raise ValueError("the ETL produced no rows with a label")
        version = _commit(lake, feature_uri, files, stats, raw_tables, contract, flow_run_id)
    except BaseException:
        # A failed build leaves no file of its own in the table's folder: those written by the
        # partitions that finished are deleted (the others were never written).
        done = [f.result() for f in written if f.status == "finished"]
        client.cancel(written)
        _remove_uncommitted(lake, feature_uri, [f for f in done if f is not None])
        raise
    return FeatureBuild(feature_uri, version, stats, counts, unlabeled, raw_tables,
                        time.perf_counter() - started)


def _remove_uncommitted(lake: Lake, feature_uri: str, files: list[DataFile]) -> None:
    """Delete a failed build's files, unless its commit went through (then they are the table)."""
    from core.lake import data_files

    if files and lake.exists(feature_uri):
        names = {path.rsplit("/", 1)[-1] for path in data_files(lake.table(feature_uri))}
        if any(f.path in names for f in files):
            return
    remove_data_files(feature_uri, files, lake.storage_options)


def _commit(lake: Lake, feature_uri: str, files: list[DataFile], stats: FeatureStats, raw_tables: dict[str, Any],
            contract: DatasetContract, flow_run_id: str) -> int:
    """The written files as the feature table's new version, with the build's metadata."""
    metadata = {
        STATS_KEY: stats.to_json(),
        "flywheel.feature_stats_sha256": stats.fingerprint(),
        "flywheel.raw_tables": json.dumps(raw_tables, sort_keys=True),
        "flywheel.contract_sha256": contract.fingerprint(),
        "flywheel.transform_sha256": code_fingerprint(),
        "flywheel.flow_run_id": flow_run_id,
    }
    # Each build replaces the table's contents in a new version; earlier versions stay
    # readable by time travel, so any model can be rebuilt from exactly its features.
    return lake.commit_files(feature_uri, files, metadata, mode="overwrite")


def load_stats(lake: Lake, feature_uri: str, version: int | None = None) -> FeatureStats:
    """The feature stats committed with a feature table version."""
    return FeatureStats.from_json(lake.commit_metadata(feature_uri, version)[STATS_KEY])
