"""The one feature transform, shared by the Dask ETL (per partition) and serving (per batch).

``transform(joined_rows, contract, stats)`` turns rows of the joined base table into model
inputs: derived features, the target label, integer codes for categoricals (0 = unknown or
missing) and standardized numerics (missing -> 0, the training mean). ``stats`` are fitted on
the training period only, by ``fit_stats`` or from aggregates computed elsewhere (Dask).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import FlywheelError

if TYPE_CHECKING:
    import pandas as pd

    from core.contract import DatasetContract

SPLIT_COLUMN = "split"
SPLITS = ("train", "validation", "test")


class FeatureStats(BaseModel):
    """Everything fitted on the training period that the transform needs."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    vocabularies: dict[str, list[str]] = Field(description="Category values by frequency; code = index + 1.")
    means: dict[str, float]
    stds: dict[str, float]
    train_end: str = Field(description="ISO timestamp: rows before it are training rows.")
    validation_end: str = Field(description="ISO timestamp: rows before it (and after train_end) validate.")
    train_rows: int
    label_mean: float = Field(description="Prior rate (classification) or mean target (regression).")

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> FeatureStats:
        return cls.model_validate(json.loads(text))

    def cardinalities(self) -> dict[str, int]:
        """Embedding table sizes: vocabulary plus the unknown code 0."""
        return {name: len(vocab) + 1 for name, vocab in self.vocabularies.items()}


def as_utc(series: pd.Series) -> pd.Series:
    import pandas as pd

    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC")
    return pd.to_datetime(series, utc=True)


def utc_timestamp(text: str) -> pd.Timestamp:
    """A boundary timestamp; naive text is read as UTC."""
    import pandas as pd

    stamp = pd.Timestamp(text)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def arrow_column(series: pd.Series) -> Any:
    """A pandas column as an Arrow array (missing values as nulls, times as UTC)."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(series.dtype, pd.ArrowDtype):
        return series.array._pa_array
    if pd.api.types.is_datetime64_any_dtype(series):
        series = as_utc(series)
    return pa.array(series, from_pandas=True)


def frame_columns(frame: pd.DataFrame, names: Any = None) -> dict[str, Any]:
    return {name: arrow_column(frame[name]) for name in (frame.columns if names is None else names)}


def derive(joined: pd.DataFrame, contract: DatasetContract) -> pd.DataFrame:
    """Add derived features and the target label (NaN where the target is missing), with the
    Arrow kernels of ``core.transform``; new text and integer columns are Arrow-backed."""
    import pandas as pd

    from core.transform import derive_columns

    needed = [c for c in _derive_inputs(contract) if c in joined.columns]
    columns = frame_columns(joined, needed)
    for spec in contract.derived:
        if spec.column and spec.column in columns and not pd.api.types.is_datetime64_any_dtype(joined[spec.column]):
            columns[spec.column] = arrow_column(as_utc(joined[spec.column]))  # text times, as pandas reads them
    derived = derive_columns(columns, contract)
    frame = joined.copy()
    for spec in contract.derived:
        column = derived[spec.name]
        frame[spec.name] = (column.to_numpy(zero_copy_only=False) if spec.op == "expr"
                            else pd.Series(pd.arrays.ArrowExtensionArray(column), index=joined.index))
    frame[contract.target.name] = derived[contract.target.name].to_numpy(zero_copy_only=False)
    return frame


def _derive_inputs(contract: DatasetContract) -> list[str]:
    from core.transform import expr_names

    names = [contract.target.column]
    made = {spec.name for spec in contract.derived}
    for spec in contract.derived:
        used = [spec.column] if spec.column else list(spec.columns)
        if spec.expr:
            used = expr_names(spec.expr)
        names += [c for c in used if c and c not in made]
    return list(dict.fromkeys(names))


def derive_pandas(joined: pd.DataFrame, contract: DatasetContract) -> pd.DataFrame:
    """The pandas transform's ``derive`` that ``derive`` replaced: kept as the reference the
    property test and ``benchmarks/transform.py`` compare against."""
    frame = joined.copy()
    for spec in contract.derived:
        if spec.op == "concat":
            parts = [frame[c].astype("string") for c in spec.columns]
            out = parts[0]
            for part in parts[1:]:
                out = out + spec.sep + part
            frame[spec.name] = out
        elif spec.op == "expr":
            frame[spec.name] = frame.eval(spec.expr, engine="python").astype("float64")
        else:
            times = as_utc(frame[spec.column])
            if spec.timezone:
                times = times.dt.tz_convert(spec.timezone)
            part = {"hour": times.dt.hour, "weekday": times.dt.weekday, "month": times.dt.month,
                    "dayofyear": times.dt.dayofyear}[spec.op]
            frame[spec.name] = part.astype("Int64")
    target = contract.target
    values = frame[target.column].astype("float64")
    if target.kind == "binary":
        frame[target.name] = np.where(values.isna(), np.nan, (values > target.threshold).astype("float64"))
    else:
        frame[target.name] = values
    return frame


def category_strings(series: pd.Series) -> pd.Series:
    """Categorical values as text, value by value as the encoding reads them
    (``core.transform.category_text``): what the vocabularies are fitted on."""
    import pandas as pd

    from core.transform import category_text

    return pd.Series(pd.arrays.ArrowExtensionArray(category_text(arrow_column(series))), index=series.index,
                     name=series.name)


def category_strings_pandas(series: pd.Series) -> pd.Series:
    """The pandas transform's category text (the reference; see ``derive_pandas``)."""
    import pandas as pd

    if pd.api.types.is_float_dtype(series) and (series.dropna() % 1 == 0).all():
        series = series.astype("Int64")
    return series.astype("string")


def assign_split(times: pd.Series, stats: FeatureStats) -> pd.Series:
    """Each row's split by its time (Arrow-backed text: "train", "validation" or "test")."""
    import pandas as pd
    import pyarrow as pa

    nanos = as_utc(times).dt.as_unit("ns").to_numpy("datetime64[ns]").view("int64")
    bounds = [utc_timestamp(stats.train_end).as_unit("ns").value, utc_timestamp(stats.validation_end).as_unit("ns").value]
    index = np.searchsorted(np.asarray(bounds, dtype=np.int64), nanos, side="right").astype(np.int8)
    index[as_utc(times).isna().to_numpy()] = 2  # no time: not before either boundary, as before
    split = pa.DictionaryArray.from_arrays(pa.array(index), pa.array(SPLITS)).cast(pa.string())
    return pd.Series(pd.arrays.ArrowExtensionArray(split), index=times.index, name=None)


def encode(derived: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> pd.DataFrame:
    """Model inputs: categorical codes (int32), standardized numerics (float32), label, split,
    with the compiled encoding of ``core.transform``."""
    import pandas as pd

    from core.transform import compiled

    names = [*contract.features.categorical, *contract.features.numeric]
    encoded = compiled(contract, stats).encode(frame_columns(derived, names), len(derived))
    out: dict[str, pd.Series | np.ndarray] = {}
    out[contract.time_column] = as_utc(derived[contract.time_column])
    out[SPLIT_COLUMN] = assign_split(derived[contract.time_column], stats)
    out[contract.target.name] = derived[contract.target.name].to_numpy(np.float64, na_value=np.nan)
    for j, name in enumerate(contract.features.categorical):
        out[name] = encoded.categorical[:, j]
    for j, name in enumerate(contract.features.numeric):
        out[name] = encoded.numeric[:, j].astype(np.float32)
    return pd.DataFrame(out, index=derived.index)


def encode_pandas(derived: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> pd.DataFrame:
    """The pandas transform's ``encode`` (the reference; see ``derive_pandas``)."""
    import pandas as pd

    out: dict[str, pd.Series | np.ndarray] = {}
    out[contract.time_column] = as_utc(derived[contract.time_column])
    out[SPLIT_COLUMN] = assign_split(derived[contract.time_column], stats)
    out[contract.target.name] = derived[contract.target.name].astype("float64")
    for name in contract.features.categorical:
        vocab = stats.vocabularies[name]
        codes = pd.Categorical(category_strings_pandas(derived[name]), categories=vocab).codes
        out[name] = (codes.astype("int32") + 1)  # -1 (unknown/missing) becomes 0
    for name in contract.features.numeric:
        values = finite(derived[name])
        scaled = ((values - stats.means[name]) / stats.stds[name]).fillna(0.0)
        out[name] = scaled.astype("float32")
    return pd.DataFrame(out, index=derived.index)


class FeatureError(FlywheelError, ValueError):
    """The features cannot be built as the contract asks (an empty split, ...)."""


def finite(values: pd.Series) -> pd.Series:
    """A numeric feature as float64 with +-inf treated as missing (a contract may allow
    non-finite raw values; scaling and the model must never see them)."""
    values = values.astype("float64")
    return values.where(np.isfinite(values))


def transform(joined: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> pd.DataFrame:
    """The per-row feature transform: joined raw rows in, model-ready rows out."""
    return encode(derive(joined, contract), contract, stats)


def transform_pandas(joined: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> pd.DataFrame:
    """The pandas transform ``transform`` replaced (the reference; see ``derive_pandas``)."""
    return encode_pandas(derive_pandas(joined, contract), contract, stats)


def stats_from_aggregates(
    contract: DatasetContract,
    value_counts: Mapping[str, pd.Series],
    means: Mapping[str, float],
    stds: Mapping[str, float],
    train_end: str,
    validation_end: str,
    train_rows: int,
    label_mean: float,
) -> FeatureStats:
    """Build stats from aggregates computed over training rows (by pandas or by Dask)."""
    cap = contract.features.max_categories
    vocabularies = {}
    for name in contract.features.categorical:
        counts = value_counts[name]
        # Most frequent first; ties broken by value so the order is deterministic.
        ordered = sorted(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
        vocabularies[name] = [str(value) for value, _ in ordered[:cap]]
    return FeatureStats(
        dataset=contract.name,
        vocabularies=vocabularies,
        means={k: _finite_or(means[k], 0.0) for k in contract.features.numeric},
        # A constant or empty column scales by 1 rather than dividing by zero.
        stds={k: _finite_or(stds[k], 1.0, positive=True) for k in contract.features.numeric},
        train_end=train_end,
        validation_end=validation_end,
        train_rows=int(train_rows),
        label_mean=float(label_mean),
    )


def stats_from_partitions(contract: DatasetContract, total: Mapping[str, Any], train_end: str,
                          validation_end: str) -> FeatureStats:
    """Build stats from the combined aggregates of the ETL's partitions
    (``core.transform.partition_aggregates`` and ``combine_aggregates``)."""
    import pandas as pd

    n = np.asarray(total["n"], dtype=np.float64)
    with np.errstate(all="ignore"):
        means = np.where(n > 0, total["mean"], np.nan)
        stds = np.sqrt(np.asarray(total["m2"]) / n)  # ddof=0, as pandas' std(ddof=0)
    numeric = contract.features.numeric
    value_counts = {name: pd.Series(counts, dtype="int64")
                    for name, counts in zip(contract.features.categorical, total["counts"], strict=True)}
    label_mean = total["label_sum"] / total["label_count"] if total["label_count"] else float("nan")
    return stats_from_aggregates(contract, value_counts, dict(zip(numeric, means.tolist(), strict=True)),
                                 dict(zip(numeric, stds.tolist(), strict=True)), train_end, validation_end,
                                 int(total["label_count"]), float(label_mean))


def _finite_or(value: float, default: float, positive: bool = False) -> float:
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        return default
    return value


def explicit_split(contract: DatasetContract) -> tuple[str, str] | None:
    """The contract's train/validation boundaries as UTC ISO strings, if it gives dates."""
    split = contract.split
    if split.train_end and split.validation_end:
        return utc_timestamp(split.train_end).isoformat(), utc_timestamp(split.validation_end).isoformat()
    return None


def split_boundaries(times: pd.Series, contract: DatasetContract) -> tuple[str, str]:
    """Train/validation boundaries: the contract's dates, or time quantiles of ``times``."""
    import pandas as pd

    explicit = explicit_split(contract)
    if explicit:
        return explicit
    split = contract.split
    utc = as_utc(times).dropna().sort_values()
    if utc.empty:
        raise ValueError("no rows with a time value to split on")
    q1 = utc.quantile(split.train_fraction)
    q2 = utc.quantile(split.train_fraction + split.validation_fraction)
    return pd.Timestamp(q1).isoformat(), pd.Timestamp(q2).isoformat()


def fit_stats(derived: pd.DataFrame, contract: DatasetContract, train_end: str, validation_end: str) -> FeatureStats:
    """Fit stats in pandas on the training rows of a derived frame (tests, baselines)."""

    train = derived[(as_utc(derived[contract.time_column]) < utc_timestamp(train_end))
                    & derived[contract.target.name].notna()]
    return stats_from_aggregates(
        contract,
        {c: category_strings(train[c]).value_counts() for c in contract.features.categorical},
        {c: finite(train[c]).mean() for c in contract.features.numeric},
        {c: finite(train[c]).std(ddof=0) for c in contract.features.numeric},
        train_end, validation_end, len(train), float(train[contract.target.name].mean()),
    )


def prepare_lookups(tables: Mapping[str, pd.DataFrame], contract: DatasetContract) -> dict[str, pd.DataFrame]:
    """Each joined table reduced to its keys and kept columns (suffixed), one row per key."""
    prepared = {}
    for join in contract.joins:
        frame = tables[join.table]
        keep = contract.join_columns(join)
        lookup = frame[join.right_keys + keep].drop_duplicates(subset=join.right_keys, keep="last")
        lookup = lookup.rename(columns={c: f"{c}{join.suffix}" for c in keep})
        lookup = lookup.rename(columns=dict(zip(join.right_keys, join.left_keys, strict=True)))
        prepared[join.table] = lookup
    return prepared


def join_lookups(base: pd.DataFrame, lookups: Mapping[str, pd.DataFrame], contract: DatasetContract) -> pd.DataFrame:
    """Left-join the prepared lookup tables onto rows of the base table: the rows and columns
    of a left merge (unmatched rows get missing values, their ints become floats), found by
    key lookup (``Index.get_indexer``) instead of a merge, about 9x faster on a million rows."""
    import pandas as pd

    parts = [base]
    for join in contract.joins:
        lookup = lookups[join.table].reset_index(drop=True)
        keys = join.left_keys
        if len(keys) == 1:
            rows = pd.Index(lookup[keys[0]]).get_indexer(base[keys[0]])
        else:
            rows = pd.MultiIndex.from_frame(lookup[keys]).get_indexer(pd.MultiIndex.from_frame(base[keys]))
        columns = lookup.drop(columns=keys)
        unmatched = rows < 0
        if unmatched.any():  # an all-missing row at the end, with the dtypes a merge gives
            columns = columns.reindex(pd.RangeIndex(len(columns) + 1))
            rows = np.where(unmatched, len(columns) - 1, rows)
        parts.append(columns.take(rows).set_axis(base.index))
    return pd.concat(parts, axis=1)


@dataclass(frozen=True)
class IndexedLookup:
    """A prepared lookup table indexed by its join keys, for joining a few rows at a time
    (serving) in time proportional to the rows, not to the lookup's size."""

    keys: tuple[str, ...]
    positions: dict[Any, int]
    rows: int
    arrow: Any  # the kept columns plus one all-null row at the end (for rows with no match)


def _key_values(series: pd.Series) -> list[Any]:
    """Join-key values as hashable scalars that compare equal across dtypes: times as UTC
    nanoseconds, numbers and strings as Python objects, missing values as None."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(series):
        naive = as_utc(series).dt.tz_localize(None)
        return [None if missing else int(value) for value, missing in
                zip(naive.to_numpy("datetime64[ns]").view("int64"), naive.isna().to_numpy(), strict=True)]
    return [None if value is None or value is pd.NA or (isinstance(value, float) and value != value) else value
            for value in series.astype(object).tolist()]


def index_lookups(prepared: Mapping[str, pd.DataFrame], contract: DatasetContract) -> dict[str, IndexedLookup]:
    """``prepare_lookups``'s tables indexed by their keys (each key is unique in them)."""
    indexed = {}
    for join in contract.joins:
        frame = prepared[join.table].reset_index(drop=True)
        keys = tuple(join.left_keys)
        columns = [c for c in frame.columns if c not in keys]
        key_rows = zip(*(_key_values(frame[k]) for k in keys), strict=True)
        positions = {key: i for i, key in enumerate(key_rows)}
        indexed[join.table] = IndexedLookup(keys, positions, len(frame), _padded_arrow(frame[columns]))
    return indexed


def _padded_arrow(exact: pd.DataFrame) -> Any:
    """The lookup's kept columns as one Arrow table with an all-null row at the end."""
    import pyarrow as pa

    table = pa.table({name: arrow_column(exact[name]) for name in exact.columns})
    nulls = pa.table({field.name: pa.nulls(1, field.type) for field in table.schema})
    return pa.concat_tables([table, nulls]).combine_chunks()


def frame_from_records(records: list[dict[str, Any]], contract: DatasetContract) -> pd.DataFrame:
    """Request records (base-table fields, maybe joined ones) as a frame with the contract's
    dtypes (times in UTC): what serving scores and the monitor replays."""
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    columns = {**contract.tables[contract.base_table].columns}
    for join in contract.joins:
        for column in contract.join_columns(join):
            columns.setdefault(f"{column}{join.suffix}", contract.tables[join.table].columns[column])
    for name in frame.columns:
        spec = columns.get(name)
        if spec is None:
            continue
        if spec.type == "datetime":
            frame[name] = as_utc(frame[name])
        elif spec.type == "float":
            frame[name] = frame[name].astype("float64")
        elif spec.type == "int":
            frame[name] = frame[name].astype("Int64")
        elif spec.type == "str":
            frame[name] = frame[name].astype("string")
    return frame


def code_fingerprint() -> str:
    """sha256 of this module's source: part of the ETL cache key, so a transform change
    invalidates cached feature tables."""
    from pathlib import Path

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
