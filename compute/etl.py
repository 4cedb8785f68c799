"""The Dask ETL graph: raw Delta tables -> joined, derived, encoded features -> feature table.

The base table is read once, joined with the (small, loaded whole) dimension tables and
derived partition by partition; only the columns the model needs are kept, in the cluster's
memory. The feature statistics are fitted on its training rows, then every row is encoded with
them and streamed into one Delta commit a window of partitions at a time. Reading and joining
twice instead (once to fit, once to encode) held less in memory but took twice as long.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from core.contract import DatasetContract
from core.features import (
    SPLIT_COLUMN,
    FeatureError,
    FeatureStats,
    as_utc,
    category_strings,
    code_fingerprint,
    derive,
    encode,
    explicit_split,
    finite,
    join_lookups,
    prepare_lookups,
    stats_from_aggregates,
    utc_timestamp,
)
from core.lake import Lake, LakeError

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


def _read_files(paths: list[str], columns: list[str], storage_options: dict[str, str] | None) -> pd.DataFrame:
    """One partition: the given Parquet data files of a Delta version, only ``columns``, read
    with pyarrow's file systems (local, or S3 from the lake's options and the AWS environment)."""
    import pyarrow.parquet as pq

    from core.lake import arrow_filesystem

    tables = []
    for path in paths:
        filesystem, key = arrow_filesystem(path, storage_options)
        tables.append(pq.read_table(key, filesystem=filesystem, columns=columns))
    # Text stays in Arrow (pandas' "string[pyarrow]"): no Python object per value, and the
    # transform's kernels read it without a copy.
    text = pd.StringDtype("pyarrow")
    return pa.concat_tables(tables, promote_options="default").to_pandas(
        types_mapper={pa.string(): text, pa.large_string(): text}.get)


def read_base(lake: Lake, uri: str, version: int, partition_rows: int, columns: list[str]) -> Any:
    """The base table at ``version`` as a Dask frame of about ``partition_rows`` per partition.

    Any number of data files (one per append, many after daily ingestion) are grouped into
    partitions by their row counts. Files are read with ``from_map`` rather than
    ``dd.read_parquet``: persisting a ``read_parquet`` with a column projection over more than
    one file returns a collection whose partitions do not match its futures, and every later
    compute fails with "lost dependencies" (dask/dask#12488, dask 2026.8).
    """
    import dask.dataframe as dd

    from core.lake import data_files

    table = lake.table(uri, version)
    files = data_files(table)  # oldest first: rows in the order they landed
    if not files:
        raise LakeError(f"{uri} version {version} holds no rows (a table's version 0 is its "
                        "empty creation): ingest data first or pick a later version")
    rows = _file_rows(table, files)
    groups: list[list[str]] = [[]]
    filled = 0
    for path in files:
        if groups[-1] and filled + rows.get(path, 0) > partition_rows:
            groups.append([])
            filled = 0
        groups[-1].append(path)
        filled += rows.get(path, 0)
    frame = dd.from_map(_read_files, groups, columns=columns, storage_options=lake.storage_options,
                        meta=_read_files(files[:1], columns, lake.storage_options).iloc[0:0],
                        enforce_metadata=False)
    # A large file is one partition: split it so both cores work and each partition stays
    # near partition_rows (the memory bound of a pass).
    wanted = -(-sum(rows.values()) // partition_rows)
    if frame.npartitions < wanted:
        frame = frame.repartition(npartitions=wanted)
    return frame


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


def _joined(base: Any, lookups: dict[str, pd.DataFrame], contract: DatasetContract) -> Any:
    """Base partitions joined with lookups and derived (lazy), narrowed to the model columns."""
    keep = model_columns(contract)

    def one(part: pd.DataFrame) -> pd.DataFrame:
        return derive(join_lookups(part, lookups, contract), contract)[keep]

    meta = one(base._meta)
    return base.map_partitions(one, meta=meta)


def fit_feature_stats(joined: Any, contract: DatasetContract, train_end: str,
                      validation_end: str, client: Any) -> tuple[FeatureStats, int]:
    """Aggregate over training rows with Dask, then build the stats in ``core``."""
    label = contract.target.name
    times = joined[contract.time_column].map_partitions(as_utc, meta=(contract.time_column, "datetime64[ns, UTC]"))
    has_label = ~joined[label].isna()
    train = joined[has_label & (times < utc_timestamp(train_end))]
    # Raw values are counted (fast for numbers), then the few distinct ones put as text below.
    counts = {c: train[c].value_counts() for c in contract.features.categorical}
    numeric = train[contract.features.numeric].map_partitions(
        lambda part: part.apply(finite), meta={c: "float64" for c in contract.features.numeric})
    names = list(counts)
    after_train = times >= utc_timestamp(train_end)
    before_validation_end = times < utc_timestamp(validation_end)
    futures = client.compute([
        *counts.values(), numeric.mean(), numeric.std(ddof=0), train[label].count(),
        train[label].mean(), (~has_label).sum(),
        (has_label & after_train & before_validation_end).sum(),
        (has_label & ~before_validation_end).sum(), times.min(), times.max()])
    (*count_values, means, stds, train_rows, label_mean, unlabeled, validation_rows, test_rows,
     first, last) = client.gather(futures)
    check_splits({"train": int(train_rows), "validation": int(validation_rows),
                  "test": int(test_rows)}, train_end, validation_end, first, last)
    value_counts = {name: _by_text(raw) for name, raw in zip(names, count_values, strict=True)}
    stats = stats_from_aggregates(contract, value_counts, means.to_dict(), stds.to_dict(),
                                  train_end, validation_end, int(train_rows), float(label_mean))
    return stats, int(unlabeled)


def _by_text(raw_counts: pd.Series) -> pd.Series:
    """Counts of raw values as counts of their category text (3 and 3.0 are both "3")."""
    text = category_strings(pd.Series(raw_counts.index, dtype=raw_counts.index.dtype))
    return pd.Series(raw_counts.to_numpy(), index=text.astype(object).to_numpy()).groupby(level=0).sum()


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


def split_bounds(joined: Any, contract: DatasetContract, client: Any) -> tuple[str, str]:
    """The contract's explicit boundaries, or time quantiles of the labelled rows."""
    explicit = explicit_split(contract)
    if explicit:
        return explicit
    split = contract.split
    times = joined[~joined[contract.target.name].isna()][contract.time_column]
    nanos = times.map_partitions(lambda s: as_utc(s).dt.as_unit("ns").astype("int64"),
                                 meta=(contract.time_column, "int64"))
    q = [split.train_fraction, split.train_fraction + split.validation_fraction]
    first, second = client.compute(nanos.quantile(q)).result().tolist()
    return (pd.Timestamp(int(first), tz="UTC").isoformat(), pd.Timestamp(int(second), tz="UTC").isoformat())


def _encoded_partitions(joined: Any, contract: DatasetContract, stats: FeatureStats, client: Any,
                        window: int, counts: dict[str, int]) -> Iterator[Any]:
    """Encode partitions a window at a time and yield them as Arrow record batches."""

    label = contract.target.name

    def one(part: pd.DataFrame) -> pd.DataFrame:
        part = part[part[label].notna()]
        return encode(part, contract, stats).reset_index(drop=True)

    delayed = joined.map_partitions(one, meta=one(joined._meta)).to_delayed()
    for start in range(0, len(delayed), window):
        futures = client.compute(delayed[start:start + window])
        for future in futures:
            frame = future.result()
            future.release()
            for name, n in frame[SPLIT_COLUMN].value_counts().items():
                counts[name] = counts.get(name, 0) + int(n)
            yield from pa.Table.from_pandas(frame, preserve_index=False).to_batches()
        log.info("encoded %d of %d partitions", min(start + window, len(delayed)), len(delayed))


def build_feature_table(lake: Lake, contract: DatasetContract, raw_versions: dict[str, int],
                        client: Any, partition_rows: int, flow_run_id: str = "") -> FeatureBuild:
    """Read raw tables at the given versions, build features, write a new feature version."""

    started = time.perf_counter()
    raw_tables = {}
    for table in contract.feature_tables():
        uri = lake.uri("raw", contract.name, table)
        raw_tables[table] = lake.identity(uri, raw_versions[table])
    base = read_base(lake, raw_tables[contract.base_table]["uri"], raw_versions[contract.base_table],
                      partition_rows, contract.base_columns_needed())
    lookups = prepare_lookups(
        {j.table: lake.read_pandas(raw_tables[j.table]["uri"], raw_versions[j.table]) for j in contract.joins},
        contract)
    joined = client.persist(_joined(base, lookups, contract))
    train_end, validation_end = split_bounds(joined, contract, client)
    stats, unlabeled = fit_feature_stats(joined, contract, train_end, validation_end, client)
    log.info("fitted feature stats on %s training rows (before %s)", f"{stats.train_rows:,}", train_end)

    counts: dict[str, int] = {}
    window = max(1, sum(client.nthreads().values()))
    batches = _encoded_partitions(joined, contract, stats, client, window, counts)
    first = next(batches, None)
    if first is None:
        raise ValueError("the ETL produced no rows with a label")
    reader = pa.RecordBatchReader.from_batches(first.schema, _chain(first, batches))
    feature_uri = lake.uri("features", contract.name)
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
    version = lake.append(feature_uri, reader, metadata, mode="overwrite", schema_mode="overwrite")
    del joined  # release the persisted partitions
    return FeatureBuild(feature_uri, version, stats, counts, unlabeled, raw_tables,
                        time.perf_counter() - started)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def load_stats(lake: Lake, feature_uri: str, version: int | None = None) -> FeatureStats:
    """The feature stats committed with a feature table version."""
    return FeatureStats.from_json(lake.commit_metadata(feature_uri, version)[STATS_KEY])
